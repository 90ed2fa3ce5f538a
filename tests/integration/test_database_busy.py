"""A process whose database has no connection free within the pool's wait answers 503 with
Retry-After (the SDKs retry it), never a 500, on /api and on the Messages routes alike."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from agent_gateway.db import engine as engine_module
from tests.conftest import auth

pytestmark = pytest.mark.anyio


@pytest.fixture
def short_pool_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite's writer is one connection; wait 1 s for it instead of 30.
    monkeypatch.setattr(engine_module, "_SQLITE_WAIT_S", 1)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_write_that_finds_the_writer_busy_past_the_wait_is_a_503(short_pool_wait, gateway):
    _, mk = await gateway.new_account()
    async with gateway.services.db.transaction() as held:  # the one writer connection, held
        await held.execute(text("SELECT 1"))
        r = await gateway.client.post("/api/management-keys", json={"name": "ci"}, headers=auth(mk))
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "database_busy"
    # Once the writer is free again, the same request succeeds.
    r = await gateway.client.post("/api/management-keys", json={"name": "ci"}, headers=auth(mk))
    assert r.status_code == 201, r.text
