"""Usage: the record the proxy writes, aggregated per key over 1h / 24h / 7d / 30d."""

import asyncio
from datetime import timedelta

import pytest

from agent_gateway.usage.recorder import UsageEvent, UsageRecorder
from tests.conftest import auth

pytestmark = pytest.mark.anyio


def event(key: dict, account: str, at, *, status=200, prompt=10, completion=20) -> UsageEvent:
    return UsageEvent(
        api_key_id=key["id"], account_id=account, subscription_id=key["subscriptionId"],
        endpoint="chat.completions", model="alpha-1", status_code=status, prompt_tokens=prompt,
        completion_tokens=completion, latency_ms=12.5, usage_source="upstream", created_at=at,
    )


async def test_usage_is_aggregated_per_key_and_window(gateway, clock):
    account, mk = await gateway.new_account(credit="200")
    subs = await gateway.buy(mk, quantity=2)
    k1 = await gateway.mint(mk, subs[0]["id"], "one")
    k2 = await gateway.mint(mk, subs[1]["id"], "two")
    now = clock.now()
    recorder = gateway.services.usage
    recorder.record(event(k1, account, now - timedelta(minutes=30)))
    recorder.record(event(k1, account, now - timedelta(hours=2), status=502, prompt=1, completion=0))
    recorder.record(event(k1, account, now - timedelta(days=3)))
    recorder.record(event(k1, account, now - timedelta(days=20)))
    recorder.record(event(k1, account, now - timedelta(days=40)))  # outside every window
    recorder.record(event(k2, account, now - timedelta(minutes=5), prompt=100, completion=1))
    assert await recorder.flush() == 6

    rows = {r["name"]: r for r in (await gateway.client.get("/api/usage", headers=auth(mk))).json()["data"]}
    u1 = rows["one"]["usage"]
    assert u1["1h"] == {"requests": 1, "promptTokens": 10, "completionTokens": 20, "errors": 0}
    assert u1["24h"] == {"requests": 2, "promptTokens": 11, "completionTokens": 20, "errors": 1}
    assert u1["7d"]["requests"] == 3 and u1["30d"]["requests"] == 4
    assert rows["two"]["usage"]["1h"] == {"requests": 1, "promptTokens": 100, "completionTokens": 1, "errors": 0}
    assert rows["one"]["subscriptionStatus"] == "active"
    # last used is the newest event, written in the same batch.
    assert rows["two"]["lastUsedAt"] == (now - timedelta(minutes=5)).isoformat().replace("+00:00", "Z")


async def test_another_accounts_usage_is_not_shown(gateway, clock):
    account_a, mk_a = await gateway.new_account("A", credit="100")
    _, mk_b = await gateway.new_account("B", credit="100")
    key_a = await gateway.mint(mk_a, (await gateway.buy(mk_a))[0]["id"])
    gateway.services.usage.record(event(key_a, account_a, clock.now()))
    await gateway.services.usage.flush()
    assert (await gateway.client.get("/api/usage", headers=auth(mk_b))).json()["data"] == []


async def test_buffered_usage_is_written_at_shutdown(settings, clock):
    from agent_gateway.app import create_app
    from agent_gateway.lifespan import build_services
    from tests.fixtures.state import snapshot

    services = build_services(settings, clock)
    # No timed flush during the test: only the shutdown may write these events.
    services.usage = UsageRecorder(services.db, flush_interval_s=3600)
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        from agent_gateway.accounts.service import create_account
        account, _ = await create_account(services.db, clock, "A")
        for i in range(3):
            services.usage.record(UsageEvent(
                api_key_id=f"key_{i}", account_id=account.id, subscription_id="sub_x",
                endpoint="chat.completions", model="m", status_code=200, prompt_tokens=1,
                completion_tokens=1, latency_ms=1.0, usage_source="estimated", created_at=clock.now()))
        # Still only in memory when the server stops: the shutdown itself must write them.
        assert services.usage.pending == 3
        assert (await snapshot(services.db))["counts"]["usage_records"] == 0
    # The app is stopped: the buffer was drained into a database we can reopen.
    reopened = build_services(settings, clock)
    assert (await snapshot(reopened.db))["counts"]["usage_records"] == 3
    await reopened.db.dispose()


async def test_a_full_buffer_drops_new_events_and_writes_each_kept_one_once(gateway, clock):
    # The database was unreachable long enough to fill the buffer; what is kept is written once.
    from agent_gateway.usage.recorder import UsageRecorder
    from tests.fixtures.state import snapshot

    account, mk = await gateway.new_account(credit="100")
    sub = (await gateway.buy(mk))[0]
    key = await gateway.mint(mk, sub["id"])
    recorder = UsageRecorder(gateway.services.db, max_buffer=3)
    for i in range(5):
        recorder.record(event(key, account, clock.now(), prompt=i))
    assert recorder.pending == 3
    assert await recorder.flush() == 3
    assert await recorder.flush() == 0
    assert (await snapshot(gateway.services.db))["counts"]["usage_records"] == 3
    usage = (await gateway.client.get("/api/usage", headers=auth(mk))).json()["data"]
    assert usage[0]["usage"]["24h"]["promptTokens"] == 0 + 1 + 2


async def test_a_flush_writes_what_was_buffered_when_it_began_not_what_arrives_meanwhile(gateway, clock, monkeypatch):
    # Under steady traffic events keep arriving while a batch is written. A flush that chased
    # them never ended: one small transaction after another, holding SQLite's write lock.
    account, mk = await gateway.new_account(credit="100")
    key = await gateway.mint(mk, (await gateway.buy(mk))[0]["id"])
    recorder = UsageRecorder(gateway.services.db, batch_size=2)
    plain_write = recorder._write

    async def write_while_traffic_arrives(batch):
        recorder.record(event(key, account, clock.now(), prompt=99))  # a request finishing meanwhile
        await plain_write(batch)

    monkeypatch.setattr(recorder, "_write", write_while_traffic_arrives)
    for i in range(5):
        recorder.record(event(key, account, clock.now(), prompt=i))
    assert await asyncio.wait_for(recorder.flush(), timeout=30) == 5  # three batches: 2, 2, 1
    assert recorder.pending == 3
    monkeypatch.setattr(recorder, "_write", plain_write)
    await recorder.close()  # shutdown still writes everything
    assert recorder.pending == 0
    usage = (await gateway.client.get("/api/usage", headers=auth(mk))).json()["data"]
    assert usage[0]["usage"]["24h"]["requests"] == 8
