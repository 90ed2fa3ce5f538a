"""The facilitator client translates every answer it cannot use into one of two errors (502, 503)
and never takes a malformed success for one."""

from __future__ import annotations

import json

import httpx
import pytest

from agent_gateway.payments.facilitator import (
    ConnectFailed,
    FacilitatorBadAnswer,
    FacilitatorClient,
    FacilitatorUnavailable,
)
from agent_gateway.payments.wire import ExactPayment

pytestmark = pytest.mark.anyio
PAYMENT = ExactPayment(x402_version=2, network="eip155:31337", payer="0x" + "11" * 20, to="0x" + "22" * 20,
                       value=5_000_000, valid_after=0, valid_before=2_000_000_000, nonce="0x" + "ab" * 32,
                       signature="0x" + "cd" * 65, accepted=None)
REQUIREMENTS = {"scheme": "exact", "network": "eip155:31337", "amount": "5000000", "asset": "0x" + "33" * 20,
                "payTo": "0x" + "22" * 20, "maxTimeoutSeconds": 300, "extra": {"name": "USD Coin", "version": "2"}}
TX = "0x" + "ef" * 32


class Recorder:
    """Answers every request with one canned response and keeps what it was sent."""

    def __init__(self, status: int, body: object) -> None:
        self.status, self.body, self.requests = status, body, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if isinstance(self.body, Exception):
            raise self.body
        if isinstance(self.body, str):
            return httpx.Response(self.status, text=self.body)
        return httpx.Response(self.status, json=self.body)


def client(recorder: Recorder) -> FacilitatorClient:
    return FacilitatorClient("http://facilitator.test/x402/", auth_header=("X-Api-Key", "k3y"),
                             transport=httpx.MockTransport(recorder))


async def test_settle_sends_a_v2_payload_with_our_requirements_and_the_auth_header():
    recorder = Recorder(200, {"success": True, "transaction": TX.upper().replace("0X", "0x"), "network": "x"})
    answer = await client(recorder).settle(PAYMENT, REQUIREMENTS, "http://gw.test/api/agent/subscribe-pool")
    assert answer.success and answer.tx_hash == TX
    [request] = recorder.requests
    assert str(request.url) == "http://facilitator.test/x402/settle" and request.headers["X-Api-Key"] == "k3y"
    body = json.loads(request.content)
    assert body["x402Version"] == 2 and body["paymentRequirements"] == REQUIREMENTS
    sent = body["paymentPayload"]
    assert sent["accepted"] == REQUIREMENTS and sent["payload"]["signature"] == PAYMENT.signature
    assert sent["payload"]["authorization"] == {
        "from": PAYMENT.payer, "to": PAYMENT.to, "value": "5000000", "validAfter": "0",
        "validBefore": "2000000000", "nonce": PAYMENT.nonce}


async def test_a_refusal_is_an_answer_and_its_transaction_is_kept():
    answer = await client(Recorder(200, {"success": False, "errorReason": "settlement_pending",
                                         "transaction": TX})).settle(PAYMENT, REQUIREMENTS)
    assert not answer.success and answer.tx_hash == TX and answer.reason == "settlement_pending"
    verdict = await client(Recorder(400, {"isValid": False, "invalidReason": "insufficient_funds"})).verify(
        PAYMENT, REQUIREMENTS)
    assert not verdict.valid and verdict.reason == "insufficient_funds"


@pytest.mark.parametrize("status,body", [
    (200, "<html>not json</html>"),
    (200, ["a", "list"]),
    (200, {"success": "yes", "transaction": TX}),
    (200, {"success": True, "transaction": ""}),
    (200, {"success": True}),
    (200, {"success": False, "transaction": "0x1234"}),
    (302, {"success": True, "transaction": TX}),
    (404, {"success": True, "transaction": TX}),
])
async def test_an_unusable_settle_answer_is_a_502(status, body):
    with pytest.raises(FacilitatorBadAnswer) as refused:
        await client(Recorder(status, body)).settle(PAYMENT, REQUIREMENTS)
    assert refused.value.status == 502 and refused.value.code == "facilitator_bad_response"


@pytest.mark.parametrize("status,body,kind", [
    (500, "boom", FacilitatorUnavailable),
    (503, {"success": True, "transaction": TX}, FacilitatorUnavailable),
    (401, {"error": "who are you"}, FacilitatorUnavailable),
    (200, httpx.ReadTimeout("slow"), FacilitatorUnavailable),
    (200, httpx.RemoteProtocolError("cut"), FacilitatorUnavailable),
    (200, httpx.ConnectError("refused"), ConnectFailed),
])
async def test_no_answer_is_a_503_and_only_a_failed_connect_says_nothing_was_sent(status, body, kind):
    with pytest.raises(FacilitatorUnavailable) as refused:
        await client(Recorder(status, body)).settle(PAYMENT, REQUIREMENTS)
    assert type(refused.value) is kind and refused.value.status == 503
    assert "k3y" not in refused.value.message


async def test_supported_lists_the_kinds_and_refuses_a_malformed_list():
    kinds = await client(Recorder(200, {"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:8453"},
                                                  {"x402Version": 1, "scheme": "exact", "network": "base"}]})).supported()
    assert kinds == {(2, "exact", "eip155:8453"), (1, "exact", "base")}
    with pytest.raises(FacilitatorBadAnswer):
        await client(Recorder(200, {"kinds": [{"scheme": "exact"}]})).supported()
