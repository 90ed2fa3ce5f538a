"""Alembic environment: runs migrations on one synchronous connection."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import agent_gateway.db.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from sqlmodel import SQLModel

config = context.config
target_metadata = SQLModel.metadata


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic needs sqlalchemy.url (db.migrate sets it)")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
