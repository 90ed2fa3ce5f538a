"""Dashboard pages open to everyone: sign in, sign out, and the public pool catalog."""

from __future__ import annotations

import hmac

from starlette.responses import Response

from agent_gateway.admin.sessions import end_admin_session
from agent_gateway.web.catalog import funding_now, render_pool
from agent_gateway.dashboard.guard import Visit, page
from agent_gateway.dashboard.sessions import SESSION_TTL, Session
from agent_gateway.errors import AuthenticationError, PermissionDenied
from agent_gateway.keys.management import authenticate_management_key, list_management_keys
from agent_gateway.keys.sessions import end_session, start_session
from agent_gateway.keys.tokens import hash_token
from agent_gateway.subscriptions.inventory import seats_available

KEY_FIELD = "management_key"


@page(sign_in=False)
async def index(visit: Visit) -> Response:
    return visit.redirect("/keys" if visit.account else "/signin")


@page(sign_in=False)
async def signin_form(visit: Visit) -> Response:
    if visit.account is not None:
        return visit.redirect("/keys")
    return visit.render("signin.html", title="Sign in", error=None)


@page(sign_in=False)
async def signin(visit: Visit) -> Response:
    services = visit.services
    plaintext = visit.form.get(KEY_FIELD, "").strip()
    if not plaintext:
        return visit.render("signin.html", status=400, title="Sign in", error="Enter your management key (mk_…).")
    try:
        account = await authenticate_management_key(services.db, services.clock, plaintext)
    except (AuthenticationError, PermissionDenied) as exc:
        return visit.render("signin.html", status=exc.status, title="Sign in", error=exc.message)
    # The session keeps the key's id, never the key: find which of the account's keys this is.
    digest = hash_token(plaintext)
    keys = await list_management_keys(services.db, account.id)
    key = next((k for k in keys if hmac.compare_digest(k.key_hash, digest)), None)
    if key is None:  # revoked between the two reads
        return visit.render("signin.html", status=401, title="Sign in", error="The management key is not valid.")
    started = await start_session(services.db, account.id, key.id, services.clock.now(), SESSION_TTL)
    visit.session = Session.signed_in(started.id, started.expires_at)
    return visit.redirect("/keys")


@page(sign_in=False)
async def signout(visit: Visit) -> Response:
    # Ended in the database, not just forgotten by this browser: a copy of the cookie is worthless.
    if visit.session.session_id is not None:
        await end_session(visit.services.db, visit.services.clock, visit.session.session_id)
    if visit.session.admin_session_id is not None:
        await end_admin_session(visit.services.db, visit.services.clock, visit.session.admin_session_id)
    visit.session = Session.anonymous(visit.services.clock.now())
    return visit.redirect("/signin", flash=("info", "You are signed out."))


@page(sign_in=False)
async def pools(visit: Visit) -> Response:
    services = visit.services
    available = await seats_available(services.db, services.catalog)
    pledged = await funding_now(services)
    catalog = [render_pool(pool, services.catalog, available, pledged) for pool in services.catalog.pools.values()]
    return visit.render("pools.html", title="Pools", nav="pools", pools=catalog, blocks=services.catalog.blocks)
