"""The GatewayError tree: every expected failure, with its HTTP status, type and stable code.

    GatewayError
    ├── InvalidRequest            400 invalid_request_error
    │   ├── BodyTooLarge          413
    │   └── RequestTimeout        408   (the body did not arrive in time)
    ├── AuthenticationError       401 authentication_error
    ├── PermissionDenied          403 permission_error
    ├── NotFound                  404 not_found_error
    ├── Conflict                  409 conflict_error
    ├── PaymentRequired           402 payment_required
    ├── RateLimited               429 rate_limit_error   (concurrency, outside reserved blocks,
    │                                                     too many unauthenticated attempts)
    ├── UpstreamError             502 upstream_error
    │   └── UpstreamTimeout       504
    └── ServiceUnavailable        503 service_unavailable

Domain code raises these; `web.rendering` is the only place that turns them into responses.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}
        # Extra top-level body fields (a price quote on a 402, the blocks on a 429).
        self.extra = extra or {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "body_too_large"


class RequestTimeout(InvalidRequest):
    status = 408
    code = "body_timeout"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PaymentRequired(GatewayError):
    status = 402
    type = "payment_required"
    code = "payment_required"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"
