"""Unauthenticated writes are limited per client address: sign-in challenges and x402 attempts that
did not end in a delivery, N a minute, answered 429 with Retry-After before any row or chain call.
Paying agents are never limited, however many share an address; with Redis every gateway process
counts together; X-Forwarded-For names the client only when a trusted proxy sends it."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from agent_gateway.db.engine import Database
from agent_gateway.db.models import Payment, WalletChallenge
from agent_gateway.settings import Settings
from agent_gateway.testing.processes import start_gateway
from tests.conftest import write_pools_file
from tests.fixtures.live import live_gateway
from tests.fixtures.x402 import X402_POOLS, chain_settings, challenge, payment_header, sign_authorization

pytestmark = pytest.mark.anyio
LIMIT = 3
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}


def count_rows(database_url: str, model: type) -> int:
    async def run() -> int:
        db = Database(database_url)
        try:
            async with db.transaction() as session:
                return (await session.execute(select(func.count()).select_from(model))).scalar_one()
        finally:
            await db.dispose()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def assert_too_many(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "too_many_attempts"
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def new_address() -> str:
    return "0x" + secrets.token_hex(20)


# --- sign-in challenges (the app in process) -------------------------------------------------

@pytest.fixture
def settings(database_url: str, pools_file: Path) -> Settings:
    return Settings(_env_file=None, database_url=database_url, pools_file=pools_file, auto_migrate=False,
                    job_interval_s=3600, unauth_writes_per_minute=LIMIT)


async def test_sign_in_challenges_past_the_limit_get_429_and_write_nothing(gateway):
    for _ in range(LIMIT):
        r = await gateway.client.post("/api/agent/auth/challenge", json={"address": new_address()})
        assert r.status_code == 201, r.text
    r = await gateway.client.post("/api/agent/auth/challenge", json={"address": new_address()})
    assert_too_many(r)
    assert count_rows(gateway.services.settings.database_url, WalletChallenge) == LIMIT


# --- x402 attempts on anvil --------------------------------------------------------------------

@contextmanager
def x402_live(tmp_path, database_url, upstream, devchain, **settings) -> Iterator:
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS, **chain_settings(devchain),
                      unauth_writes_per_minute=LIMIT, **settings) as live:
        yield live


def empty_wallet_payment(live, devchain, chain_view) -> dict[str, str]:
    """The headers of a validly signed payment of the exact price, from a wallet that holds nothing."""
    wallet = chain_view.new_wallet(usdc_atomic=0, eth_wei=0)
    with httpx.Client(base_url=live.url, timeout=60) as http:
        accepted = challenge(http, ORDER)
    authorization, signature = sign_authorization(
        devchain, wallet.key, payer=wallet.address, to=accepted["payTo"], value=int(accepted["amount"]))
    return {"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)}


def empty_wallet_attempt(live, devchain, chain_view) -> httpx.Response:
    headers = empty_wallet_payment(live, devchain, chain_view)
    with httpx.Client(base_url=live.url, timeout=60) as http:
        return http.post("/api/agent/subscribe-pool", json=ORDER, headers=headers)


async def test_failed_x402_attempts_past_the_limit_get_429_before_any_row(tmp_path, database_url, upstream,
                                                                          devchain, chain_view):
    with x402_live(tmp_path, database_url, upstream, devchain) as live:
        for _ in range(LIMIT):
            r = empty_wallet_attempt(live, devchain, chain_view)
            assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance", r.text
        rows = count_rows(database_url, Payment)
        assert_too_many(empty_wallet_attempt(live, devchain, chain_view))
        assert count_rows(database_url, Payment) == rows
        # A request without a payment writes nothing: it still gets its 402 challenge.
        with httpx.Client(base_url=live.url, timeout=60) as http:
            assert http.post("/api/agent/subscribe-pool", json=ORDER).status_code == 402


async def test_a_burst_of_failed_x402_attempts_is_capped_before_any_row(tmp_path, database_url, upstream,
                                                                        devchain, chain_view):
    """Attempts are judged when they end, so a burst sent at once must not all get past the check
    before the first failure is recorded: at most `in flight` of them run at a time, and once
    LIMIT failures are recorded none runs. So at most LIMIT - 1 + IN_FLIGHT rows, whatever the timing."""
    in_flight, burst = 2, 12
    with x402_live(tmp_path, database_url, upstream, devchain, unauth_attempts_in_flight=in_flight) as live:
        payments = [empty_wallet_payment(live, devchain, chain_view) for _ in range(burst)]
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/api/agent/subscribe-pool", json=ORDER, headers=headers)
                                             for headers in payments))
        refused = [r for r in answers if r.status_code == 429]
        for r in refused:
            assert_too_many(r)
        ran = [r for r in answers if r.status_code != 429]
        assert all(r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance" for r in ran)
        assert len(ran) <= LIMIT - 1 + in_flight
        assert count_rows(database_url, Payment) == len(ran)


async def test_paying_agents_behind_one_address_are_never_limited(tmp_path, sqlite_url, upstream, devchain,
                                                                  chain_view):
    from x402.http.clients import x402HttpxClient

    with x402_live(tmp_path, sqlite_url, upstream, devchain) as live:
        # More paying agents than the limit, all from this one address, some at once.
        async def pay() -> int:
            agent = chain_view.new_wallet()
            async with x402HttpxClient(devchain.x402_client(agent.key), base_url=live.url, timeout=60) as http:
                return (await http.post("/api/agent/subscribe-pool", json={**ORDER, "name": "agent"})).status_code

        statuses = [await pay()] + list(await asyncio.gather(*(pay() for _ in range(LIMIT + 1))))
        assert statuses == [201] * (LIMIT + 2)
        # The deliveries used none of the address's allowance for failed attempts.
        for _ in range(LIMIT):
            assert empty_wallet_attempt(live, devchain, chain_view).status_code == 402
        assert_too_many(empty_wallet_attempt(live, devchain, chain_view))


# --- real processes: Redis sharing and forwarded headers ----------------------------------------

@contextmanager
def gateway_processes(tmp_path: Path, database_url: str, count: int = 1, **env: str) -> Iterator[list[str]]:
    settings = {"AGW_DATABASE_URL": database_url, "AGW_POOLS_FILE": str(write_pools_file(tmp_path)),
                "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "WARNING",
                "AGW_UNAUTH_WRITES_PER_MINUTE": str(LIMIT), **env}
    processes = []
    try:
        for i in range(count):
            processes.append(start_gateway(settings, log=tmp_path / f"gateway-{i}.log"))
        yield [url for _, url in processes]
    finally:
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def sign_in_challenge(url: str, forwarded_for: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return httpx.post(url + "/api/agent/auth/challenge", json={"address": new_address()}, headers=headers, timeout=30)


def unique_client_address() -> str:
    """An address no other test run counts under (the Redis log outlives a test by a minute)."""
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"



@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_with_redis_two_gateway_processes_share_one_limit(tmp_path, database_url, redis_url):
    client = unique_client_address()
    with gateway_processes(tmp_path, database_url, 2, AGW_REDIS_URL=redis_url,
                           AGW_TRUSTED_PROXIES="127.0.0.1") as (first, second):
        statuses = [sign_in_challenge(url, client).status_code for url in (first, second, first)]
        assert statuses == [201] * LIMIT
        assert_too_many(sign_in_challenge(second, client))
        assert_too_many(sign_in_challenge(first, client))
    assert count_rows(database_url, WalletChallenge) == LIMIT


def test_x_forwarded_for_from_an_untrusted_peer_does_not_change_the_address_counted(tmp_path, sqlite_url):
    with gateway_processes(tmp_path, sqlite_url) as (url,):
        for _ in range(LIMIT):
            assert sign_in_challenge(url, unique_client_address()).status_code == 201
        assert_too_many(sign_in_challenge(url, unique_client_address()))


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(tmp_path, sqlite_url):
    with gateway_processes(tmp_path, sqlite_url, AGW_TRUSTED_PROXIES="127.0.0.1") as (url,):
        client, other = unique_client_address(), unique_client_address()
        for _ in range(LIMIT):
            assert sign_in_challenge(url, client).status_code == 201
        assert_too_many(sign_in_challenge(url, client))
        # Another client behind the same proxy has its own allowance; so does a spoofed chain whose
        # last hop (the one our proxy saw) is that other client.
        assert sign_in_challenge(url, other).status_code == 201
        assert sign_in_challenge(url, f"{client}, {other}").status_code == 201
        # And the proxy's own requests (no header) count under the proxy's address.
        assert sign_in_challenge(url).status_code == 201
