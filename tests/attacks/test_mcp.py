"""Attacks on /mcp, an unauthenticated write surface: replayed, concurrent, forged and unfunded x402
payments behave exactly as on HTTP (one delivery, one charge, nothing moves for a bad one), failed
paid calls count against the client address with HTTP's rules, hostile bodies and JSON-RPC get
4xx or JSON-RPC errors (never a 5xx, the process lives), and tool arguments are never logged."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from eth_account import Account
from x402.schemas import parse_payment_required

from tests.fixtures.live import live_gateway
from tests.fixtures.mcp import ORDER, mcp_session, x402_mcp_session
from tests.fixtures.x402 import X402_POOLS, chain_settings, sign_authorization

pytestmark = pytest.mark.anyio
PRICE = 10_000_000  # pool alpha of X402_POOLS
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
def paid_gateway(tmp_path, database_url, upstream, devchain):  # type: ignore[no-untyped-def]
    """A live gateway with payments on, on SQLite and on PostgreSQL."""
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS, **chain_settings(devchain)) as live:
        yield live


async def seats(url: str) -> int:
    async with httpx.AsyncClient(base_url=url) as http:
        return (await http.get("/api/pools/alpha")).json()["data"]["blocks"][0]["availableSeats"]


async def required_of(session, order: dict) -> dict:  # type: ignore[no-untyped-def]
    """The PaymentRequired a paid call without payment answers with."""
    unpaid = await session.call_tool("subscribe_pool", order)
    assert unpaid.isError and unpaid.structuredContent["x402Version"] == 2
    return unpaid.structuredContent


async def official_payment(devchain, wallet_key: str, required: dict) -> dict:  # type: ignore[no-untyped-def]
    """What the official x402 client puts into _meta["x402/payment"] for this PaymentRequired."""
    payload = await devchain.x402_client(wallet_key).create_payment_payload(
        parse_payment_required(required))
    return payload.model_dump(by_alias=True)


def hand_made_payment(devchain, signer_key: str, payer: str, accepted: dict, **changes) -> dict:  # type: ignore[no-untyped-def]
    fields = {"payer": payer, "to": accepted["payTo"], "value": int(accepted["amount"]), **changes}
    authorization, signature = sign_authorization(devchain, signer_key, **fields)
    return {"x402Version": 2, "accepted": accepted, "payload": {"authorization": authorization, "signature": signature}}


def code_of(result) -> str:  # type: ignore[no-untyped-def]
    content = result.structuredContent
    return content["error"]["code"] if isinstance(content["error"], dict) else content["error"]


async def test_a_replayed_payment_delivers_once_sequentially_and_ten_at_once(paid_gateway, devchain, chain_view):
    live = paid_gateway
    wallet = chain_view.new_wallet()
    pay_to_before, seats_before, relayer_before = (chain_view.usdc(devchain.pay_to), await seats(live.url),
                                                   chain_view.relayer_nonce())
    async with mcp_session(live.url) as session:
        required = await required_of(session, ORDER)
        payment = await official_payment(devchain, wallet.key, required)
        first = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment})
        again = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment})
        assert not first.isError, first.content
        assert first.meta["x402/payment-response"]["success"] is True
        assert again.isError and code_of(again) == "payment_already_used"
        assert not (again.meta or {}).get("x402/payment-response")
        # Ten copies of a fresh payment at once: one delivery, nine refusals.
        payment2 = await official_payment(devchain, wallet.key, required)
        results = await asyncio.gather(*(
            session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment2}) for _ in range(10)))
    delivered = [r for r in results if not r.isError]
    assert len(delivered) == 1, [r.content for r in results]
    assert {code_of(r) for r in results if r.isError} == {"payment_already_used"}
    keys = [s["apiKey"] for r in (first, delivered[0]) for s in r.structuredContent["subscriptions"]]
    assert len(set(keys)) == 2
    assert chain_view.usdc(devchain.pay_to) == pay_to_before + 2 * PRICE
    assert chain_view.usdc(wallet.address) == 100 * 10**6 - 2 * PRICE
    assert chain_view.relayer_nonce() == relayer_before + 2
    assert await seats(live.url) == seats_before - 2


async def test_a_forged_amount_moves_nothing_and_takes_no_seat(x402_gateway, devchain, chain_view):
    live = x402_gateway
    wallet, other = chain_view.new_wallet(), Account.create()
    pay_to_before, seats_before, relayer_before = (chain_view.usdc(devchain.pay_to), await seats(live.url),
                                                   chain_view.relayer_nonce())
    async with mcp_session(live.url) as session:
        accepted = (await required_of(session, ORDER))["accepts"][0]
        cheap = {**accepted, "amount": str(PRICE - 1)}
        forged_amount = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": hand_made_payment(
            devchain, wallet.key, wallet.address, cheap, value=PRICE - 1)})
        forged_signer = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": hand_made_payment(
            devchain, other.key.hex(), wallet.address, accepted)})
        garbage = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": {"x402Version": 2}})
        not_an_object = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": "0xdead"})
    assert forged_amount.isError and code_of(forged_amount) == "wrong_amount"
    # A refused payment answers with a fresh challenge the client can pay.
    assert forged_amount.structuredContent["accepts"][0]["amount"] == str(PRICE)
    assert forged_signer.isError and code_of(forged_signer) == "invalid_signature"
    assert garbage.isError and code_of(garbage) == "invalid_accepted"
    assert not_an_object.isError and code_of(not_an_object) == "invalid_payment_header"
    assert chain_view.usdc(wallet.address) == 100 * 10**6
    assert chain_view.usdc(devchain.pay_to) == pay_to_before
    assert await seats(live.url) == seats_before and chain_view.relayer_nonce() == relayer_before


async def test_an_empty_wallet_paying_with_the_official_client_moves_nothing(x402_gateway, devchain, chain_view):
    live = x402_gateway
    empty = chain_view.new_wallet(usdc_atomic=0)
    pay_to_before, seats_before, relayer_before = (chain_view.usdc(devchain.pay_to), await seats(live.url),
                                                   chain_view.relayer_nonce())
    async with x402_mcp_session(live.url, devchain.x402_client(empty.key)) as session:
        result = await session.call_tool("subscribe_pool", ORDER)
    assert result.payment_made and result.is_error
    assert code_of(result.raw_result) == "insufficient_balance"
    assert result.payment_response is None
    assert chain_view.usdc(devchain.pay_to) == pay_to_before
    assert await seats(live.url) == seats_before and chain_view.relayer_nonce() == relayer_before


async def test_failed_paid_calls_count_against_the_address_with_http_s_rules(tmp_path, sqlite_url, upstream,
                                                                           devchain, chain_view):
    limit = 3
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS, **chain_settings(devchain),
                      unauth_writes_per_minute=limit) as live:
        empty = chain_view.new_wallet(usdc_atomic=0)
        async with mcp_session(live.url) as session:
            accepted = (await required_of(session, ORDER))["accepts"][0]
            for _ in range(limit):
                payment = hand_made_payment(devchain, empty.key, empty.address, accepted)
                r = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment})
                assert code_of(r) == "insufficient_balance"
            payment = hand_made_payment(devchain, empty.key, empty.address, accepted)
            limited = await session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": payment})
            assert limited.isError and code_of(limited) == "too_many_attempts"
            # An unpaid call still gets its challenge: it writes nothing and is neither counted nor refused.
            assert (await required_of(session, ORDER))["accepts"][0]["amount"] == str(PRICE)
        # One limit per address for both faces: the HTTP route is refused too.
        r = httpx.post(live.url + "/api/agent/subscribe-pool", json=ORDER, timeout=30,
                       headers={"PAYMENT-SIGNATURE": "e30="})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_attempts"


async def test_a_burst_of_failed_paid_calls_is_capped_before_any_row(tmp_path, sqlite_url, upstream, devchain,
                                                                     chain_view):
    """The in-flight cap of the HTTP rules: at most `in_flight` paid calls of one address run at once
    and none once `limit` failures are recorded, so at most limit - 1 + in_flight ever touch the ledger."""
    from tests.attacks.test_unauthenticated_writes import count_rows
    from agent_gateway.db.models import Payment

    limit, in_flight, burst = 3, 2, 12
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS, **chain_settings(devchain),
                      unauth_writes_per_minute=limit, unauth_attempts_in_flight=in_flight) as live:
        async with mcp_session(live.url) as session:
            accepted = (await required_of(session, ORDER))["accepts"][0]
            payments = []
            for _ in range(burst):
                empty = chain_view.new_wallet(usdc_atomic=0, eth_wei=0)
                payments.append(hand_made_payment(devchain, empty.key, empty.address, accepted))
            results = await asyncio.gather(*(session.call_tool("subscribe_pool", ORDER, meta={"x402/payment": p})
                                              for p in payments))
        codes = [code_of(r) for r in results]
        ran = [c for c in codes if c != "too_many_attempts"]
        assert set(ran) <= {"insufficient_balance"} and codes.count("too_many_attempts") >= 1
        assert len(ran) <= limit - 1 + in_flight
        assert count_rows(live.settings.database_url, Payment) == len(ran)


async def test_hostile_bodies_and_json_rpc_get_4xx_or_json_rpc_errors_and_the_process_lives(x402_gateway):
    url = x402_gateway.url + "/mcp"
    async with httpx.AsyncClient(timeout=30) as http:
        deep = await http.post(url, content=b"[" * 5000 + b"]" * 5000, headers=MCP_HEADERS)
        assert deep.status_code == 400 and deep.json()["error"]["code"] == "json_too_deep"
        big = await http.post(url, content=b'{"a": "' + b"x" * (x402_gateway.settings.max_body_bytes + 1) + b'"}',
                              headers=MCP_HEADERS)
        assert big.status_code == 413
        for body in (b"{not json", b"\xff\xfe", b"[]", b"42", b'{"jsonrpc": "2.0"}', b'{"jsonrpc": "1.0", "id": 1}',
                     b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": "x"}',
                     b'{"jsonrpc": "2.0", "id": 1, "method": "no/such/method"}',
                     b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 7}}'):
            r = await http.post(url, content=body, headers=MCP_HEADERS)
            assert r.status_code < 500, (body, r.status_code, r.text)
            if r.status_code == 200:
                assert "error" in r.json(), (body, r.text)
        for method in ("GET", "DELETE", "PUT"):
            r = await http.request(method, url, headers=MCP_HEADERS)
            assert 400 <= r.status_code < 500, (method, r.status_code, r.text)
        assert (await http.get(x402_gateway.url + "/healthz")).status_code == 200
    async with mcp_session(x402_gateway.url) as session:
        unknown = await session.call_tool("drop_tables", {})
        wrong_args = await session.call_tool("subscribe_pool", {"pool": "alpha", "blocks": ["day"], "evil": 1})
        deep_args = await session.call_tool("quote", {"pool": "alpha", "blocks": [[["day"]]]})
    assert unknown.isError and code_of(unknown) == "unknown_tool"
    assert wrong_args.isError and code_of(wrong_args) == "invalid_field"
    assert deep_args.isError and code_of(deep_args) == "invalid_field"


async def test_tool_arguments_never_reach_the_logs(x402_gateway, caplog):
    api_key, _ = x402_gateway.new_key()
    caplog.set_level(logging.DEBUG)
    async with mcp_session(x402_gateway.url) as session:
        assert not (await session.call_tool("key_status", {"apiKey": api_key})).isError
        await session.call_tool("connection_snippets", {"apiKey": api_key})
        await session.call_tool("key_status", {"apiKey": api_key + "x"})
        await session.call_tool("no_such_tool_" + api_key, {"apiKey": api_key})
    # A malformed call the SDK itself refuses, with the key in it.
    bad = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 7, "arguments": {"apiKey": api_key}}}
    r = httpx.post(x402_gateway.url + "/mcp", json=bad, headers=MCP_HEADERS, timeout=30)
    assert r.status_code < 500
    assert caplog.records  # the gateway did log (the client's own requests, at least)
    assert api_key[8:] not in caplog.text
