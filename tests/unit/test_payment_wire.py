"""The x402 wire format: our challenges and receipts as the official SDK reads them, its payments as we read them."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.exact.v1.client import ExactEvmSchemeV1
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import PaymentRequired
from x402.schemas.v1 import PaymentRequiredV1

from agent_gateway.payments.wire import (
    PAYMENT_ID_MAX_CHARS,
    PAYMENT_ID_MIN_CHARS,
    PAYMENT_IDENTIFIER,
    V1_NETWORK_NAMES,
    InvalidPaymentIdentifier,
    Offer,
    WireError,
    decode_header,
    encode_header,
    parse_payment,
    payment_identifier,
    payment_identifier_extension,
    payment_required,
    payment_required_v1,
    settle_response_header,
)

PAYER = Account.from_key("0x" + "11" * 32)
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def make_offer(network: str = "eip155:31337", amount: int = 49_000_000, **changes: Any) -> Offer:
    values = dict(scheme="exact", network=network, amount_atomic=amount, asset=TOKEN, pay_to=PAY_TO,
                  max_timeout_s=300, token_name="USD Coin", token_version="2",
                  resource_url="https://gw.test/api/agent/subscribe-pool", description="1 seat on alpha (europe)")
    values.update(changes)
    return Offer(**values)


def sdk_client() -> x402ClientSync:
    client = x402ClientSync()
    client.register("eip155:*", ExactEvmScheme(signer=PAYER))
    client.register_v1("base-sepolia", ExactEvmSchemeV1(signer=PAYER))
    client.set_spend_controls(False)  # our test token is not one of the SDK's default assets
    return client


def sdk_header(offer: Offer) -> str:
    """A PAYMENT-SIGNATURE value exactly as the official client builds it from our challenge."""
    required = decode_payment_required_header(encode_header(payment_required([offer])))
    return encode_payment_signature_header(sdk_client().create_payment_payload(required))


def sdk_payload(offer: Offer) -> dict[str, Any]:
    return decode_header(sdk_header(offer))


def b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


# --- challenges and receipts ------------------------------------------------------------------

def test_header_round_trip_is_compact_standard_base64() -> None:
    obj = {"x402Version": 2, "note": "ünïcode", "n": [1, 2]}
    text = encode_header(obj)
    assert base64.b64decode(text, validate=True) == json.dumps(obj, separators=(",", ":")).encode()
    assert decode_header(text) == obj


def test_payment_required_is_the_v2_object_the_sdk_reads() -> None:
    offer = make_offer()
    required = payment_required([offer])
    assert required == {
        "x402Version": 2,
        "error": "PAYMENT-SIGNATURE header is required",
        "resource": {"url": offer.resource_url, "description": offer.description, "mimeType": "application/json"},
        "accepts": [{"scheme": "exact", "network": "eip155:31337", "amount": "49000000", "asset": TOKEN,
                     "payTo": PAY_TO, "maxTimeoutSeconds": 300, "extra": {"name": "USD Coin", "version": "2"}}],
    }
    assert payment_required([offer], error="expired")["error"] == "expired"
    parsed = decode_payment_required_header(encode_header(required))
    assert isinstance(parsed, PaymentRequired)
    assert parsed.accepts[0].amount == "49000000" and parsed.accepts[0].pay_to == PAY_TO
    with pytest.raises(ValueError):
        payment_required([])


def test_v1_challenge_only_for_networks_v1_can_name() -> None:
    assert payment_required_v1([make_offer("eip155:31337")]) is None
    offer = make_offer("eip155:84532", amount=10_000, token_name="USDC")
    v1 = payment_required_v1([make_offer("eip155:31337"), offer])
    assert v1 is not None and len(v1["accepts"]) == 1
    assert v1["accepts"][0] == {
        "scheme": "exact", "network": "base-sepolia", "maxAmountRequired": "10000", "resource": offer.resource_url,
        "description": offer.description, "mimeType": "application/json", "payTo": PAY_TO,
        "maxTimeoutSeconds": 300, "asset": TOKEN, "extra": {"name": "USDC", "version": "2"},
    }
    assert PaymentRequiredV1.model_validate(v1).accepts[0].max_amount_required == "10000"


def test_v1_network_names_are_the_sdks() -> None:
    assert V1_NETWORK_NAMES == {chain_id: name for name, chain_id in V1_NETWORK_CHAIN_IDS.items()}


def test_settle_response_header_decodes_with_the_sdk() -> None:
    ok = decode_payment_response_header(settle_response_header(True, "0x" + "ab" * 32, "eip155:31337", PAYER.address))
    assert (ok.success, ok.transaction, ok.network, ok.payer, ok.error_reason) == (
        True, "0x" + "ab" * 32, "eip155:31337", PAYER.address, None)
    failed = decode_payment_response_header(
        settle_response_header(False, None, "eip155:31337", PAYER.address, error_reason="insufficient_funds"))
    assert (failed.success, failed.transaction, failed.error_reason) == (False, "", "insufficient_funds")


# --- payments --------------------------------------------------------------------------------

def test_parses_the_official_clients_v2_payment() -> None:
    offer = make_offer()
    payment = parse_payment(sdk_header(offer), 2)
    auth = sdk_payload(offer)["payload"]["authorization"]
    assert payment.x402_version == 2 and payment.network == "eip155:31337"
    assert payment.payer == PAYER.address and payment.to == PAY_TO
    assert payment.value == 49_000_000 and payment.valid_after == 0 and payment.valid_before > 0
    assert len(payment.nonce) == 66 and payment.nonce == payment.nonce.lower()
    assert len(payment.signature_bytes) == 65 and payment.signature == payment.signature.lower()
    assert auth["from"] == PAYER.address
    assert payment.accepted == offer.requirements()


def test_parses_the_official_clients_v1_payment() -> None:
    offer = make_offer("eip155:84532", amount=10_000, token_name="USDC")
    required = PaymentRequiredV1.model_validate(payment_required_v1([offer]))
    header = encode_payment_signature_header(sdk_client().create_payment_payload(required))
    payment = parse_payment(header, 1)
    assert payment.x402_version == 1 and payment.network == "eip155:84532" and payment.accepted is None
    assert payment.payer == PAYER.address and payment.value == 10_000 and payment.valid_after > 0


def _mutated(change) -> str:
    payload = sdk_payload(make_offer())
    change(payload)
    return b64(payload)


def _set(path: str, value: Any):
    def change(payload: dict) -> None:
        *parents, leaf = path.split(".")
        node = payload
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return change


_DELETE = object()
_AUTH = "payload.authorization"


@pytest.mark.parametrize("header, code", [
    ("", "invalid_payment_header"),
    ("%%% not base64 %%%", "invalid_payment_header"),
    (base64.b64encode(b"not json").decode(), "invalid_payment_header"),
    (base64.b64encode(b"\xff\xfe").decode(), "invalid_payment_header"),
    (b64([1, 2, 3]), "invalid_payment_header"),
    (base64.b64encode(b'{"x402Version": NaN}').decode(), "invalid_payment_header"),
    (base64.b64encode(b'{"x402Version": 2, "x402Version": 1}').decode(), "invalid_payment_header"),
    ("A" * 20_000, "invalid_payment_header"),
])
def test_undecodable_headers(header: str, code: str) -> None:
    with pytest.raises(WireError) as err:
        parse_payment(header, 2)
    assert err.value.code == code and err.value.message


def test_url_safe_base64_is_refused() -> None:
    text = encode_header({"k": "?>?>~~"})
    assert "/" in text and "+" in text
    assert decode_header(text) == {"k": "?>?>~~"}
    with pytest.raises(WireError):
        decode_header(text.replace("+", "-").replace("/", "_"))
    with pytest.raises(WireError):
        decode_header("eyJ4IjoxfQ")  # missing padding


@pytest.mark.parametrize("change, code", [
    (_set("x402Version", 1), "invalid_x402_version"),
    (_set("x402Version", "2"), "invalid_x402_version"),
    (_set("x402Version", _DELETE), "invalid_x402_version"),
    (_set("accepted", _DELETE), "invalid_accepted"),
    (_set("accepted.amount", 49_000_000), "invalid_accepted"),
    (_set("accepted.maxTimeoutSeconds", "300"), "invalid_accepted"),
    (_set("accepted.extra", "USD Coin"), "invalid_accepted"),
    (_set("accepted.scheme", "upto"), "unsupported_scheme"),
    (_set("accepted.network", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"), "unsupported_network"),
    (_set("accepted.network", "base"), "unsupported_network"),
    (_set("payload", _DELETE), "invalid_payment_header"),
    (_set(_AUTH, _DELETE), "invalid_authorization"),
    (_set(f"{_AUTH}.value", 49_000_000), "invalid_authorization"),
    (_set(f"{_AUTH}.value", "-1"), "invalid_authorization"),
    (_set(f"{_AUTH}.value", "1e6"), "invalid_authorization"),
    (_set(f"{_AUTH}.value", str(2**256)), "invalid_authorization"),
    (_set(f"{_AUTH}.validBefore", " 1"), "invalid_authorization"),
    (_set(f"{_AUTH}.validAfter", _DELETE), "invalid_authorization"),
    (_set(f"{_AUTH}.nonce", "0x1234"), "invalid_authorization"),
    (_set(f"{_AUTH}.nonce", "12" * 32), "invalid_authorization"),
    (_set(f"{_AUTH}.from", "0x1234"), "invalid_authorization"),
    (_set(f"{_AUTH}.from", PAYER.address.swapcase().replace("0X", "0x")), "invalid_authorization"),
    (_set(f"{_AUTH}.to", None), "invalid_authorization"),
    (_set("payload.signature", "0x" + "ab" * 64), "invalid_authorization"),
    (_set("payload.signature", "ab" * 65), "invalid_authorization"),
])
def test_malformed_v2_payments(change, code: str) -> None:
    with pytest.raises(WireError) as err:
        parse_payment(_mutated(change), 2)
    assert err.value.code == code


def test_malformed_v1_payments() -> None:
    payload = sdk_payload(make_offer())
    v1 = {"x402Version": 1, "scheme": "exact", "network": "anvil", "payload": payload["payload"]}
    with pytest.raises(WireError) as err:
        parse_payment(b64(v1), 1)
    assert err.value.code == "unsupported_network"
    with pytest.raises(WireError) as err:
        parse_payment(b64({**v1, "network": "base", "scheme": "upto"}), 1)
    assert err.value.code == "unsupported_scheme"
    with pytest.raises(WireError) as err:
        parse_payment(b64({**v1, "network": None}), 1)
    assert err.value.code == "invalid_payment_header"
    with pytest.raises(WireError) as err:  # a v2 payload in X-PAYMENT
        parse_payment(b64(payload), 1)
    assert err.value.code == "invalid_x402_version"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    payload = sdk_payload(make_offer())
    payload["extensions"] = {"some-future-extension": {"id": "abc"}, "bazaar": {"info": {}}}
    assert parse_payment(b64(payload), 2).payer == PAYER.address


# --- the MCP transport: the same payload as JSON in _meta["x402/payment"] -----------------------

def test_the_official_clients_mcp_payment_reads_as_its_header_does() -> None:
    from agent_gateway.payments.wire import payment_from_object, settle_response

    offer = make_offer()
    required = decode_payment_required_header(encode_header(payment_required([offer])))
    payload = sdk_client().create_payment_payload(required)
    # What x402MCPSession puts into _meta: the payload's model_dump(by_alias=True), None fields included.
    from_meta = payment_from_object(payload.model_dump(by_alias=True))
    assert from_meta == parse_payment(encode_payment_signature_header(payload), 2)
    for bad, code in (("0xdead", "invalid_payment_header"), ([], "invalid_payment_header"),
                      ({"x402Version": 3}, "invalid_x402_version"), ({"x402Version": 2}, "invalid_accepted")):
        with pytest.raises(WireError) as caught:
            payment_from_object(bad)
        assert caught.value.code == code
    receipt = settle_response(True, "0x" + "ab" * 32, "eip155:31337", PAYER.address)
    assert json.loads(base64.b64decode(settle_response_header(True, "0x" + "ab" * 32, "eip155:31337",
                                                              PAYER.address))) == receipt


# --- the payment-identifier extension -----------------------------------------------------------

def identified_sdk_header(offer: Offer, identifier: str) -> str:
    """The official client's payment after it appended `identifier` to our declaration, as its
    own helper does in a before-payment hook."""
    from x402.extensions.payment_identifier import append_payment_identifier_to_extensions

    client = sdk_client()
    client.on_before_payment_creation(
        lambda context: append_payment_identifier_to_extensions(context.payment_required.extensions, identifier))
    required = payment_required([offer], extensions={PAYMENT_IDENTIFIER: payment_identifier_extension()})
    return encode_payment_signature_header(client.create_payment_payload(decode_payment_required_header(
        encode_header(required))))


def test_the_payment_identifier_declaration_and_rules_are_the_sdks() -> None:
    from x402.extensions import payment_identifier as sdk

    assert PAYMENT_IDENTIFIER == sdk.PAYMENT_IDENTIFIER
    assert payment_identifier_extension() == sdk.declare_payment_identifier_extension()
    assert (PAYMENT_ID_MIN_CHARS, PAYMENT_ID_MAX_CHARS) == (sdk.PAYMENT_ID_MIN_LENGTH, sdk.PAYMENT_ID_MAX_LENGTH)
    candidates = ["a" * 15, "a" * 16, "a" * 128, "a" * 129, "pay_" + "0f" * 16, "pay-ok_" + "x" * 9,
                  "pay_7d5d747be160e2!0", "pay 7d5d747be160e280", "päy_7d5d747be160e280"]
    for candidate in candidates:
        payload = {"extensions": {PAYMENT_IDENTIFIER: {"info": {"required": False, "id": candidate}}}}
        try:
            ours = payment_identifier(payload) == candidate
        except WireError:
            ours = False
        assert ours == sdk.is_valid_payment_id(candidate), candidate
    # Stricter than the SDK in one place: its Python `$` lets one trailing newline through, which
    # the spec's JSON Schema pattern does not.
    with pytest.raises(InvalidPaymentIdentifier):
        payment_identifier({"extensions": {PAYMENT_IDENTIFIER: {"info": {"id": "pay_7d5d747be160e28\n"}}}})


def test_reads_the_identifier_the_official_client_appends() -> None:
    offer = make_offer()
    payment = parse_payment(identified_sdk_header(offer, "pay_7d5d747be160e280504c099d984bcfe0"), 2)
    assert payment.identifier == "pay_7d5d747be160e280504c099d984bcfe0"
    # Our declaration echoed back without an id (the SDK echoes every declared extension): no id.
    plain = sdk_payload(offer)
    plain["extensions"] = {PAYMENT_IDENTIFIER: payment_identifier_extension()}
    assert parse_payment(b64(plain), 2).identifier is None
    assert parse_payment(sdk_header(offer), 2).identifier is None


@pytest.mark.parametrize("extensions,code", [
    ({PAYMENT_IDENTIFIER: {"info": {"required": False, "id": "short"}}}, "invalid_payment_identifier"),
    ({PAYMENT_IDENTIFIER: {"info": {"required": False, "id": "x" * 129}}}, "invalid_payment_identifier"),
    ({PAYMENT_IDENTIFIER: {"info": {"required": False, "id": "pay_<script>alert(1)</script>"}}},
     "invalid_payment_identifier"),
    ({PAYMENT_IDENTIFIER: {"info": {"required": False, "id": 1234567890123456789}}}, "invalid_payment_identifier"),
    ({PAYMENT_IDENTIFIER: {"info": "pay_7d5d747be160e280"}}, "invalid_payment_identifier"),
    ({PAYMENT_IDENTIFIER: "pay_7d5d747be160e280"}, "invalid_payment_identifier"),
    ({PAYMENT_IDENTIFIER: {"id": "pay_7d5d747be160e280"}}, "invalid_payment_identifier"),
    ([], "invalid_payment_header"),
])
def test_malformed_payment_identifiers_are_refused(extensions: Any, code: str) -> None:
    payload = sdk_payload(make_offer())
    payload["extensions"] = extensions
    with pytest.raises(WireError) as refused:
        parse_payment(b64(payload), 2)
    assert refused.value.code == code
    assert isinstance(refused.value, InvalidPaymentIdentifier) == (code == "invalid_payment_identifier")
