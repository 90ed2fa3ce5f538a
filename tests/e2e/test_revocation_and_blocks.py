"""Revocation ends running streams at once; keys outside their blocks get 429 with Retry-After."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.live import LiveGateway, live_gateway

pytestmark = pytest.mark.anyio
MESSAGES = [{"role": "user", "content": "a long story please"}]
SLOW = UpstreamSettings(delay_s=0.05, chunks=400)


def bearer(sk: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {sk}"}


async def stream_and_revoke(live: LiveGateway, sk: str, revoke) -> tuple[list[dict], float]:
    """Start a stream, revoke once it is flowing; return the events seen and seconds to the end."""
    events: list[dict] = []
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", headers=bearer(sk),
                               json={"model": "test-model", "messages": MESSAGES, "stream": True}) as response:
            assert response.status_code == 200
            revoked_at = None
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(json.loads(line[5:]))
                if len(events) == 3 and revoked_at is None:
                    await revoke()
                    revoked_at = time.perf_counter()
            ended = time.perf_counter() - revoked_at
    return events, ended


@pytest.mark.parametrize("upstream", [SLOW], indirect=True)
@pytest.mark.parametrize("action", ["disable", "delete"])
async def test_disable_or_delete_ends_the_running_stream_and_refuses_the_next_request(gateway_live, action):
    mk = gateway_live.new_account()
    sk, key_id = gateway_live.new_key(mk)

    async def revoke():
        async with httpx.AsyncClient(base_url=gateway_live.url) as http:
            if action == "disable":
                r = await http.post(f"/api/keys/{key_id}/disable", headers=bearer(mk))
            else:
                r = await http.delete(f"/api/keys/{key_id}", headers=bearer(mk))
            assert r.status_code == 200

    events, seconds = await stream_and_revoke(gateway_live, sk, revoke)
    assert seconds < 1.0
    assert events[-1]["error"]["code"] == "key_revoked"
    assert len(events) < 50  # far from the 400 chunks the upstream would have sent
    await gateway_live.upstream.recorder.wait_for(lambda r: r.in_flight == 0)
    r = httpx.post(gateway_live.url + "/v1/chat/completions", headers=bearer(sk),
                   json={"model": "test-model", "messages": MESSAGES})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == ("key_disabled" if action == "disable" else "key_revoked")
    if action == "disable":
        assert httpx.post(f"{gateway_live.url}/api/keys/{key_id}/enable", headers=bearer(mk)).status_code == 200
        r = httpx.post(gateway_live.url + "/v1/chat/completions", headers=bearer(sk),
                       json={"model": "test-model", "messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 200


@pytest.mark.parametrize("upstream", [SLOW], indirect=True)
async def test_expiry_by_the_background_job_ends_the_stream(tmp_path, sqlite_url, upstream):
    from agent_gateway.clock import FixedClock

    clock = FixedClock(datetime.now(UTC))
    with live_gateway(tmp_path, sqlite_url, upstream, clock=clock) as live:
        sk, _ = live.new_key()

        async def expire():
            clock.advance(timedelta(days=31))
            # What the job runner does every interval, run now rather than waited for.
            await live.on_server(live.services.jobs.run_once())

        events, seconds = await stream_and_revoke(live, sk, expire)
        assert seconds < 1.0 and events[-1]["error"]["code"] == "subscription_expired"
        r = httpx.post(live.url + "/v1/chat/completions", headers=bearer(sk),
                       json={"model": "test-model", "messages": MESSAGES})
        assert r.status_code == 403 and r.json()["error"]["code"] == "subscription_expired"


BLOCK_POOLS = """
[blocks]
later = "{start}-{end}"
other = "{start2}-{end2}"

[pools.alpha]
name = "Alpha"
models = ["test-model"]
upstreams = ["{{upstream}}"]
seats = 5
prices = {{{{ later = "10.00", other = "10.00" }}}}
"""


def _hhmm(t: datetime) -> str:
    return t.strftime("%H:%M")


async def test_outside_its_blocks_a_key_gets_429_naming_them_with_retry_after(tmp_path, sqlite_url, upstream):
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start, start2 = now + timedelta(hours=2), now + timedelta(hours=5)
    pools = BLOCK_POOLS.format(start=_hhmm(start), end=_hhmm(start + timedelta(hours=1)),
                               start2=_hhmm(start2), end2=_hhmm(start2 + timedelta(hours=1)))
    with live_gateway(tmp_path, sqlite_url, upstream, pools=pools) as live:
        sk, _ = live.new_key(blocks=["later", "other"])
        before = upstream.recorder.total
        r = httpx.post(live.url + "/v1/chat/completions", headers=bearer(sk),
                       json={"model": "test-model", "messages": MESSAGES})
        assert r.status_code == 429
        error = r.json()["error"]
        assert error["code"] == "outside_reserved_hours"
        assert f"later {_hhmm(start)}" in error["message"] and f"other {_hhmm(start2)}" in error["message"]
        expected = (start - datetime.now(UTC)).total_seconds()
        assert abs(int(r.headers["Retry-After"]) - expected) <= 2
        assert upstream.recorder.total == before  # nothing reached the upstream
