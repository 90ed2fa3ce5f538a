"""Schema migrations with alembic, runnable on SQLite and PostgreSQL from code and the CLI."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from agent_gateway.db.engine import sync_url

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
