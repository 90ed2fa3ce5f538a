"""Shared fixtures: a fresh database per test (SQLite and PostgreSQL), a test pools file, a clock
that stands still, and the gateway app driven in-process over httpx."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from agent_gateway.app import create_app
from agent_gateway.clock import FixedClock
from agent_gateway.db.migrate import upgrade_database
from agent_gateway.lifespan import build_services
from agent_gateway.services import Services
from agent_gateway.settings import Settings

pytest_plugins = ["tests.fixtures.upstream", "tests.fixtures.chain", "tests.fixtures.live", "tests.fixtures.x402",
                  "tests.fixtures.facilitator"]

POSTGRES_URL = os.environ.get("AGW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# 10:00 UTC on a Wednesday: inside the default europe block.
TEST_NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)

TEST_POOLS = """
[blocks]
asia = "00:00-08:00"
europe = "08:00-16:00"
americas = "16:00-24:00"

[pools.alpha]
name = "Alpha pool"
models = ["alpha-1", "alpha-2"]
upstreams = ["{upstream}"]
seats = 3
status = "active"
annual_discount = "0.15"
prices = {{ asia = "39.00", europe = "49.00", americas = "45.00" }}

[pools.tiny]
name = "Tiny pool"
models = ["tiny-1"]
upstreams = ["{upstream}"]
seats = 1
prices = {{ europe = "10.00" }}

[pools.resting]
name = "Paused pool"
models = ["rest-1"]
upstreams = ["{upstream}"]
seats = 5
status = "paused"
prices = {{ europe = "5.00" }}
"""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that ran processes shows the end of their logs (`*.log` in its tmp_path): a
    gateway's side of a failure is otherwise lost with the test's temporary directory."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and report.when == "call" and isinstance(tmp, Path):
        for log in sorted(tmp.glob("*.log")):
            report.sections.append((f"{log.name} (its end)", log.read_text(errors="replace")[-4000:]))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write_pools_file(directory: Path, upstream: str = "http://127.0.0.1:9/v1") -> Path:
    path = directory / "pools.toml"
    path.write_text(TEST_POOLS.format(upstream=upstream), encoding="utf-8")
    return path


# --- databases -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """A migrated template database on the test PostgreSQL server; each test clones it."""
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL} (set AGW_TEST_POSTGRES_URL): {exc}")
    template = f"agw_tpl_{uuid.uuid4().hex[:8]}"
    conn.execute(f'CREATE DATABASE "{template}"')
    upgrade_database(_database_url(template))
    try:
        yield template
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        conn.close()


@pytest.fixture
def redis_url() -> str:
    """The test Redis server; the test skips, saying why, where none is running."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL} (set AGW_TEST_REDIS_URL): {exc}")
    return REDIS_URL


def _database_url(name: str) -> str:
    base, _, _ = POSTGRES_URL.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "gateway.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    import psycopg

    template = request.getfixturevalue("postgres_admin")
    name = f"agw_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _database_url(name)
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the gateway -----------------------------------------------------------------------------

@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(TEST_NOW)


@pytest.fixture
def pools_file(tmp_path: Path) -> Path:
    return write_pools_file(tmp_path)


@pytest.fixture
def settings(database_url: str, pools_file: Path) -> Settings:
    return Settings(
        _env_file=None,
        database_url=database_url,
        pools_file=pools_file,
        auto_migrate=False,
        job_interval_s=3600,
    )


@dataclass
class Gateway:
    """The app running in-process, a client for it, and its services for looking behind the API."""

    client: httpx.AsyncClient
    services: Services

    async def new_account(self, name: str = "Acme", credit: str | None = None) -> tuple[str, str]:
        from agent_gateway.accounts.service import create_account, credit_account
        from agent_gateway.money import parse_usdc

        account, token = await create_account(self.services.db, self.services.clock, name)
        if credit is not None:
            await credit_account(self.services.db, self.services.clock, account.id, parse_usdc(credit))
        return account.id, token.plaintext

    async def buy(self, mk: str, pool: str = "alpha", blocks: list[str] | None = None,
                  quantity: int = 1, cycle: str = "month") -> list[dict]:
        response = await self.client.post(
            f"/api/pools/{pool}/subscribe",
            json={"blocks": blocks or ["europe"], "quantity": quantity, "billingCycle": cycle},
            headers=auth(mk),
        )
        assert response.status_code == 201, response.text
        return response.json()["data"]["subscriptions"]

    async def mint(self, mk: str, subscription_id: str, name: str = "key") -> dict:
        response = await self.client.post(
            "/api/keys/subscription", json={"name": name, "subscriptionId": subscription_id},
            headers=auth(mk),
        )
        assert response.status_code == 201, response.text
        return response.json()["data"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gateway(settings: Settings, clock: FixedClock) -> AsyncIterator[Gateway]:
    async with in_process_gateway(settings, clock) as gw:
        yield gw


@asynccontextmanager
async def in_process_gateway(settings: Settings, clock: FixedClock, **updates: object) -> AsyncIterator[Gateway]:
    """One gateway's app with its own services (settings changed by `updates`, e.g. an admin
    token), its lifespan run, driven in process by an httpx client."""
    services = build_services(settings.model_copy(update=updates) if updates else settings, clock)
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client:
            yield Gateway(client=client, services=services)
