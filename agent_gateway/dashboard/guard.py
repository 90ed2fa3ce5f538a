"""Every dashboard request: load the session, re-validate it, refuse forged posts, render errors."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from agent_gateway.admin.sessions import find_live_admin_session
from agent_gateway.web.bodies import read_form
from agent_gateway.dashboard.rendering import PageRenderer
from agent_gateway.dashboard.sessions import (
    COOKIE_NAME,
    CSRF_FIELD,
    Session,
    SessionCodec,
    forgery_problem,
    write_cookie,
)
from agent_gateway.db.models import Account
from agent_gateway.errors import GatewayError, InvalidRequest
from agent_gateway.keys.sessions import find_live_session
from agent_gateway.services import Services

log = logging.getLogger(__name__)

_FORM_TYPE = "application/x-www-form-urlencoded"
_MAX_FORM_BYTES = 16_384
_MAX_FORM_FIELDS = 20


@dataclass
class Dashboard:
    """What every dashboard page needs, built once when the gateway starts."""

    services: Services
    codec: SessionCodec
    pages: PageRenderer

    @property
    def secure_cookies(self) -> bool:
        return self.services.settings.external_url.startswith("https://")


@dataclass
class Visit:
    """One request to the dashboard: who is signed in, the session, and the posted form."""

    request: Request
    dashboard: Dashboard
    session: Session
    account: Account | None = None
    mkey_id: str | None = None
    admin_actor: str | None = None  # an operator signed in to the admin pages, by name
    form: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> Services:
        return self.dashboard.services

    @property
    def base(self) -> str:
        return self.request.scope.get("root_path", "")

    @property
    def site_url(self) -> str:
        """The gateway's own URL, for the examples on the pages: AGW_PUBLIC_URL, never the Host header."""
        return self.services.settings.external_url

    def redirect(self, path: str, flash: tuple[str, str] | None = None) -> Response:
        if flash is not None:
            self.session.flash(*flash)
        return RedirectResponse(self.base + path, status_code=303, headers={"cache-control": "no-store"})

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        context.update(
            base=self.base,
            site=self.site_url,
            account=self.account,
            mkey_id=self.mkey_id,
            admin_actor=self.admin_actor,
            csrf_field=CSRF_FIELD,
            csrf_token=self.session.csrf,
            flashes=self.session.take_flashes(),
            # Pages mention x402 only when this gateway takes it: never a payment path that is off.
            x402=self.services.payments.enabled,
        )
        context.setdefault("nav", "")
        return self.dashboard.pages.render(template, context, status)


Handler = Callable[[Visit], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


def page(*, sign_in: bool = True, back: str | None = None, admin: bool = False) -> Callable[[Handler], Endpoint]:
    """Route decorator. `sign_in`: the page needs a live management key; `admin`: it needs an
    operator's session instead. `back`: where a refused action (a domain error on POST) returns to,
    with the error shown as a message."""

    def decorate(handler: Handler) -> Endpoint:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            dashboard: Dashboard = request.app.state.dashboard
            now = dashboard.services.clock.now()
            session = dashboard.codec.decode(request.cookies.get(COOKIE_NAME), now) or Session.anonymous(now)
            visit = Visit(request, dashboard, session)
            # The forgery check runs against the session the cookie carried, before anything else.
            if request.method == "POST":
                refused = await _refuse_forgery(visit)
                if refused is not None:
                    return refused
            if session.is_signed_in:
                await _identify(visit)
            await _identify_admin(visit)
            if admin and visit.admin_actor is None:
                response = visit.redirect("/admin/signin")
            elif sign_in and not admin and visit.account is None:
                response = visit.redirect("/signin")
            else:
                response = await _run(handler, visit, back)
            if visit.session.changed:
                write_cookie(response, request, dashboard.codec, visit.session, now,
                             secure=dashboard.secure_cookies)
            return response

        return endpoint

    return decorate


async def _identify(visit: Visit) -> None:
    """Look the session up in the database: ended (signed out anywhere), expired, revoked key or
    vanished account all mean "not signed in" from this request on."""
    session, services = visit.session, visit.services
    assert session.session_id is not None
    live = await find_live_session(services.db, services.clock, session.session_id)
    if live is not None:
        visit.account, visit.mkey_id = live
        return
    visit.session = Session.anonymous(services.clock.now())
    visit.session.flash("error", "Your session ended: it was signed out, it expired, or its management key "
                                 "was revoked. Sign in again.")


async def _identify_admin(visit: Visit) -> None:
    """Look the operator's session up in the database: signed out (anywhere, a copied cookie too),
    expired, or opened with an admin token that is no longer the one set all mean "not signed in"."""
    session, services = visit.session, visit.services
    if session.admin_session_id is None:
        return
    token = services.settings.admin_token
    if token is not None:
        actor = await find_live_admin_session(services.db, services.clock, session.admin_session_id,
                                              visit.dashboard.codec.admin_mark(token))
        if actor is not None:
            visit.admin_actor = actor
            return
    visit.session = Session.anonymous(services.clock.now())
    visit.session.flash("error", "Your admin session ended: it was signed out, it expired, or the admin token "
                                 "changed. Sign in again.")


async def _refuse_forgery(visit: Visit) -> Response | None:
    """Parse the form and check it came from our own page; a refusal changes nothing."""
    request = visit.request
    # Anything but our own urlencoded forms carries no token, so it is refused below like a forgery.
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == _FORM_TYPE:
        try:
            visit.form = await read_form(request, _MAX_FORM_BYTES, _MAX_FORM_FIELDS)
        except GatewayError:
            return error_page(visit, 400, "Unreadable form", "The form could not be read. Go back and try again.")
    problem = forgery_problem(request, visit.session, visit.form, visit.site_url)
    if problem is None:
        return None
    log.warning("dashboard refused a cross-site form post path=%s reason=%s", request.url.path, problem)
    return error_page(
        visit, 403, "This form was refused",
        f"{problem} Nothing was changed. If you sent this form yourself, reload the page and try again.",
    )


_TITLES = {400: "That did not work", 401: "Sign in needed", 403: "Not allowed", 404: "Not found",
           409: "That cannot be done now"}


async def _run(handler: Handler, visit: Visit, back: str | None) -> Response:
    try:
        return await handler(visit)
    except GatewayError as exc:
        if visit.request.method == "POST" and back is not None:
            return visit.redirect(back, flash=("error", exc.message))
        return error_page(visit, exc.status, _TITLES.get(exc.status, "Something went wrong"), exc.message)


def error_page(visit: Visit, status: int, title: str, message: str) -> Response:
    return visit.render("error.html", status=status, title=title, message=message)


def form_field(visit: Visit, name: str, label: str) -> str:
    value = visit.form.get(name, "").strip()
    if not value:
        raise InvalidRequest(f"{label} is required.", code="missing_field")
    return value


async def routing_error(request: Request, exc: Exception) -> Response:
    """The dashboard's own 404 and 405, as pages rather than JSON."""
    status = getattr(exc, "status_code", 404)
    title, message = (
        ("Page not found", "There is no dashboard page at this address.") if status == 404
        else ("Not allowed", "This page does not take that kind of request.")
    )
    dashboard: Dashboard = request.app.state.dashboard
    # Shown signed out: no session is read or written for an address that does not exist.
    visit = Visit(request, dashboard, Session.anonymous(dashboard.services.clock.now()))
    return error_page(visit, status, title, message)
