"""Two gateway processes sharing PostgreSQL and Redis enforce one request in flight per key
together, and a key revoked through one is refused, and its stream ended, by the other."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent_gateway.testing.processes import start_gateway
from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.live import ALL_DAY_POOLS, buy_key, provision_account

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]
MESSAGES = [{"role": "user", "content": "split me across processes"}]



@pytest.fixture
def lease_ttl_s() -> str | None:
    """AGW_LEASE_TTL_S for both processes: short here, so renewal is exercised within a test;
    parametrize it to None for the default."""
    return "1"


@pytest.fixture
def gateway_processes(tmp_path: Path, database_url: str, redis_url: str, upstream,
                      lease_ttl_s: str | None) -> Iterator[list]:
    pools = tmp_path / "pools.toml"
    pools.write_text(ALL_DAY_POOLS.format(upstream=upstream.url))
    env = {"AGW_DATABASE_URL": database_url, "AGW_REDIS_URL": redis_url, "AGW_POOLS_FILE": str(pools),
           "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "WARNING"}
    if lease_ttl_s is not None:
        env["AGW_LEASE_TTL_S"] = lease_ttl_s
    processes = []
    try:
        for name in ("a", "b"):
            processes.append(start_gateway(env, log=tmp_path / f"gateway-{name}.log"))
        yield processes
    finally:
        for process, _ in processes:
            if process.poll() is None:
                process.terminate()
        for process, _ in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def two_gateways(gateway_processes) -> tuple[str, str]:
    return gateway_processes[0][1], gateway_processes[1][1]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
# Each admitted request lasts 2 s, so all twenty are in while it runs even on a loaded machine.
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.1, chunks=20)], indirect=True)
async def test_one_in_flight_across_two_processes(two_gateways, database_url, upstream):
    url_a, url_b = two_gateways
    sk, key_id = buy_key(url_a, provision_account(database_url), "alpha", ["day"])

    async def call(http: httpx.AsyncClient, url: str, tokens: int = 20) -> int:
        r = await http.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {sk}"},
                            json={"model": "test-model", "messages": MESSAGES, "max_tokens": tokens})
        return r.status_code

    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(3):
            statuses = await asyncio.gather(*(call(http, url_a if i % 2 else url_b) for i in range(20)))
            assert sorted(statuses) == [200] + [429] * 19
        # Sequential calls alternate processes and are all admitted: every slot was released.
        for i in range(6):
            assert await call(http, url_a if i % 2 else url_b, tokens=1) == 200
    assert upstream.recorder.max_in_flight(key_id) == 1
    assert upstream.recorder.total == 9


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=400)], indirect=True)
async def test_revoked_through_one_process_is_refused_and_cut_by_the_other(two_gateways, database_url, upstream):
    url_a, url_b = two_gateways
    mk = provision_account(database_url)
    sk, key_id = buy_key(url_a, mk, "alpha", ["day"])
    headers = {"Authorization": f"Bearer {sk}"}
    async with httpx.AsyncClient(timeout=30) as http:
        # Warm process B's key cache, so the refusal below cannot come from a fresh database read.
        r = await http.post(url_b + "/v1/chat/completions", headers=headers,
                            json={"model": "test-model", "messages": MESSAGES, "max_tokens": 1})
        assert r.status_code == 200
        events, revoked_at = [], None
        async with http.stream("POST", url_b + "/v1/chat/completions", headers=headers,
                               json={"model": "test-model", "messages": MESSAGES, "stream": True}) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(json.loads(line[5:]))
                if len(events) == 3:
                    r = await http.post(f"{url_a}/api/keys/{key_id}/disable", headers={"Authorization": f"Bearer {mk}"})
                    assert r.status_code == 200
                    revoked_at = time.perf_counter()
        assert time.perf_counter() - revoked_at < 1.0
        assert events[-1]["error"]["code"] == "key_revoked" and len(events) < 50
        r = await http.post(url_b + "/v1/chat/completions", headers=headers,
                            json={"model": "test-model", "messages": MESSAGES})
        assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled"
    await upstream.recorder.wait_for(lambda r: r.in_flight == 0)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=400)], indirect=True)
async def test_a_stream_outliving_its_lease_ttl_keeps_the_slot_and_a_crash_frees_it(gateway_processes, database_url,
                                                                                     upstream):
    """Leases live 1 s here: renewal must hold the slot through a long stream, and a process
    killed mid-stream must give the slot back when its lease expires."""
    (process_a, url_a), (_, url_b) = gateway_processes
    sk, key_id = buy_key(url_a, provision_account(database_url), "alpha", ["day"])
    headers = {"Authorization": f"Bearer {sk}"}
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", url_a + "/v1/chat/completions", headers=headers,
                               json={**body, "max_tokens": 400, "stream": True}) as stream:
            events = 0
            async for line in stream.aiter_lines():
                events += line.startswith("data:")
                if events == 50:  # 2.5 s in: more than twice the lease TTL, and still streaming
                    r = await http.post(url_b + "/v1/chat/completions", headers=headers, json=body)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit"
                    process_a.kill()
                    process_a.wait(10)
                    break
        deadline = time.monotonic() + 5
        while True:
            r = await http.post(url_b + "/v1/chat/completions", headers=headers, json=body)
            if r.status_code == 200:
                break
            assert r.status_code == 429 and time.monotonic() < deadline
            await asyncio.sleep(0.1)  # polling until the dead process's lease expires, bounded
    assert upstream.recorder.max_in_flight(key_id) == 1


@pytest.mark.parametrize("lease_ttl_s", [None])  # the shipped default
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.05, chunks=400)], indirect=True)
async def test_a_key_held_by_a_killed_process_is_admitted_again_within_ten_seconds(gateway_processes, database_url,
                                                                                     upstream):
    (process_a, url_a), (_, url_b) = gateway_processes
    sk, key_id = buy_key(url_a, provision_account(database_url), "alpha", ["day"])
    headers = {"Authorization": f"Bearer {sk}"}
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", url_a + "/v1/chat/completions", headers=headers,
                               json={**body, "max_tokens": 400, "stream": True}) as stream:
            events = 0
            async for line in stream.aiter_lines():
                events += line.startswith("data:")
                if events == 5:
                    r = await http.post(url_b + "/v1/chat/completions", headers=headers, json=body)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit"
                    process_a.kill()  # SIGKILL: no release, no shutdown; only the lease's TTL frees it
                    killed_at = time.monotonic()
                    process_a.wait(10)
                    break
        while True:
            r = await http.post(url_b + "/v1/chat/completions", headers=headers, json=body)
            waited_s = time.monotonic() - killed_at
            if r.status_code == 200:
                break
            assert r.status_code == 429 and waited_s < 10, f"still refused {waited_s:.1f} s after the crash"
            await asyncio.sleep(0.1)  # polling until the dead process's lease expires, bounded
    assert waited_s < 10
    assert upstream.recorder.max_in_flight(key_id) == 1
