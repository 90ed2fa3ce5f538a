"""Pure payment rules: the official client's payment passes; every way to get it wrong has its own reason."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import time
from typing import Any

import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.schemas.v1 import PaymentRequiredV1

from agent_gateway.payments.rules import (
    MIN_REMAINING_S,
    WINDOW_SLACK_S,
    Verdict,
    check_chain_facts,
    check_payment,
    recover_authorizer,
)
from agent_gateway.payments.wire import (
    ExactPayment,
    Offer,
    encode_header,
    parse_payment,
    payment_required,
    payment_required_v1,
)
from tests.fixtures.x402 import SECP256K1_N, sign_transfer_authorization

CHAIN_ID = 31337
PAYER = Account.from_key("0x" + "22" * 32)
THIEF = Account.from_key("0x" + "33" * 32)
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER_TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PRICE = 49_000_000


def make_offer(**changes: Any) -> Offer:
    values = dict(scheme="exact", network=f"eip155:{CHAIN_ID}", amount_atomic=PRICE, asset=TOKEN, pay_to=PAY_TO,
                  max_timeout_s=300, token_name="USD Coin", token_version="2",
                  resource_url="https://gw.test/api/agent/subscribe-pool", description="1 seat")
    values.update(changes)
    return Offer(**values)


OFFER = make_offer()


def sdk_payment(offer: Offer = OFFER, signer=PAYER) -> ExactPayment:
    """What the official x402 client pays for `offer` (its challenge built by payment_required)."""
    client = x402ClientSync()
    client.register("eip155:*", ExactEvmScheme(signer=signer))
    client.set_spend_controls(False)  # our test token is not one of the SDK's default assets
    required = decode_payment_required_header(encode_header(payment_required([offer])))
    header = encode_payment_signature_header(client.create_payment_payload(required))
    return parse_payment(header, 2)


def signed(signer_key: bytes | str, *, payer: str = PAYER.address, to: str = PAY_TO, value: int = PRICE,
           valid_after: int = 0, valid_before: int | None = None, name: str = "USD Coin",
           chain_id: int = CHAIN_ID, token: str = TOKEN, accepted: dict | None = None) -> ExactPayment:
    """A hand-made v2 payment, signed by any key over any domain (for forgeries)."""
    valid_before = int(time.time()) + 300 if valid_before is None else valid_before
    nonce = "0x" + secrets.token_hex(32)
    signature = sign_transfer_authorization(
        signer_key, name=name, version="2", chain_id=chain_id, token=token, payer=payer, to=to, value=value,
        valid_after=valid_after, valid_before=valid_before, nonce=nonce)
    header = {"x402Version": 2, "accepted": accepted or OFFER.requirements(), "payload": {
        "signature": signature,
        "authorization": {"from": payer, "to": to, "value": str(value), "validAfter": str(valid_after),
                          "validBefore": str(valid_before), "nonce": nonce}}}
    return parse_payment(base64.b64encode(json.dumps(header).encode()).decode(), 2)


def check(payment: ExactPayment, offer: Offer = OFFER, now: int | None = None, **kw: Any) -> Verdict:
    return check_payment(offer, payment, CHAIN_ID, TOKEN, int(time.time()) if now is None else now, **kw)


def with_signature(payment: ExactPayment, signature: bytes) -> ExactPayment:
    return dataclasses.replace(payment, signature="0x" + signature.hex())


# --- the happy path ---------------------------------------------------------------------------

def test_official_client_payment_passes() -> None:
    payment = sdk_payment()
    assert check(payment) == Verdict(ok=True, reason=None, payer=PAYER.address)
    assert recover_authorizer(payment, "USD Coin", "2", CHAIN_ID, TOKEN) == PAYER.address


def test_official_v1_client_payment_passes_on_a_v1_network() -> None:
    offer = make_offer(network="eip155:84532", asset=OTHER_TOKEN, token_name="USDC")
    client = x402ClientSync()
    client.register_v1("base-sepolia", ExactEvmSchemeV1(signer=PAYER))
    client.set_spend_controls(False)
    payload = client.create_payment_payload(PaymentRequiredV1.model_validate(payment_required_v1([offer])))
    payment = parse_payment(encode_payment_signature_header(payload), 1)
    assert payment.valid_after > 0  # the v1 client backdates validAfter by 10 minutes
    assert check_payment(offer, payment, 84532, OTHER_TOKEN, int(time.time())).ok
    assert check_payment(make_offer(), payment, CHAIN_ID, TOKEN, int(time.time())).reason == "wrong_network"


def test_recovery_uses_our_domain_not_the_payloads() -> None:
    payment = sdk_payment()
    for domain in [("USDC", "2", CHAIN_ID, TOKEN), ("USD Coin", "1", CHAIN_ID, TOKEN),
                   ("USD Coin", "2", 8453, TOKEN), ("USD Coin", "2", CHAIN_ID, OTHER_TOKEN)]:
        assert recover_authorizer(payment, *domain) != PAYER.address


def test_v_as_0_or_1_is_accepted_like_the_token_does() -> None:
    payment = sdk_payment()
    sig = payment.signature_bytes
    lowered = with_signature(payment, sig[:64] + bytes([sig[64] - 27]))
    assert check(lowered).ok


# --- every reason -----------------------------------------------------------------------------

def test_forged_signature_by_another_key() -> None:
    forged = signed(THIEF.key, payer=PAYER.address)
    assert check(forged).reason == "invalid_signature"
    assert check(forged).payer is None


def test_signed_over_another_domain() -> None:
    assert check(signed(PAYER.key, name="USDC")).reason == "invalid_signature"
    assert check(signed(PAYER.key, chain_id=8453)).reason == "invalid_signature"
    assert check(signed(PAYER.key, token=OTHER_TOKEN)).reason == "invalid_signature"
    assert check(signed(PAYER.key)).ok


def test_tampered_authorization_breaks_the_signature() -> None:
    payment = sdk_payment()
    assert check(dataclasses.replace(payment, nonce="0x" + "00" * 32)).reason == "invalid_signature"
    assert check(dataclasses.replace(payment, valid_before=payment.valid_before - 1)).reason == "invalid_signature"
    assert check(dataclasses.replace(payment, payer=THIEF.address)).reason == "invalid_signature"


def test_malleable_and_garbage_signatures() -> None:
    payment = sdk_payment()
    sig = payment.signature_bytes
    s = int.from_bytes(sig[32:64], "big")
    high_s = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])  # flips v 27<->28
    assert check(with_signature(payment, high_s)).reason == "invalid_signature"
    assert check(with_signature(payment, sig[:64] + b"\x1d")).reason == "invalid_signature"
    assert check(with_signature(payment, b"\x00" * 65)).reason == "invalid_signature"
    assert check(with_signature(payment, b"\xff" * 64 + b"\x1b")).reason == "invalid_signature"


def test_wrong_recipient() -> None:
    payment = sdk_payment(make_offer(pay_to=THIEF.address))
    assert check(payment).reason == "wrong_recipient"
    # The authorization pays someone else while `accepted` echoes our offer faithfully.
    assert check(signed(PAYER.key, to=THIEF.address)).reason == "wrong_recipient"


@pytest.mark.parametrize("amount", [PRICE - 1, PRICE + 1, 0])
def test_wrong_amount_is_exact(amount: int) -> None:
    payment = sdk_payment(make_offer(amount_atomic=amount))
    assert check(payment).reason == "wrong_amount"


def test_wrong_asset() -> None:
    payment = sdk_payment(make_offer(asset=OTHER_TOKEN))
    assert check(payment).reason == "wrong_asset"


def test_wrong_network() -> None:
    payment = sdk_payment(make_offer(network="eip155:8453"))
    assert check(payment).reason == "wrong_network"
    v1_style = dataclasses.replace(sdk_payment(), network="eip155:84532", accepted=None)
    assert check(v1_style).reason == "wrong_network"


@pytest.mark.parametrize("field, value", [
    ("scheme", "upto"), ("amount", str(PRICE + 1)), ("payTo", THIEF.address), ("maxTimeoutSeconds", 3600),
    ("extra", {"name": "USDC", "version": "2"}), ("extra", {}),
])
def test_tampered_accepted(field: str, value: Any) -> None:
    payment = sdk_payment()
    accepted = {**payment.accepted, field: value}
    assert check(dataclasses.replace(payment, accepted=accepted)).reason == "accepted_mismatch"


def test_accepted_extra_may_carry_more_and_addresses_ignore_case() -> None:
    payment = sdk_payment()
    accepted = {**payment.accepted, "payTo": PAY_TO.lower(), "asset": TOKEN.lower(),
                "extra": {**payment.accepted["extra"], "assetTransferMethod": "eip3009"}}
    assert check(dataclasses.replace(payment, accepted=accepted)).ok


def test_not_yet_valid_follows_the_token() -> None:
    now = int(time.time())
    assert check(signed(PAYER.key, valid_after=now), now=now).reason == "not_yet_valid"
    assert check(signed(PAYER.key, valid_after=now + 60), now=now).reason == "not_yet_valid"
    assert check(signed(PAYER.key, valid_after=now - 1), now=now).ok


def test_expired_needs_six_seconds_left() -> None:
    now = int(time.time())
    assert check(signed(PAYER.key, valid_before=now - 1), now=now).reason == "expired"
    assert check(signed(PAYER.key, valid_before=now + MIN_REMAINING_S - 1), now=now).reason == "expired"
    assert check(signed(PAYER.key, valid_before=now + MIN_REMAINING_S), now=now).ok
    payment = sdk_payment()
    assert check(payment, now=payment.valid_before).reason == "expired"


def test_window_too_long() -> None:
    now = int(time.time())
    limit = now + OFFER.max_timeout_s + WINDOW_SLACK_S
    assert check(signed(PAYER.key, valid_before=limit), now=now).ok
    assert check(signed(PAYER.key, valid_before=limit + 1), now=now).reason == "window_too_long"
    assert check(signed(PAYER.key, valid_before=2**255), now=now).reason == "window_too_long"
    assert check(signed(PAYER.key, valid_before=2**255), now=now, window_slack_s=None).ok


def test_an_offer_for_another_chain_or_token_is_our_bug() -> None:
    payment = sdk_payment()
    with pytest.raises(ValueError):
        check_payment(OFFER, payment, 8453, TOKEN, int(time.time()))
    with pytest.raises(ValueError):
        check_payment(OFFER, payment, CHAIN_ID, OTHER_TOKEN, int(time.time()))


# --- chain facts ------------------------------------------------------------------------------

def test_chain_facts() -> None:
    payment = sdk_payment()
    assert check_chain_facts(payment, authorization_used=False, balance=PRICE) == Verdict(True, None, PAYER.address)
    assert check_chain_facts(payment, authorization_used=True, balance=PRICE).reason == "nonce_already_used"
    assert check_chain_facts(payment, authorization_used=False, balance=PRICE - 1).reason == "insufficient_balance"
    assert check_chain_facts(payment, authorization_used=False, balance=0).payer is None
