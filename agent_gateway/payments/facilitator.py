"""The x402 facilitator client: `/verify`, `/settle` and `/supported` over HTTP (httpx, behind this
one adapter), for gateways that settle through a facilitator instead of their own relayer.

The facilitator's answers are facts to check, not to trust: the payment service still reads the
chain itself before it delivers (the Transfer, its confirmations) and resolves every unclear
settlement from the chain (`PaymentService.settle_by_authorization`).

    FacilitatorError                     what the service may see
    ├── FacilitatorUnavailable  503      unreachable, timed out, 5xx, 401/403 (our auth is wrong)
    └── FacilitatorBadAnswer    502      an answer that is not the API's JSON shape
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx

from agent_gateway.errors import GatewayError, ServiceUnavailable, UpstreamError
from agent_gateway.metrics import FACILITATOR_REQUESTS
from agent_gateway.payments.wire import ExactPayment

log = logging.getLogger(__name__)
_TX_HASH_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")
# How much of a refused or unreadable answer is logged (never the auth header, which is ours).
_EXCERPT_CHARS = 200


class FacilitatorError(GatewayError):
    """The facilitator could not give an answer we can use; `detail` says how, in a few words."""

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class FacilitatorUnavailable(FacilitatorError, ServiceUnavailable):
    code = "facilitator_unavailable"


class FacilitatorBadAnswer(FacilitatorError, UpstreamError):
    code = "facilitator_bad_response"


class ConnectFailed(FacilitatorUnavailable):
    """The request never reached the facilitator (no connection): it certainly did nothing."""


@dataclass(frozen=True)
class FacilitatorVerdict:
    """A `/verify` answer: valid, or refused with the facilitator's reason (e.g. insufficient_funds)."""

    valid: bool
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class FacilitatorSettlement:
    """A `/settle` answer. `tx_hash` may be set even when `success` is false (a transaction that
    reverted, or `settlement_pending`): the chain, not this flag, says what it did."""

    success: bool
    tx_hash: str | None
    reason: str | None = None
    message: str | None = None


def payment_payload(payment: ExactPayment, requirements: dict[str, Any], resource_url: str | None) -> dict[str, Any]:
    """The v2 `PaymentPayload` for the facilitator. Always v2 with our own requirements as `accepted`:
    the pure rules have checked the payment against exactly these, and the signature covers only the
    authorization, so a v1 (`X-PAYMENT`) payment is settled the same way."""
    payload: dict[str, Any] = {
        "x402Version": 2,
        "accepted": requirements,
        "payload": {
            "authorization": {
                "from": payment.payer, "to": payment.to, "value": str(payment.value),
                "validAfter": str(payment.valid_after), "validBefore": str(payment.valid_before),
                "nonce": payment.nonce,
            },
            "signature": payment.signature,
        },
    }
    if resource_url is not None:
        payload["resource"] = {"url": resource_url}
    return payload


class FacilitatorClient:
    """One facilitator, one static auth header (sent with every request), one connection pool."""

    def __init__(self, url: str, *, auth_header: tuple[str, str] | None = None, timeout_s: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Accept": "application/json"}
        if auth_header is not None:
            headers[auth_header[0]] = auth_header[1]
        # No redirects: a facilitator that redirects /settle elsewhere is misconfigured, and the
        # auth header must not follow it to another host.
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s, follow_redirects=False,
                                       transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def supported(self) -> set[tuple[int, str, str]]:
        """(x402Version, scheme, network) of every kind the facilitator's `/supported` lists."""
        body = await self._call("GET", "/supported")
        kinds = body.get("kinds")
        if not isinstance(kinds, list):
            raise self._bad("/supported", "no `kinds` list")
        found = set()
        for kind in kinds:
            if not (isinstance(kind, dict) and type(kind.get("x402Version")) is int
                    and isinstance(kind.get("scheme"), str) and isinstance(kind.get("network"), str)):
                raise self._bad("/supported", "a kind without x402Version, scheme and network")
            found.add((kind["x402Version"], kind["scheme"], kind["network"]))
        FACILITATOR_REQUESTS.labels(endpoint="supported", outcome="ok").inc()
        return found

    async def verify(self, payment: ExactPayment, requirements: dict[str, Any],
                     resource_url: str | None = None) -> FacilitatorVerdict:
        body = await self._call("POST", "/verify", self._request(payment, requirements, resource_url))
        valid = body.get("isValid")
        if not isinstance(valid, bool):
            raise self._bad("/verify", "no boolean `isValid`")
        FACILITATOR_REQUESTS.labels(endpoint="verify", outcome="ok" if valid else "refused").inc()
        return FacilitatorVerdict(valid=valid, reason=_text(body.get("invalidReason")),
                                  message=_text(body.get("invalidMessage")))

    async def settle(self, payment: ExactPayment, requirements: dict[str, Any],
                     resource_url: str | None = None) -> FacilitatorSettlement:
        body = await self._call("POST", "/settle", self._request(payment, requirements, resource_url))
        success, transaction = body.get("success"), body.get("transaction", "")
        if not isinstance(success, bool) or not isinstance(transaction, str):
            raise self._bad("/settle", "no boolean `success` or string `transaction`")
        if transaction and not _TX_HASH_RE.match(transaction):
            raise self._bad("/settle", "`transaction` is not a transaction hash")
        if success and not transaction:
            raise self._bad("/settle", "success without a transaction")
        FACILITATOR_REQUESTS.labels(endpoint="settle", outcome="ok" if success else "refused").inc()
        return FacilitatorSettlement(success=success, tx_hash=transaction.lower() or None,
                                     reason=_text(body.get("errorReason")), message=_text(body.get("errorMessage")))

    @staticmethod
    def _request(payment: ExactPayment, requirements: dict[str, Any], resource_url: str | None) -> dict[str, Any]:
        return {"x402Version": 2, "paymentPayload": payment_payload(payment, requirements, resource_url),
                "paymentRequirements": requirements}

    async def _call(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return await self._exchange(method, path, json)
        except FacilitatorUnavailable:
            FACILITATOR_REQUESTS.labels(endpoint=path.strip("/"), outcome="unavailable").inc()
            raise

    async def _exchange(self, method: str, path: str, json: dict[str, Any] | None) -> dict[str, Any]:
        try:
            response = await self._http.request(method, self.url + path, json=json)
        except httpx.ConnectError as exc:
            raise ConnectFailed(f"The x402 facilitator is unreachable ({path}: {type(exc).__name__}); "
                                "retry in a moment.", detail=type(exc).__name__) from exc
        except httpx.HTTPError as exc:
            raise FacilitatorUnavailable(f"The x402 facilitator did not answer {path} ({type(exc).__name__}); "
                                         "retry in a moment.", detail=type(exc).__name__) from exc
        if response.status_code >= 500 or response.status_code in (401, 403, 429):
            log.warning("facilitator %s answered %d: %s", path, response.status_code,
                        response.text[:_EXCERPT_CHARS])
            raise FacilitatorUnavailable(f"The x402 facilitator answered {path} with HTTP {response.status_code}; "
                                         "retry in a moment.", detail=f"HTTP {response.status_code}")
        # The x402 SDK's facilitators answer a refused payment with 200 (isValid/success false);
        # others use 400 with the same body, so any 2xx or 400 body is read.
        if not (200 <= response.status_code < 300 or response.status_code == 400):
            raise self._bad(path, f"HTTP {response.status_code}", response)
        try:
            body = response.json()
        except ValueError:
            raise self._bad(path, "not JSON", response) from None
        if not isinstance(body, dict):
            raise self._bad(path, "not a JSON object", response)
        return body

    @staticmethod
    def _bad(path: str, what: str, response: httpx.Response | None = None) -> FacilitatorBadAnswer:
        FACILITATOR_REQUESTS.labels(endpoint=path.strip("/"), outcome="bad_response").inc()
        if response is not None:
            log.warning("facilitator %s answered nonsense (%s): %s", path, what, response.text[:_EXCERPT_CHARS])
        return FacilitatorBadAnswer(f"The x402 facilitator's answer to {path} is unusable ({what}).", detail=what)


# The x402 SDK's reasons for a refused /verify that have a reason code of our own
# (payments.rules.REASONS), so a buyer reads the same code in both modes.
_OUR_REASONS = {
    "insufficient_funds": "insufficient_balance",
    "invalid_exact_evm_insufficient_balance": "insufficient_balance",
    "invalid_exact_evm_nonce_already_used": "nonce_already_used",
    "invalid_exact_evm_payload_signature": "invalid_signature",
    "invalid_exact_evm_payload_authorization_valid_before": "expired",
    "invalid_exact_evm_payload_authorization_valid_after": "not_yet_valid",
    "invalid_exact_evm_payload_recipient_mismatch": "wrong_recipient",
    "invalid_exact_evm_payload_authorization_value_mismatch": "wrong_amount",
}


def our_reason(facilitator_reason: str | None) -> str | None:
    """Our reason code for a facilitator's refusal reason, or None when we have none for it."""
    return _OUR_REASONS.get(facilitator_reason or "")


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) and value else None
