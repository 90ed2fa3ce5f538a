"""Schema migrations with alembic, runnable on SQLite and PostgreSQL from code and the CLI."""

from __future__ import annotations

import logging
from pathlib import Path

# Alembic announces each of its plugins at INFO when imported; operators only need the upgrades.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402

from agent_gateway.db.engine import sync_url  # noqa: E402

_SCRIPTS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    # Escape % so a password with it survives configparser interpolation.
    config.set_main_option("sqlalchemy.url", sync_url(database_url).replace("%", "%%"))
    return config


def upgrade_database(database_url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to run on an up-to-date database."""
    command.upgrade(alembic_config(database_url), revision)
