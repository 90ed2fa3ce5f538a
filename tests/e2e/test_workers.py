"""`agent-gateway serve --workers 2`: two processes on one port, over PostgreSQL and Redis, are one
gateway: a burst on one key split across both admits exactly one request, a key revoked through
one worker is refused by the next request on the other, a worker that dies is replaced, and the
command refuses to start without what several processes need to share.

Which worker served a connection is read from production data, not a test hook: a request in
flight holds its key's lease in Redis, and a lease id starts with its process's random tag. An
HTTP/1.1 keep-alive connection stays with the worker that accepted it, so a client limited to one
connection, once its worker is known, reaches that worker for as long as the connection lives
(checked by its local port)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from agent_gateway.testing.processes import start_gateway
from agent_gateway.testing.upstream import UpstreamSettings
from tests.fixtures.live import ALL_DAY_POOLS, buy_key, provision_account

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.postgres,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
    # A request streams 20 chunks 0.1 s apart (2 s): a whole burst arrives while one runs.
    pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.1, chunks=20)], indirect=True),
]
MESSAGES = [{"role": "user", "content": "which worker are you"}]
PROCESS_TAG_CHARS = 16  # proxy.leases: a lease id is the process tag (16 hex) and a counter


def wait_ready(log: Path, workers: int, timeout_s: float = 60) -> None:
    """Until `workers` worker processes have logged that they are ready (bounded)."""
    deadline = time.monotonic() + timeout_s
    while log.read_text().count("agent_gateway ready") < workers:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)  # polling the log, bounded by the deadline


@pytest.fixture
def workers_gateway(tmp_path: Path, database_url: str, redis_url: str, upstream) -> Iterator[tuple[subprocess.Popen,
                                                                                                    str]]:
    pools = tmp_path / "pools.toml"
    pools.write_text(ALL_DAY_POOLS.format(upstream=upstream.url))
    metrics = tmp_path / "metrics"  # the operator's own directory: kept, so the test can read each worker's file
    metrics.mkdir()
    env = {"AGW_DATABASE_URL": database_url, "AGW_REDIS_URL": redis_url, "AGW_POOLS_FILE": str(pools),
           "AGW_SESSION_SECRET": "a-fixed-secret-for-every-worker", "AGW_WORKERS": "2", "AGW_LOG_LEVEL": "INFO",
           "AGW_HEADER_READ_TIMEOUT_S": "2", "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    process, url = start_gateway(env, log=tmp_path / "gateway.log")
    # /healthz answered from one worker; the other may still be starting (it accepts nothing until
    # then, so every connection would go to the first): wait until both said they are ready.
    wait_ready(tmp_path / "gateway.log", 2)
    try:
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        assert process.returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]


@dataclass
class Pinned:
    """A client with one keep-alive connection, and the worker (process tag) that accepted it."""

    http: httpx.AsyncClient
    worker: str
    local_port: int

    async def post(self, url: str, sk: str, **body) -> httpx.Response:  # type: ignore[no-untyped-def]
        # The connection is checked as soon as the answer's head is in: a worker that refuses a
        # request before reading its body (a disabled key, a busy one) closes the connection after
        # answering, so once the body is read the socket may be gone.
        async with self.http.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {sk}"},
                                    json={"model": "test-model", "messages": MESSAGES, "max_tokens": 1,
                                          **body}) as r:
            port = local_port(r)
            await r.aread()
        assert port == self.local_port, "the connection was replaced: its worker is no longer known"
        return r


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def children_of(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def pin_connections(url: str, redis_url: str, mk: str, count: int) -> list[Pinned]:
    """`count` one-connection clients opened at once (so the kernel spreads them over the workers),
    each identified by the lease its first request holds in Redis while it streams."""
    store = redis.Redis.from_url(redis_url)
    keys = [buy_key(url, mk, "alpha", ["day"]) for _ in range(count)]

    async def pin(http: httpx.AsyncClient, sk: str, key_id: str) -> Pinned:
        async with http.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {sk}"},
                               json={"model": "test-model", "messages": MESSAGES, "max_tokens": 3,
                                     "stream": True}) as stream:
            lines = stream.aiter_lines()
            await anext(lines)  # the first event: the request holds its lease now
            lease = await asyncio.to_thread(store.get, f"agw:lease:{key_id}")
            assert lease is not None
            async for _ in lines:  # read to the end, so the connection is kept alive
                pass
            port = local_port(stream)
        return Pinned(http, lease.decode()[:PROCESS_TAG_CHARS], port)

    # Every client is built before any connects (building one costs tens of ms of CPU): a client
    # built between another's connect and its first write would hold that write back, and on a
    # loaded machine past the header deadline, which runs from the moment the worker accepted.
    clients = [httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
               for _ in keys]
    try:
        return list(await asyncio.gather(*(pin(http, sk, key_id) for http, (sk, key_id) in zip(clients, keys))))
    except BaseException:
        for http in clients:
            await http.aclose()
        raise
    finally:
        store.close()


async def two_workers(url: str, redis_url: str, mk: str, per_round: int = 10) -> list[Pinned]:
    """Connections pinned to both workers. Connections opened at once tend to be accepted by one
    worker in one batch, so rounds are kept until both workers have been seen; uvicorn closes a
    connection idle for 5 s, so every kept connection is touched (GET /healthz on it) before each
    round and once more at the end, and one the server closed meanwhile is dropped."""
    kept: list[Pinned] = []
    seen: list[str] = []
    for _ in range(10):  # the kernel chooses; bounded rounds
        kept = await still_open(url, kept)
        kept += await pin_connections(url, redis_url, mk, per_round)
        seen = [p.worker for p in kept]
        if len(set(seen)) == 2:
            kept = await still_open(url, kept)
            if len({p.worker for p in kept}) == 2:
                return kept
    await close_all(kept)
    raise AssertionError(f"every connection went to one worker: {seen}")


async def still_open(url: str, pinned: list[Pinned]) -> list[Pinned]:
    """The connections that still reach their worker (a request on each resets its idle timer)."""
    alive = []
    for p in pinned:
        r = await p.http.get(url + "/healthz")
        if r.status_code == 200 and local_port(r) == p.local_port:
            alive.append(p)
        else:
            await p.http.aclose()
    return alive


async def close_all(pinned: list[Pinned]) -> None:
    for p in pinned:
        await p.http.aclose()


async def test_a_burst_on_one_key_split_across_two_workers_admits_exactly_one(workers_gateway, database_url,
                                                                               redis_url, upstream):
    _, url = workers_gateway
    mk = provision_account(database_url)
    pinned = await two_workers(url, redis_url, mk)
    sk, key_id = buy_key(url, mk, "alpha", ["day"])
    try:
        for _ in range(2):
            responses = await asyncio.gather(*(p.post(url, sk, max_tokens=20) for p in pinned))
            assert sorted(r.status_code for r in responses) == [200] + [429] * (len(pinned) - 1)
            assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"concurrency_limit"}
        # Both workers were in the burst, and each admits the key again once it is free.
        assert len({p.worker for p in pinned}) == 2
        for worker in {p.worker for p in pinned}:
            one = next(p for p in pinned if p.worker == worker)
            assert (await one.post(url, sk)).status_code == 200
    finally:
        await close_all(pinned)
    assert upstream.recorder.max_in_flight(key_id) == 1


async def test_a_key_revoked_through_one_worker_is_refused_by_the_next_request_on_the_other(
        workers_gateway, database_url, redis_url, upstream):
    _, url = workers_gateway
    mk = provision_account(database_url)
    pinned = await two_workers(url, redis_url, mk)
    sk, key_id = buy_key(url, mk, "alpha", ["day"])
    a = next(p for p in pinned if p.worker == pinned[0].worker)
    b = next(p for p in pinned if p.worker != pinned[0].worker)
    try:
        # Both workers know the key (their key caches are warm), then it is disabled through A.
        assert (await a.post(url, sk)).status_code == 200
        assert (await b.post(url, sk)).status_code == 200
        r = await a.http.post(f"{url}/api/keys/{key_id}/disable", headers={"Authorization": f"Bearer {mk}"})
        assert r.status_code == 200 and local_port(r) == a.local_port
        for client in (b, a):
            r = await client.post(url, sk)
            assert r.status_code == 403 and r.json()["error"]["code"] == "key_disabled", r.text
    finally:
        await close_all(pinned)


async def test_a_worker_that_dies_is_replaced_and_the_port_keeps_answering(workers_gateway, database_url, redis_url,
                                                                          tmp_path):
    process, url = workers_gateway
    log = tmp_path / "gateway.log"
    before = children_of(process.pid)
    assert len(before) == 2
    victim = min(before)
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    deadline = time.monotonic() + 30
    while True:
        now = children_of(process.pid)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"worker {victim} was not replaced: children {now}"
        await asyncio.sleep(0.1)  # polling the supervisor's children, bounded by the deadline
    wait_ready(log, 3)  # the two first workers, then the replacement
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(6):
            assert (await http.get(url + "/healthz", headers={"Connection": "close"})).status_code == 200
    # The new worker serves too: connections reach both the survivor and the replacement.
    pinned = await two_workers(url, redis_url, provision_account(database_url))
    await close_all(pinned)


async def test_metrics_from_any_worker_add_up_every_workers_requests(workers_gateway, database_url, redis_url,
                                                                    upstream):
    _, url = workers_gateway
    mk = provision_account(database_url)
    pinned = await two_workers(url, redis_url, mk)  # one streamed request each
    sk, _ = buy_key(url, mk, "alpha", ["day"])
    try:
        for p in pinned:  # one more each, one at a time, on both workers
            assert (await p.post(url, sk)).status_code == 200
    finally:
        await close_all(pinned)
    # Pinning may take more than one round of requests; the upstream saw each one the workers relayed.
    expected = upstream.recorder.total
    assert expected >= 2 * len(pinned)

    async def scrape(http: httpx.AsyncClient) -> tuple[float, list[float], str]:
        text = (await http.get(url + "/metrics", headers={"Connection": "close"})).text
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        ok = sum(s.value for s in samples if s.name == "agw_proxy_requests_total" and s.labels["outcome"] == "ok")
        return ok, [s.value for s in samples if s.name == "agw_proxy_in_flight"], text

    async with httpx.AsyncClient(timeout=30) as http:
        # A worker counts a request when its relay has finished, which may be a moment after the
        # client read the last byte: wait (bounded) until every count has landed, then check that
        # every worker reports the same total.
        deadline = time.monotonic() + 10
        while (got := await scrape(http))[:2] != (expected, [0]):
            assert time.monotonic() < deadline, got[2]
            await asyncio.sleep(0.05)  # polling the scrape, bounded by the deadline
        for _ in range(6):  # fresh connections: scraped from either worker
            ok, in_flight, text = await scrape(http)
            assert ok == expected, text
            assert in_flight == [0]


def counted_by(metrics: Path, pid: int, name: str) -> float:
    """A counter as one worker counted it, from its own multiprocess file."""
    path = metrics / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
               if json.loads(key)[1] == name)


async def test_every_worker_closes_connections_whose_headers_are_too_slow(workers_gateway, tmp_path):
    """The guarded protocol runs in each worker: connections that never finish their headers are
    closed after AGW_HEADER_READ_TIMEOUT_S (2 s here) by whichever worker accepted them."""
    process, url = workers_gateway
    host, port = url.removeprefix("http://").split(":")
    workers = children_of(process.pid)
    metrics = tmp_path / "metrics"

    async def trickle() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")  # never finished
        started = time.monotonic()
        try:
            return await asyncio.wait_for(reader.read(1), timeout=10), time.monotonic() - started
        finally:
            writer.close()

    sent = 0
    for _ in range(5):  # the kernel chooses the worker; rounds until both have closed some
        results = await asyncio.gather(*(trickle() for _ in range(8)))
        sent += len(results)
        assert all(data == b"" and waited < 5 for data, waited in results), results
        closed = {pid: counted_by(metrics, pid, "agw_slow_headers_closed_total") for pid in workers}
        if all(closed.values()):
            break
    assert all(closed.values()) and sum(closed.values()) == sent, closed
