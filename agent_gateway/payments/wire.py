"""The x402 wire format (v2, and v1 where the network has a v1 name): challenges, payments, receipts."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from eth_utils import is_address, is_checksum_address, to_checksum_address

from agent_gateway.strict_json import DEFAULT_MAX_DEPTH, JsonRefused, loads_strict

SCHEME = "exact"
MIME_TYPE = "application/json"
# A payment header is one small JSON object; anything bigger is refused before decoding.
MAX_HEADER_CHARS = 16_384
# uint256 fits in 78 decimal digits; the value check below still bounds it exactly.
_UINT_RE = re.compile(r"^[0-9]{1,78}$")
_NONCE_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SIGNATURE_RE = re.compile(r"^0x[0-9a-fA-F]{130}$")
_CAIP2_EIP155_RE = re.compile(r"^eip155:[1-9][0-9]*$")

# The x402 `payment-identifier` extension (specs/extensions/payment_identifier.md): a client's
# idempotency key, 16-128 letters, digits, `-` or `_`. The SDK's constants
# (x402.extensions.payment_identifier); a unit test keeps the two equal.
PAYMENT_IDENTIFIER = "payment-identifier"
PAYMENT_ID_MIN_CHARS = 16
PAYMENT_ID_MAX_CHARS = 128
_PAYMENT_ID_RE = re.compile(r"[a-zA-Z0-9_-]{16,128}")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# The v1 protocol names networks instead of using CAIP-2, from a closed table. This is the x402
# SDK's table (x402.mechanisms.evm.v1.constants.V1_NETWORK_CHAIN_IDS, 2.25.0), keyed by chain id;
# a unit test keeps the two equal.
V1_NETWORK_NAMES: dict[int, str] = {
    8453: "base", 84532: "base-sepolia", 1: "ethereum", 137: "polygon", 80002: "polygon-amoy",
    43114: "avalanche", 43113: "avalanche-fuji", 2741: "abstract", 11124: "abstract-testnet",
    4689: "iotex", 1329: "sei", 1328: "sei-testnet", 3338: "peaq", 1513: "story", 656476: "educhain",
    1444673419: "skale-base-sepolia", 4326: "megaeth", 143: "monad", 10143: "monad-testnet",
    988: "stable", 2201: "stable-testnet", 42220: "celo", 14: "flare",
}
_V1_CHAIN_IDS = {name: chain_id for chain_id, name in V1_NETWORK_NAMES.items()}


class WireError(ValueError):
    """A payment header that cannot be read; `code` is a stable snake_case reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidPaymentIdentifier(WireError):
    """The payment's `payment-identifier` extension is malformed: a bad request, not an unpaid one."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_payment_identifier", message)


@dataclass(frozen=True)
class Offer:
    """One way to pay that the gateway advertises (an entry of `accepts`)."""

    scheme: str
    network: str  # CAIP-2, e.g. "eip155:8453"
    amount_atomic: int
    asset: str  # token address, checksummed
    pay_to: str  # checksummed
    max_timeout_s: int
    token_name: str  # the token's EIP-712 domain name, e.g. "USD Coin"
    token_version: str
    resource_url: str
    description: str

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)

    def requirements(self) -> dict[str, Any]:
        """The v2 `PaymentRequirements` object (what a v2 payment echoes back as `accepted`)."""
        return {
            "scheme": self.scheme, "network": self.network, "amount": str(self.amount_atomic),
            "asset": self.asset, "payTo": self.pay_to, "maxTimeoutSeconds": self.max_timeout_s,
            "extra": {"name": self.token_name, "version": self.token_version},
        }


@dataclass(frozen=True)
class ExactPayment:
    """A decoded `exact` EVM payment: an EIP-3009 authorization and its signature, not yet verified."""

    x402_version: int
    network: str  # CAIP-2 (a v1 network name is translated)
    payer: str  # authorization.from, checksummed
    to: str  # checksummed
    value: int
    valid_after: int
    valid_before: int
    nonce: str  # 0x + 64 lowercase hex
    signature: str  # 0x + 130 lowercase hex (65 bytes: r, s, v)
    accepted: dict[str, Any] | None  # v2: the requirements the client says it paid; v1: None
    # v2: the client's idempotency key from the `payment-identifier` extension, if it sent one.
    identifier: str | None = None

    @property
    def signature_bytes(self) -> bytes:
        return bytes.fromhex(self.signature[2:])


def chain_id_of(network: str) -> int:
    """'eip155:8453' -> 8453; ValueError for anything else."""
    if not _CAIP2_EIP155_RE.match(network):
        raise ValueError(f"{network!r} is not an eip155 CAIP-2 network")
    return int(network.split(":", 1)[1])


# --- challenges ----------------------------------------------------------------------------

def payment_required(offers: list[Offer], error: str | None = None,
                     extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The v2 `PaymentRequired` object for the `PAYMENT-REQUIRED` header (and the 402 body); the
    offers are alternatives for one resource, described by the first offer. `extensions` maps an
    extension key (e.g. `bazaar`) to its `{info, schema}`."""
    if not offers:
        raise ValueError("a challenge needs at least one offer")
    first = offers[0]
    required: dict[str, Any] = {
        "x402Version": 2,
        "error": error or "PAYMENT-SIGNATURE header is required",
        "resource": {"url": first.resource_url, "description": first.description, "mimeType": MIME_TYPE},
        "accepts": [offer.requirements() for offer in offers],
    }
    if extensions:
        required["extensions"] = extensions
    return required


def payment_identifier_extension() -> dict[str, Any]:
    """Our declaration of the `payment-identifier` extension in a challenge's `extensions`, as the
    SDK's `declare_payment_identifier_extension()` writes it: an id is welcome, not required."""
    return {
        "info": {"required": False},
        "schema": {
            "$schema": JSON_SCHEMA_DIALECT, "type": "object",
            "properties": {"required": {"type": "boolean"},
                           "id": {"type": "string", "minLength": PAYMENT_ID_MIN_CHARS,
                                  "maxLength": PAYMENT_ID_MAX_CHARS, "pattern": "^[a-zA-Z0-9_-]+$"}},
            "required": ["required"],
        },
    }


def payment_required_v1(offers: list[Offer], error: str | None = None,
                        output_schema: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The v1 `PaymentRequirementsResponse` body, for the offers whose network v1 can name; else None.
    `output_schema` is v1's place for discovery (what v2 carries in the `bazaar` extension)."""
    accepts = [
        {
            "scheme": offer.scheme, "network": V1_NETWORK_NAMES[offer.chain_id],
            "maxAmountRequired": str(offer.amount_atomic), "resource": offer.resource_url,
            "description": offer.description, "mimeType": MIME_TYPE, "payTo": offer.pay_to,
            "maxTimeoutSeconds": offer.max_timeout_s, "asset": offer.asset,
            "extra": {"name": offer.token_name, "version": offer.token_version},
            **({"outputSchema": output_schema} if output_schema else {}),
        }
        for offer in offers if offer.chain_id in V1_NETWORK_NAMES
    ]
    if not accepts:
        return None
    return {"x402Version": 1, "error": error or "X-PAYMENT header is required", "accepts": accepts}


# --- headers -------------------------------------------------------------------------------

def encode_header(obj: dict[str, Any]) -> str:
    """Standard base64 (with padding) of compact UTF-8 JSON, as the x402 SDKs send it."""
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode("utf-8")).decode("ascii")


def decode_header(text: str, max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """Strictly decode base64 JSON into an object; WireError `invalid_payment_header` otherwise.

    Strict as `strict_json` is: bounded nesting checked before parsing, and no key twice (two
    parsers that disagree on which copy wins would verify one payment and settle another)."""
    if not isinstance(text, str) or not text.strip():
        raise WireError("invalid_payment_header", "The payment header is empty.")
    if len(text) > MAX_HEADER_CHARS:
        raise WireError("invalid_payment_header", f"The payment header is over {MAX_HEADER_CHARS} characters.")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WireError("invalid_payment_header", "The payment header is not standard base64.") from None
    try:
        obj = loads_strict(raw, max_depth)
    except JsonRefused as exc:
        if exc.code == "invalid_json":
            raise WireError("invalid_payment_header", "The payment header is not base64 of UTF-8 JSON.") from None
        raise WireError("invalid_payment_header", f"The payment header is refused: {exc.message}") from None
    if not isinstance(obj, dict):
        raise WireError("invalid_payment_header", "The payment header must hold a JSON object.")
    return obj


# --- payments ------------------------------------------------------------------------------

def parse_payment(header_value: str, version_hint: int, max_depth: int = DEFAULT_MAX_DEPTH) -> ExactPayment:
    """Read a `PAYMENT-SIGNATURE` (version_hint 2) or `X-PAYMENT` (1) header into an ExactPayment.

    Only the shape is checked here; whether the payment is good is `rules.check_payment`'s job."""
    if version_hint not in (1, 2):
        raise ValueError("version_hint must be 1 (X-PAYMENT) or 2 (PAYMENT-SIGNATURE)")
    obj = decode_header(header_value, max_depth)
    version = obj.get("x402Version")
    if type(version) is not int or version != version_hint:
        header = "PAYMENT-SIGNATURE" if version_hint == 2 else "X-PAYMENT"
        raise WireError("invalid_x402_version", f"The {header} header must carry x402Version {version_hint}.")
    return payment_from_object(obj)


def payment_from_object(obj: object) -> ExactPayment:
    """Read a decoded x402 `PaymentPayload` (v1 or v2) into an ExactPayment: what a header carries
    once decoded, and what the MCP transport carries as JSON in `_meta["x402/payment"]`."""
    if not isinstance(obj, dict):
        raise WireError("invalid_payment_header", "The payment must be a JSON object.")
    version = obj.get("x402Version")
    if type(version) is not int or version not in (1, 2):
        raise WireError("invalid_x402_version", "The payment must carry x402Version 1 or 2.")
    if version == 2:
        accepted = _check_accepted(obj.get("accepted"))
        scheme, network = accepted["scheme"], accepted["network"]
    else:
        accepted = None
        scheme, network = obj.get("scheme"), obj.get("network")
        if not isinstance(scheme, str) or not isinstance(network, str):
            raise WireError("invalid_payment_header", "A v1 payment needs string `scheme` and `network`.")
    if scheme != SCHEME:
        raise WireError("unsupported_scheme", f"Only the {SCHEME!r} scheme is accepted, not {scheme!r}.")
    network = _caip2_network(network, version)
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise WireError("invalid_payment_header", "The payment has no `payload` object.")
    auth = payload.get("authorization")
    if not isinstance(auth, dict):
        raise WireError("invalid_authorization", "The payload has no EIP-3009 `authorization` object.")
    signature = payload.get("signature")
    if not isinstance(signature, str) or not _SIGNATURE_RE.match(signature):
        raise WireError("invalid_authorization", "The signature must be 0x followed by 65 bytes of hex.")
    nonce = auth.get("nonce")
    if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
        raise WireError("invalid_authorization", "authorization.nonce must be 0x followed by 32 bytes of hex.")
    return ExactPayment(
        x402_version=version, network=network,
        payer=_address(auth.get("from"), "authorization.from"), to=_address(auth.get("to"), "authorization.to"),
        value=_uint(auth.get("value"), "authorization.value"),
        valid_after=_uint(auth.get("validAfter"), "authorization.validAfter"),
        valid_before=_uint(auth.get("validBefore"), "authorization.validBefore"),
        nonce=nonce.lower(), signature=signature.lower(), accepted=accepted,
        identifier=payment_identifier(obj) if version == 2 else None,
    )


def payment_identifier(obj: dict[str, Any]) -> str | None:
    """The id a v2 payment carries in `extensions["payment-identifier"].info.id`, or None when it
    sends none (no extension, or our declaration echoed back without an id, as the SDK does)."""
    extensions = obj.get("extensions")
    if extensions is None:
        return None
    if not isinstance(extensions, dict):
        raise WireError("invalid_payment_header", "The payment's `extensions` must be an object.")
    extension = extensions.get(PAYMENT_IDENTIFIER)
    if extension is None:
        return None
    info = extension.get("info") if isinstance(extension, dict) else None
    if not isinstance(info, dict):
        raise InvalidPaymentIdentifier(f"extensions[{PAYMENT_IDENTIFIER!r}] must be an object with an `info` object.")
    value = info.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or not _PAYMENT_ID_RE.fullmatch(value):
        raise InvalidPaymentIdentifier(
            f"The payment identifier must be {PAYMENT_ID_MIN_CHARS}-{PAYMENT_ID_MAX_CHARS} characters of letters, "
            "digits, '-' and '_' (x402 payment-identifier), e.g. pay_7d5d747be160e280504c099d984bcfe0.")
    return value


def _check_accepted(accepted: object) -> dict[str, Any]:
    if not isinstance(accepted, dict):
        raise WireError("invalid_accepted", "A v2 payment must echo the chosen requirements in `accepted`.")
    for key in ("scheme", "network", "amount", "asset", "payTo"):
        if not isinstance(accepted.get(key), str):
            raise WireError("invalid_accepted", f"accepted.{key} must be a string.")
    if type(accepted.get("maxTimeoutSeconds")) is not int:
        raise WireError("invalid_accepted", "accepted.maxTimeoutSeconds must be an integer.")
    if not isinstance(accepted.get("extra", {}), dict):
        raise WireError("invalid_accepted", "accepted.extra must be an object.")
    return accepted


def _caip2_network(network: str, version: int) -> str:
    if version == 1:
        if network not in _V1_CHAIN_IDS:
            raise WireError("unsupported_network", f"{network!r} is not a v1 network name; use v2 (CAIP-2).")
        return f"eip155:{_V1_CHAIN_IDS[network]}"
    if not _CAIP2_EIP155_RE.match(network):
        raise WireError("unsupported_network", f"{network!r} is not an EVM (eip155) CAIP-2 network.")
    return network


def _address(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.startswith("0x") or not is_address(value):
        raise WireError("invalid_authorization", f"{name} must be a 0x-prefixed 20-byte address.")
    digits = value[2:]
    # Mixed case is an EIP-55 checksum; a wrong one means a mistyped address.
    if digits != digits.lower() and digits != digits.upper() and not is_checksum_address(value):
        raise WireError("invalid_authorization", f"{name} has a wrong EIP-55 checksum.")
    return to_checksum_address(value)


def _uint(value: object, name: str) -> int:
    # x402 sends every integer as a decimal string, so a JSON number is a malformed payment.
    if not isinstance(value, str) or not _UINT_RE.match(value) or int(value) >= 2**256:
        raise WireError("invalid_authorization", f"{name} must be a decimal string of a uint256.")
    return int(value)


# --- receipts ------------------------------------------------------------------------------

def settle_response_header(success: bool, tx_hash: str | None, network: str, payer: str | None,
                           error_reason: str | None = None) -> str:
    """The `PAYMENT-RESPONSE` header: base64 JSON of the SDK's `SettleResponse` shape."""
    return encode_header(settle_response(success, tx_hash, network, payer, error_reason))


def settle_response(success: bool, tx_hash: str | None, network: str, payer: str | None,
                    error_reason: str | None = None) -> dict[str, Any]:
    """The SDK's `SettleResponse` object (the MCP transport sends it as JSON, not base64)."""
    obj: dict[str, Any] = {"success": success, "transaction": tx_hash or "", "network": network}
    if payer is not None:
        obj["payer"] = payer
    if error_reason is not None:
        obj["errorReason"] = error_reason
    return obj
