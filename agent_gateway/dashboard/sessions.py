"""Dashboard sessions: a signed cookie holding the server-side session's id, a CSRF token and flashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

COOKIE_NAME = "agw_dashboard"
SESSION_TTL = timedelta(hours=12)
CSRF_FIELD = "csrf_token"
_MAX_FLASH_CHARS = 400  # at most three flashes: the cookie stays well under 4 KB
_MAX_COOKIE_CHARS = 4096  # browsers keep no larger cookie: anything longer is not ours


@dataclass
class Session:
    """What the cookie carries. Never a key, nor who is signed in: only the id of a server-side
    session (keys.sessions), which every request looks up, so sign-out ends it everywhere."""

    csrf: str
    expires_at: int  # epoch seconds
    session_id: str | None = None
    flashes: list[tuple[str, str]] = field(default_factory=list)
    changed: bool = False
    # An operator's session (admin pages): the id of its server-side row (admin.sessions), which
    # names the operator and is checked on every admin page, so sign-out ends it everywhere.
    admin_session_id: str | None = None

    @classmethod
    def anonymous(cls, now: datetime) -> Session:
        expires_at = int((now + SESSION_TTL).timestamp())
        return cls(csrf=secrets.token_urlsafe(32), expires_at=expires_at, changed=True)

    @classmethod
    def signed_in(cls, session_id: str, expires_at: datetime) -> Session:
        # A fresh CSRF token at sign-in, so a token seen before signing in is worth nothing after.
        return cls(csrf=secrets.token_urlsafe(32), expires_at=int(expires_at.timestamp()),
                   session_id=session_id, changed=True)

    @classmethod
    def admin(cls, admin_session_id: str, expires_at: datetime) -> Session:
        return cls(csrf=secrets.token_urlsafe(32), expires_at=int(expires_at.timestamp()),
                   admin_session_id=admin_session_id, changed=True)

    @property
    def is_signed_in(self) -> bool:
        return self.session_id is not None

    def flash(self, kind: str, text: str) -> None:
        # Flashes ride in the cookie; an error echoing a huge form value must not push it past
        # the browsers' 4 KB limit (the cookie would be dropped, and the message with it).
        if len(text) > _MAX_FLASH_CHARS:
            text = text[: _MAX_FLASH_CHARS - 1] + "…"
        self.flashes = self.flashes[-2:]
        self.flashes.append((kind, text))
        self.changed = True

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        if taken:
            self.changed = True
        return taken


class SessionCodec:
    """Signs and verifies the cookie with HMAC-SHA256 under the deployment's session secret."""

    def __init__(self, secret: str | None) -> None:
        raw = secret.encode() if secret else secrets.token_bytes(32)
        # Derive a key of our own, so the configured secret is never used directly for anything.
        self._key = hmac.new(raw, b"agent_gateway dashboard session v1", hashlib.sha256).digest()

    def encode(self, session: Session) -> str:
        payload = {"c": session.csrf, "e": session.expires_at, "s": session.session_id, "f": session.flashes}
        if session.admin_session_id is not None:
            payload["a"] = session.admin_session_id
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{self._sign(body)}"

    def decode(self, cookie: str | None, now: datetime) -> Session | None:
        """The session in a cookie, or None when it is missing, forged, garbled or expired.

        Anything a client sends may arrive here (non-ASCII, any shape, any size): every failure
        is None, "not signed in", never an exception."""
        if not cookie or len(cookie) > _MAX_COOKIE_CHARS or not cookie.isascii() or cookie.count(".") != 1:
            return None
        body, signature = cookie.split(".")
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            session_id = data["s"]
            if session_id is not None and not isinstance(session_id, str):
                raise TypeError("session id")
            admin_session_id = data.get("a")
            if admin_session_id is not None and not isinstance(admin_session_id, str):
                raise TypeError("admin session id")
            session = Session(
                csrf=str(data["c"]), expires_at=int(data["e"]), session_id=session_id,
                flashes=[(str(kind), str(text)) for kind, text in data["f"]], admin_session_id=admin_session_id,
            )
        except (ValueError, KeyError, TypeError, OverflowError):
            return None
        return session if session.expires_at > now.timestamp() else None

    def admin_mark(self, admin_token: str) -> str:
        """A fingerprint of the admin token under this deployment's key (never the token itself),
        kept with each admin session: a changed token ends them all."""
        return _b64(hmac.new(self._key, b"admin token:" + admin_token.encode(), hashlib.sha256).digest())[:32]

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())


def write_cookie(
    response: Response, request: Request, codec: SessionCodec, session: Session, now: datetime, *, secure: bool
) -> None:
    """`secure` follows AGW_PUBLIC_URL's scheme: the address users reach, not this hop's scheme
    (behind a TLS-terminating proxy the gateway itself only ever sees http)."""
    response.set_cookie(
        COOKIE_NAME, codec.encode(session), max_age=max(0, session.expires_at - int(now.timestamp())),
        path=cookie_path(request), httponly=True, samesite="lax", secure=secure,
    )


def cookie_path(request: Request) -> str:
    return request.scope.get("root_path") or "/"


def forgery_problem(request: Request, session: Session, form: dict[str, str], public_url: str) -> str | None:
    """Why a POST must be refused as cross-site, or None when it comes from our own page."""
    # Browsers send Origin on every POST; Referer is the fallback for the few that do not.
    # "null" (a sandboxed or data: page) stays as it is and is refused below.
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return "The request did not say which page sent it (no Origin or Referer header)."
    try:
        netloc = urlsplit(source).netloc.lower()
    except ValueError:  # e.g. "http://[" — unparseable is not our page
        return "The form was sent from another site."
    # Our page is at the public URL; behind a proxy that rewrites Host (nginx does by default)
    # that is the only match. The Host itself still counts for direct use (e.g. localhost).
    if netloc not in (urlsplit(public_url).netloc.lower(), request.url.netloc.lower()):
        return "The form was sent from another site."
    token = form.get(CSRF_FIELD, "")
    if not token or not hmac.compare_digest(token.encode(), session.csrf.encode()):
        return "The form's security token is missing or does not belong to this session."
    return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
