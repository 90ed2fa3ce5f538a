"""Builds the running services from Settings, starts their background work and stops it in order."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from agent_gateway.catalog.pools import Catalog, load_catalog
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.migrate import upgrade_database
from agent_gateway.jobs.expiry import expire_subscriptions
from agent_gateway.jobs.runner import JobRunner
from agent_gateway.settings import Settings
from agent_gateway.subscriptions.inventory import ensure_inventory
from agent_gateway.usage.recorder import UsageRecorder

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    clock: Clock
    db: Database
    catalog: Catalog
    usage: UsageRecorder
    jobs: JobRunner


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    """Everything the routes use, built once; nothing is started yet."""
    clock = clock or Clock()
    catalog = load_catalog(settings.pools_file)
    db = Database(settings.database_url)
    jobs = JobRunner(settings.job_interval_s, {"expiry": lambda: expire_subscriptions(db, clock)})
    return Services(
        settings=settings, clock=clock, db=db, catalog=catalog, usage=UsageRecorder(db), jobs=jobs
    )


@asynccontextmanager
async def run_services(services: Services) -> AsyncIterator[Services]:
    settings = services.settings
    if settings.auto_migrate:
        # Alembic is synchronous; run it before the server takes traffic.
        import anyio.to_thread

        await anyio.to_thread.run_sync(upgrade_database, settings.database_url)
    await ensure_inventory(services.db, services.catalog)
    services.usage.start()
    services.jobs.start()
    log.info(
        "agent_gateway ready: %d pools, blocks %s, database %s",
        len(services.catalog.pools),
        ", ".join(f"{b.name} {b.hours_utc}" for b in services.catalog.blocks.values()),
        services.db.engine.url.render_as_string(hide_password=True),
    )
    try:
        yield services
    finally:
        # Stop taking new background work, then drain usage so no record is lost, then close.
        await services.jobs.stop()
        await services.usage.close()
        await services.db.dispose()
        log.info("agent_gateway stopped")


def lifespan_for(services: Services):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with run_services(services):
            yield

    return lifespan
