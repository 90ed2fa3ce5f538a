"""Attacks on two gateway processes sharing one PostgreSQL database, one Redis and one relayer key:
bursts split across the processes never put two requests of a key in flight, and a payment sent
to both at once is settled, delivered and charged once."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent_gateway.testing.processes import start_gateway
from agent_gateway.testing.upstream import UpstreamSettings
from tests.e2e.test_x402 import claim_signature, transfer
from tests.fixtures.live import buy_key, provision_account
from tests.fixtures.x402 import X402_POOLS, ChainView, Wallet, challenge, payment_header, sign_authorization

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.postgres,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
    # Every admitted request lasts 2 s (20 chunks 0.1 s apart), so a whole burst arrives while it runs.
    pytest.mark.parametrize("upstream", [UpstreamSettings(delay_s=0.1, chunks=20)], indirect=True),
]
PRICE = 10_000_000  # pool alpha: 10.00 USDC per seat, one block
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}
MESSAGES = [{"role": "user", "content": "two processes, one key"}]
DEPLOYMENT_DOMAIN = "gateway.test"


@pytest.fixture
def two_processes(tmp_path: Path, database_url: str, redis_url: str,  # noqa: F811
                  upstream, devchain) -> Iterator[list[str]]:
    """Two `agent-gateway serve` processes configured as one deployment: same database, Redis,
    pools, chain and relayer key."""
    pools = tmp_path / "pools.toml"
    pools.write_text(X402_POOLS.format(upstream=upstream.url))
    env = {
        "AGW_DATABASE_URL": database_url, "AGW_REDIS_URL": redis_url, "AGW_POOLS_FILE": str(pools),
        "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "WARNING", "AGW_JOB_INTERVAL_S": "3600",
        "AGW_CHAIN_RPC_URL": devchain.rpc_url, "AGW_CHAIN_ID": str(devchain.chain_id),
        "AGW_USDC_ADDRESS": devchain.token, "AGW_USDC_NAME": devchain.token_name,
        "AGW_USDC_VERSION": devchain.token_version, "AGW_PAY_TO": devchain.pay_to,
        "AGW_RELAYER_KEY": devchain.relayer_key, "AGW_CONFIRMATIONS": "1", "AGW_SETTLE_WAIT_S": "10",
        # One deployment, one public URL: a tx-hash claim names its domain.
        "AGW_PUBLIC_URL": f"http://{DEPLOYMENT_DOMAIN}",
        # The refused copies below are failed unauthenticated writes from one address; the
        # attacks here are about processes, not about that limit.
        "AGW_UNAUTH_WRITES_PER_MINUTE": "10000",
    }
    processes = []
    try:
        for name in ("a", "b"):
            processes.append(start_gateway(env, log=tmp_path / f"gateway-{name}.log"))
        yield [url for _, url in processes]
    finally:
        for process, _ in processes:
            process.terminate()
        for process, _ in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# --- over-admission ------------------------------------------------------------------------

async def burst(http: httpx.AsyncClient, urls: list[str], sk: str, copies: int, *, stream: bool,
                routes: tuple[str, ...] = ("/v1/chat/completions",)) -> list[tuple[int, str]]:
    """`copies` simultaneous requests on one key, alternating processes (and routes); each one's
    status and, for a 200, its whole body (a stream is read to its end)."""
    async def one(i: int) -> tuple[int, str]:
        url, route = urls[i % len(urls)], routes[i % len(routes)]
        body = {"model": "test-model", "max_tokens": 20, "stream": stream}
        body.update({"prompt": "two processes, one key"} if route == "/v1/completions" else {"messages": MESSAGES})
        headers = {"Authorization": f"Bearer {sk}"}
        async with http.stream("POST", url + route, headers=headers, json=body) as response:
            return response.status_code, (await response.aread()).decode()

    return await asyncio.gather(*(one(i) for i in range(copies)))


async def test_a_burst_on_one_key_split_across_two_processes_admits_exactly_one(two_processes, database_url,
                                                                                upstream):
    sk, key_id = buy_key(two_processes[0], provision_account(database_url), "alpha", ["day"])
    async with httpx.AsyncClient(timeout=60) as http:
        for stream in (False, True, False, True):
            results = await burst(http, two_processes, sk, 16, stream=stream)
            statuses = sorted(status for status, _ in results)
            assert statuses == [200] + [429] * 15, statuses
            assert {json.loads(text)["error"]["code"] for status, text in results if status == 429} == {
                "concurrency_limit"}
            (admitted,) = [text for status, text in results if status == 200]
            if stream:
                assert admitted.rstrip().endswith("data: [DONE]")  # the one admitted stream ran to its end
    assert upstream.recorder.max_in_flight(key_id) == 1
    assert upstream.recorder.total == 4


async def test_the_inference_routes_of_two_processes_share_one_slot(two_processes, database_url, upstream):
    sk, key_id = buy_key(two_processes[0], provision_account(database_url), "alpha", ["day"])
    routes = ("/v1/chat/completions", "/v1/completions")
    async with httpx.AsyncClient(timeout=60) as http:
        for stream in (False, True):
            results = await burst(http, two_processes, sk, 16, stream=stream, routes=routes)
            statuses = sorted(status for status, _ in results)
            assert statuses == [200] + [429] * 15, statuses
    assert upstream.recorder.max_in_flight(key_id) == 1
    assert upstream.recorder.total == 2


# --- replays -------------------------------------------------------------------------------

async def seats_left(url: str) -> int:
    async with httpx.AsyncClient(base_url=url) as http:
        return (await http.get("/api/pools/alpha")).json()["data"]["blocks"][0]["availableSeats"]


async def post_everywhere(urls: list[str], body: dict, headers: dict[str, str], copies_each: int, *,
                          path: str = "/api/agent/subscribe-pool") -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as http:
        return await asyncio.gather(*(
            http.post(url + path, json=body, headers=headers) for _ in range(copies_each) for url in urls))


def assert_one_delivery(responses: list[httpx.Response]) -> dict:
    delivered = [r for r in responses if r.status_code == 201]
    refused = [r for r in responses if r.status_code != 201]
    assert len(delivered) == 1, [r.text for r in responses]
    assert {(r.status_code, error_code(r)) for r in refused} == {(402, "payment_already_used")}, [
        r.text for r in refused]
    return delivered[0].json()["data"]


async def test_one_payment_sent_to_both_processes_at_once_settles_and_delivers_once(two_processes, database_url,
                                                                                  devchain, chain_view: ChainView):
    wallet = chain_view.new_wallet()
    mk = provision_account(database_url, credit_usdc=0)  # so its subscribe asks for x402 too
    with httpx.Client(base_url=two_processes[0]) as http:
        accepted = challenge(http, ORDER)
    authorization, signature = sign_authorization(devchain, wallet.key, payer=wallet.address, to=accepted["payTo"],
                                                  value=int(accepted["amount"]))
    header = payment_header(accepted, authorization, signature)
    pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
    seats_before = await seats_left(two_processes[0])

    # Copies to the agent endpoint of both processes and, the same order bought by an account,
    # to the management endpoint of both, all at once.
    responses = [r for batch in await asyncio.gather(
        post_everywhere(two_processes, ORDER, {"PAYMENT-SIGNATURE": header}, copies_each=4),
        post_everywhere(two_processes, {"blocks": ["day"], "quantity": 1},
                        {"PAYMENT-SIGNATURE": header, "Authorization": f"Bearer {mk}"}, copies_each=2,
                        path="/api/pools/alpha/subscribe")) for r in batch]

    data = assert_one_delivery(responses)
    assert len(data["subscriptions"]) == 1 and data["subscriptions"][0]["apiKey"].startswith("sk_")
    # Exactly one settlement reached the chain: the price moved once, the relayer sent one transaction.
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
    assert chain_view.relayer_nonce() == relayer_before + 1
    for url in two_processes:
        assert await seats_left(url) == seats_before - 1
    # Later copies, to either process, are still refused.
    again = await post_everywhere(two_processes, ORDER, {"PAYMENT-SIGNATURE": header}, copies_each=1)
    assert {(r.status_code, error_code(r)) for r in again} == {(402, "payment_already_used")}


async def test_one_identified_payment_sent_to_both_processes_at_once_is_settled_once_and_shown_to_the_rest(
        two_processes, devchain, chain_view: ChainView):
    """x402 payment-identifier across processes: copies of one payment under one id settle once, and
    every other copy, on either process, is shown that purchase (never its keys); another payment
    under the id, sent to both at once, is refused everywhere."""
    wallet = chain_view.new_wallet()
    with httpx.Client(base_url=two_processes[0]) as http:
        r = http.post("/api/agent/subscribe-pool", json=ORDER)
    required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
    accepted = required["accepts"][0]

    def identified_header(identifier: str) -> str:
        authorization, signature = sign_authorization(devchain, wallet.key, payer=wallet.address,
                                                      to=accepted["payTo"], value=int(accepted["amount"]))
        payload = {"x402Version": 2, "accepted": accepted,
                   "payload": {"authorization": authorization, "signature": signature},
                   "extensions": {"payment-identifier": {"info": {"required": False, "id": identifier}}}}
        return base64.b64encode(json.dumps(payload).encode()).decode()

    identifier = "pay_" + "ab12" * 8
    pay_to_before, relayer_before = chain_view.usdc(devchain.pay_to), chain_view.relayer_nonce()
    responses = await post_everywhere(two_processes, ORDER, {"PAYMENT-SIGNATURE": identified_header(identifier)},
                                      copies_each=4)
    delivered = [r for r in responses if r.status_code == 201]
    assert len(delivered) == 1, [r.text for r in responses]
    payment_id = delivered[0].json()["data"]["paymentId"]
    for r in responses:
        if r.status_code != 201:
            assert r.status_code in (200, 202) and r.json()["data"]["repeated"] is True, r.text
            assert r.json()["data"]["paymentId"] == payment_id and "sk_" not in r.text
    others = await post_everywhere(two_processes, ORDER, {"PAYMENT-SIGNATURE": identified_header(identifier)},
                                   copies_each=2)
    assert {(r.status_code, error_code(r)) for r in others} == {(409, "payment_identifier_conflict")}
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + PRICE
    assert chain_view.relayer_nonce() == relayer_before + 1


async def test_one_tx_hash_claimed_through_both_processes_at_once_is_delivered_once(two_processes, devchain,
                                                                                 chain_view: ChainView):
    wallet = chain_view.new_wallet()
    paid = transfer(devchain, wallet, devchain.pay_to, PRICE)
    seats_before = await seats_left(two_processes[0])
    signature = claim_signature(wallet.key, paid, None, chain_id=devchain.chain_id, domain=DEPLOYMENT_DOMAIN)
    claim = {**ORDER, "txHash": paid, "signature": signature}

    responses = await post_everywhere(two_processes, claim, {}, copies_each=6)

    data = assert_one_delivery(responses)
    assert len(data["subscriptions"]) == 1
    for url in two_processes:
        assert await seats_left(url) == seats_before - 1
    # Nothing was credited on top of the delivery: the wallet's account holds the one seat, no balance.
    mk = data["managementKey"]
    account = httpx.get(two_processes[1] + "/api/account", headers={"Authorization": f"Bearer {mk}"}).json()["data"]
    assert account["balance"] == "0.00"
    subs = httpx.get(two_processes[1] + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"}).json()["data"]
    assert len(subs) == 1


async def test_two_processes_sharing_the_relayer_key_settle_every_payment_once(two_processes, devchain,
                                                                            chain_view: ChainView):
    # Each process counts the relayer's nonces itself, so once both have settled something,
    # every settlement after the other process's signs a nonce already used: it must notice and
    # sign again, not fail the purchase or charge twice. Alternating processes makes that happen
    # from the third purchase on.
    wallets = [chain_view.new_wallet() for _ in range(6)]
    with httpx.Client(base_url=two_processes[0]) as http:
        accepted = challenge(http, ORDER)
    relayer_before, pay_to_before = chain_view.relayer_nonce(), chain_view.usdc(devchain.pay_to)

    def header(wallet: Wallet) -> dict[str, str]:
        authorization, signature = sign_authorization(devchain, wallet.key, payer=wallet.address,
                                                      to=accepted["payTo"], value=PRICE)
        return {"PAYMENT-SIGNATURE": payment_header(accepted, authorization, signature)}

    async with httpx.AsyncClient(timeout=60) as http:
        for i, wallet in enumerate(wallets[:4]):
            r = await http.post(two_processes[i % 2] + "/api/agent/subscribe-pool", json=ORDER, headers=header(wallet))
            assert r.status_code == 201, r.text
        # And two at once, one through each process.
        pair = await asyncio.gather(*(
            http.post(url + "/api/agent/subscribe-pool", json=ORDER, headers=header(wallet))
            for url, wallet in zip(two_processes, wallets[4:], strict=True)))
        assert [r.status_code for r in pair] == [201, 201], [r.text for r in pair]
    for wallet in wallets:
        assert chain_view.usdc(wallet.address) == 100 * 10**6 - PRICE
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + len(wallets) * PRICE
    assert chain_view.relayer_nonce() == relayer_before + len(wallets)


async def test_an_mcp_session_split_across_two_processes_buys_and_checks_a_key(two_processes, devchain):
    from tests.fixtures.mcp import Alternating, mcp_session, x402_mcp_session

    view = ChainView(devchain)
    agent = view.new_wallet()
    pay_to_before = view.usdc(devchain.pay_to)
    # Every HTTP request of the session goes to the other process than the one before: initialise on
    # one, list on the other, the unpaid call on one and the paid retry on the other.
    transport = Alternating(two_processes)
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:
        async with x402_mcp_session(two_processes[0], devchain.x402_client(agent.key), http) as session:
            tools = await session.list_tools()
            bought = await session.call_tool("subscribe_pool", ORDER)
    assert len(set(transport.seen)) == 2 and len(transport.seen) >= 4
    assert {t.name for t in tools.tools} >= {"subscribe_pool", "key_status"}
    assert bought.payment_made and not bought.is_error, bought.content
    api_key = bought.raw_result.structuredContent["subscriptions"][0]["apiKey"]
    assert view.usdc(devchain.pay_to) == pay_to_before + PRICE
    for url in two_processes:  # the key bought through both is known to each
        async with mcp_session(url) as session:
            status = await session.call_tool("key_status", {"apiKey": api_key})
        assert not status.isError and status.structuredContent["pool"] == "alpha"


async def test_one_mcp_payment_sent_to_both_processes_at_once_is_delivered_once(two_processes, devchain):
    from x402.schemas import parse_payment_required

    from tests.fixtures.mcp import mcp_session

    view = ChainView(devchain)
    agent = view.new_wallet()
    pay_to_before = view.usdc(devchain.pay_to)
    async with mcp_session(two_processes[0]) as first, mcp_session(two_processes[1]) as second:
        unpaid = await first.call_tool("subscribe_pool", ORDER)
        payload = await devchain.x402_client(agent.key).create_payment_payload(
            parse_payment_required(unpaid.structuredContent))
        meta = {"x402/payment": payload.model_dump(by_alias=True)}
        results = await asyncio.gather(*(session.call_tool("subscribe_pool", ORDER, meta=meta)
                                         for session in (first, second) for _ in range(5)))
    delivered = [r for r in results if not r.isError]
    assert len(delivered) == 1, [r.content for r in results]
    # A refusal is an x402 challenge (`error` = the code) or the /api envelope (`error.code`).
    codes = {r.structuredContent["error"] if isinstance(r.structuredContent["error"], str)
             else r.structuredContent["error"]["code"] for r in results if r.isError}
    assert codes == {"payment_already_used"}
    assert view.usdc(devchain.pay_to) == pay_to_before + PRICE
    assert view.usdc(agent.address) == 100 * 10**6 - PRICE
