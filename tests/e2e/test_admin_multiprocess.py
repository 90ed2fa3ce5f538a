"""Two gateway processes sharing PostgreSQL and Redis: a pool state change or a pools file reload
made through one takes effect in the other, at once (the Redis notice; polling is switched off
here), and a bad file changes nothing in either."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent_gateway.testing.processes import start_gateway
from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.live import ALL_DAY_POOLS, buy_key, provision_account

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]
ADMIN_TOKEN = "adm-" + "m4" * 20
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Admin-Actor": "ops"}
BETA = """
[pools.beta]
name = "Beta"
models = ["beta-model"]
upstreams = ["{upstream}"]
seats = 5
status = "funding"
prices = {{ day = "3.00" }}
"""


@pytest.fixture
def two_gateways(tmp_path: Path, database_url: str, redis_url: str, upstream) -> Iterator[tuple[str, str, Path]]:
    """Processes A and B, each with a pools file of its own (same text): B can only learn of a
    reload made through A from the database."""
    files = []
    processes = []
    try:
        for name in ("a", "b"):
            pools = tmp_path / f"pools-{name}.toml"
            pools.write_text(ALL_DAY_POOLS.format(upstream=upstream.url))
            files.append(pools)
            env = {"AGW_DATABASE_URL": database_url, "AGW_REDIS_URL": redis_url, "AGW_POOLS_FILE": str(pools),
                   "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "INFO", "AGW_ADMIN_TOKEN": ADMIN_TOKEN,
                   "AGW_CATALOG_POLL_S": "3600"}
            processes.append(start_gateway(env, log=tmp_path / f"gateway-{name}.log"))
        yield processes[0][1], processes[1][1], files[0]
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.terminate()
        for process, _ in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


async def eventually(check: Callable[[], object], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "the other process did not follow in time"
        await asyncio.sleep(0.05)  # polling for the condition, bounded by the deadline


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_state_change_through_one_process_takes_effect_in_the_other(two_gateways, database_url):
    url_a, url_b, _ = two_gateways
    sk, _ = buy_key(url_a, provision_account(database_url), "alpha", ["day"])
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.post(url_b + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {sk}"})).status_code == 200
        r = await http.post(url_a + "/api/admin/pools/alpha/state", json={"status": "paused"}, headers=ADMIN)
        assert r.status_code == 200, r.text

        async def b_refuses() -> bool:
            r = await http.post(url_b + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {sk}"})
            return r.status_code == 503 and r.json()["error"]["code"] == "pool_not_active"

        await eventually(b_refuses)
        assert (await http.get(url_b + "/api/pools/alpha")).json()["data"]["status"] == "paused"
        r = await http.post(url_b + "/api/admin/pools/alpha/state", json={"status": "active"}, headers=ADMIN)
        assert r.status_code == 200

        async def a_serves() -> bool:
            r = await http.post(url_a + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {sk}"})
            return r.status_code == 200

        await eventually(a_serves)
        r = await http.get(url_b + "/api/admin/audit?action=pool.state", headers=ADMIN)
        assert [(a["after"]["status"], a["actor"]) for a in r.json()["data"]] == [("active", "ops"), ("paused", "ops")]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_reload_through_one_process_applies_in_the_other_and_a_bad_file_in_neither(two_gateways, upstream):
    url_a, url_b, file_a = two_gateways
    async with httpx.AsyncClient(timeout=30) as http:
        original = file_a.read_text()
        file_a.write_text(original.replace('day = "10.00"', 'day = "11.00"') + BETA.format(upstream=upstream.url))
        r = await http.post(url_a + "/api/admin/pools/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["data"]["added"] == ["beta"], r.text

        async def b_sells_the_new_file() -> bool:
            pools = {p["slug"]: p for p in (await http.get(url_b + "/api/pools")).json()["data"]}
            return "beta" in pools and pools["alpha"]["blocks"][0]["pricePerMonth"] == "11.00"

        await eventually(b_sells_the_new_file)
        before = [(await http.get(url + "/api/pools")).json() for url in (url_a, url_b)]
        file_a.write_text(original.replace("seats = 500", "seats = -1"))
        r = await http.post(url_a + "/api/admin/pools/reload", headers=ADMIN)
        assert r.status_code == 400 and "pools.alpha.seats" in r.json()["error"]["message"]
        r = await http.post(url_a + "/api/admin/pools/reload", headers=ADMIN)  # the operator retries: the same
        assert r.status_code == 400
        assert [(await http.get(url + "/api/pools")).json() for url in (url_a, url_b)] == before


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=400)], indirect=True)
async def test_disabling_an_account_through_one_process_cuts_its_stream_in_the_other(two_gateways, database_url,
                                                                                      upstream):
    url_a, url_b, _ = two_gateways
    mk = provision_account(database_url)
    sk, key_id = buy_key(url_a, mk, "alpha", ["day"])
    headers = {"Authorization": f"Bearer {sk}"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(url_a + "/api/account", headers={"Authorization": f"Bearer {mk}"})
        account_id = r.json()["data"]["id"]
        events = []
        async with http.stream("POST", url_b + "/v1/chat/completions", headers=headers, json=body) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(line)
                if len(events) == 3:
                    r = await http.post(f"{url_a}/api/admin/accounts/{account_id}/disable", json={"reason": "abuse"},
                                        headers=ADMIN)
                    assert r.status_code == 200 and r.json()["data"]["keysRevoked"] == [key_id]
        assert "key_revoked" in events[-1] and len(events) < 50
        r = await http.post(url_b + "/v1/chat/completions", headers=headers, json={**body, "stream": False})
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled"
        r = await http.get(url_b + "/api/keys", headers={"Authorization": f"Bearer {mk}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled"
    await upstream.recorder.wait_for(lambda r: r.in_flight == 0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_activation_through_one_process_starts_the_pledges_in_the_other(two_gateways, database_url, upstream):
    url_a, url_b, file_a = two_gateways
    file_a.write_text(file_a.read_text() + BETA.format(upstream=upstream.url))
    mk = provision_account(database_url)
    body = {"model": "beta-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url_a + "/api/admin/pools/reload", headers=ADMIN)
        assert r.status_code == 200, r.text

        async def b_sells_beta() -> bool:
            return (await http.get(url_b + "/api/pools/beta")).status_code == 200

        await eventually(b_sells_beta)
        sk, _ = buy_key(url_b, mk, "beta", ["day"])  # a pledge, bought through B
        headers = {"Authorization": f"Bearer {sk}"}
        r = await http.post(url_b + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["code"] == "pool_funding", r.text
        assert r.json()["funding"]["progress"] == "1/5"
        # The operator starts the round early, through A.
        for status in ("activating", "active"):
            r = await http.post(url_a + "/api/admin/pools/beta/state", json={"status": status}, headers=ADMIN)
            assert r.status_code == 200, r.text

        async def b_serves() -> bool:
            r = await http.post(url_b + "/v1/chat/completions", json=body, headers=headers)
            return r.status_code == 200

        await eventually(b_serves)  # the Redis notice (polling is off here), in milliseconds
        [sub] = (await http.get(url_b + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"})).json()["data"]
        [record] = (await http.get(url_b + "/api/admin/audit?target=pool:beta&action=pool.state",
                                   headers=ADMIN)).json()["data"][:1]
        assert sub["status"] == "active" and sub["currentPeriodStart"] == record["createdAt"]
