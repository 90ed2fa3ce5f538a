"""A facilitator's settlement dropped by a reorg is handed to its /settle again with our own
requirements, as the first /settle was (facilitator.payment_payload): for an x402 v1 payment too
(it echoes none), and never with what the client echoed in `accepted`."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from agent_gateway.db.models import Payment
from agent_gateway.payments.facilitator import FacilitatorSettlement
from agent_gateway.payments.reorgs import ReorgWatch
from agent_gateway.payments.wire import ExactPayment

pytestmark = pytest.mark.anyio
TOKEN, PAY_TO, PAYER = "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20
OURS = {"scheme": "exact", "network": "eip155:8453", "amount": "2500000", "asset": TOKEN, "payTo": PAY_TO,
        "maxTimeoutSeconds": 300, "extra": {"name": "USD Coin", "version": "2"}}


class Facilitator:
    def __init__(self) -> None:
        self.settled: list[tuple[ExactPayment, dict[str, Any]]] = []

    async def settle(self, payment: ExactPayment, requirements: dict[str, Any],
                     resource_url: str | None = None) -> FacilitatorSettlement:
        self.settled.append((payment, requirements))
        return FacilitatorSettlement(success=True, tx_hash="0x" + "cd" * 32)


class Chain:
    async def transaction(self, tx_hash: str) -> None:
        return None  # the reorganised transaction is gone from the node


def watch(facilitator: Facilitator) -> ReorgWatch:
    terms = SimpleNamespace(network="eip155:8453", usdc_address=TOKEN, usdc_name="USD Coin", usdc_version="2",
                            pay_to=PAY_TO)
    payments = SimpleNamespace(db=None, clock=None, facilitator=facilitator, require_chain=Chain, terms=terms,
                               settings=SimpleNamespace(payment_timeout_s=300))
    return ReorgWatch(payments)  # type: ignore[arg-type]


def stored(accepted: dict[str, Any] | None) -> Payment:
    signed = ExactPayment(x402_version=1 if accepted is None else 2, network="eip155:8453", payer=PAYER, to=PAY_TO,
                          value=2_500_000, valid_after=0, valid_before=2**40, nonce="0x" + "44" * 32,
                          signature="0x" + "55" * 65, accepted=accepted)
    return Payment(id="pay_1", method="x402-exact", tx_hash="0x" + "ab" * 32, authorization=dataclasses.asdict(signed))


@pytest.mark.parametrize("accepted", [None, {**OURS, "extra": {**OURS["extra"], "assetTransferMethod": "permit2"}}],
                         ids=["v1", "v2-with-extra-of-its-own"])
async def test_a_dropped_facilitator_settlement_goes_to_settle_again_with_our_requirements(accepted):
    facilitator = Facilitator()
    await watch(facilitator)._settle_again_through_facilitator(stored(accepted))
    assert [requirements for _, requirements in facilitator.settled] == [OURS]
