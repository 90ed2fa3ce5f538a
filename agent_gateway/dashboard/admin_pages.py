"""The operator's pages (/dashboard/admin): sign in with the admin token and a name, then pools,
accounts, money, a page per payment (where it is refunded) and the audit log, each change made
through the same admin services as the API."""

from __future__ import annotations

from starlette.responses import Response

from agent_gateway.admin.accounts import parse_adjustment
from agent_gateway.admin.audit import list_records, validate_actor, validate_reason
from agent_gateway.admin.sessions import start_admin_session
from agent_gateway.catalog.pools import PoolStatus
from agent_gateway.catalog.states import TRANSITIONS
from agent_gateway.dashboard.guard import Visit, form_field, page
from agent_gateway.dashboard.rendering import when
from agent_gateway.dashboard.sessions import SESSION_TTL, Session
from agent_gateway.db.models import RefundDestination
from agent_gateway.errors import GatewayError, InvalidRequest
from agent_gateway.money import format_usdc
from agent_gateway.payments.ledger import refundable_atomic
from agent_gateway.payments.refunds import REFUNDABLE_STATES, destination_of
from agent_gateway.web.auth import admin_token_matches

ADMIN_SESSION_TTL = SESSION_TTL
REFUNDS_SHOWN = 50


@page(sign_in=False)
async def signin_form(visit: Visit) -> Response:
    if visit.admin_actor is not None:
        return visit.redirect("/admin")
    return visit.render("admin_signin.html", title="Operator sign in", error=None)


@page(sign_in=False)
async def signin(visit: Visit) -> Response:
    settings = visit.services.settings
    token = visit.form.get("admin_token", "").strip()
    if settings.admin_token is None or not admin_token_matches(token, settings.admin_token):
        return visit.render("admin_signin.html", status=401, title="Operator sign in",
                            error="The admin token is not valid." if settings.admin_token else
                            "The admin pages are off: AGW_ADMIN_TOKEN is not set on this gateway.")
    try:
        actor = validate_actor(visit.form.get("actor"))
    except InvalidRequest as exc:
        return visit.render("admin_signin.html", status=400, title="Operator sign in", error=exc.message)
    started = await start_admin_session(visit.services.db, actor, visit.dashboard.codec.admin_mark(token),
                                        visit.services.clock.now(), ADMIN_SESSION_TTL)
    # A fresh session: whoever was signed in on this browser before is signed out.
    visit.session = Session.admin(started.id, started.expires_at)
    return visit.redirect("/admin", flash=("success", f"Signed in as operator {actor}."))


@page(admin=True)
async def pools(visit: Visit) -> Response:
    reports = await visit.services.admin.pools.report()
    moves = {str(s): sorted(str(t) for t in targets) for s, targets in TRANSITIONS.items()}
    return visit.render("admin_pools.html", title="Operator · pools", nav="admin", reports=reports, moves=moves,
                        funding=(PoolStatus.FUNDING, PoolStatus.ACTIVATING))


@page(admin=True, back="/admin")
async def set_pool_state(visit: Visit) -> Response:
    slug = visit.request.path_params["slug"]
    status = form_field(visit, "status", "The new state")
    await visit.services.admin.pools.set_state(slug, status, _actor(visit), validate_reason(visit.form.get("reason")))
    return visit.redirect("/admin", flash=("success", f"Pool {slug} is now {status}."))


@page(admin=True, back="/admin")
async def reload_pools(visit: Visit) -> Response:
    result = await visit.services.admin.pools.reload(_actor(visit), validate_reason(visit.form.get("reason")))
    said = "applied" if result.changed else "unchanged"
    return visit.redirect("/admin", flash=("success", f"Pools file {said} (version {result.version_sha256[:12]})."))


@page(admin=True)
async def accounts(visit: Visit) -> Response:
    query = visit.request.query_params.get("q", "").strip()
    found, error = [], None
    if query:
        try:
            found = await visit.services.admin.accounts.search(query)
        except GatewayError as exc:
            error = exc.message
    return visit.render("admin_accounts.html", title="Operator · accounts", nav="admin-accounts", query=query,
                        found=found, error=error)


@page(admin=True)
async def account(visit: Visit) -> Response:
    detail = await visit.services.admin.accounts.detail(visit.request.path_params["account_id"])
    return visit.render("admin_account.html", title=f"Operator · {detail.account.name}", nav="admin-accounts",
                        detail=detail)


@page(admin=True, back="/admin/accounts")
async def account_action(visit: Visit) -> Response:
    account_id, action = visit.request.path_params["account_id"], visit.request.path_params["action"]
    accounts_admin, actor = visit.services.admin.accounts, _actor(visit)
    back = f"/admin/accounts/{account_id}"
    try:
        if action in ("credit", "debit"):
            amount = parse_adjustment(form_field(visit, "amount", "The amount").lstrip("+"))
            if amount < 0:
                raise InvalidRequest("Give the amount without a sign; choose credit or debit.", code="invalid_amount")
            reason = validate_reason(visit.form.get("reason"), required=True)
            await accounts_admin.adjust_balance(account_id, amount if action == "credit" else -amount, actor=actor,
                                                reason=reason)
        elif action == "disable":
            await accounts_admin.disable(account_id, actor=actor, reason=validate_reason(visit.form.get("reason")))
        elif action == "enable":
            await accounts_admin.enable(account_id, actor=actor, reason=validate_reason(visit.form.get("reason")))
        else:
            raise InvalidRequest("No such account action.", code="unknown_action")
    except GatewayError as exc:
        return visit.redirect(back, flash=("error", exc.message))
    return visit.redirect(back, flash=("success", f"Done: {action}."))


@page(admin=True)
async def money(visit: Visit) -> Response:
    admin = visit.services.admin
    summary = await admin.money.summary(30)
    refunds = await admin.refunds.list(limit=REFUNDS_SHOWN)
    return visit.render("admin_money.html", title="Operator · money", nav="admin-money", summary=summary,
                        refunds=refunds, chain_refunds=admin.refunds.chain_enabled)


@page(admin=True)
async def payment(visit: Visit) -> Response:
    admin = visit.services.admin
    detail = await admin.money.payment(visit.request.path_params["payment_id"])
    refunds = await admin.refunds.list(payment_id=detail.payment.id)
    refundable = detail.payment.state in REFUNDABLE_STATES and not refunds
    return visit.render("admin_payment.html", title=f"Operator · payment {detail.payment.id}", nav="admin-money",
                        detail=detail, refunds=refunds, refundable=refundable,
                        chain_refunds=admin.refunds.chain_enabled, default_to=str(admin.refunds.default_destination))


@page(admin=True, back="/admin/money")
async def confirm_refund(visit: Visit) -> Response:
    """The refund form asks here first: what goes back where, and what it cancels."""
    admin = visit.services.admin
    payment_id = visit.request.path_params["payment_id"]
    params = visit.request.query_params
    try:
        to = destination_of(params.get("to"), admin.refunds.default_destination)
        reason = validate_reason(params.get("reason"), required=True)
    except GatewayError as exc:
        return visit.redirect(f"/admin/payments/{payment_id}", flash=("error", exc.message))
    detail = await admin.money.payment(payment_id)
    p = detail.payment
    live = [v for v in detail.subscriptions if v.subscription.status in ("active", "pending")]
    where = (f"the paying wallet {p.payer}, on-chain from the refund wallet" if to == RefundDestination.CHAIN
             else f"account {p.account_id}'s prepaid balance")
    return visit.render(
        "confirm.html", title="Refund this payment?", nav="admin-money", question="Refund this payment?",
        subject=f"{format_usdc(refundable_atomic(p))} USDC to {where}",
        details=[("Pool", p.pool_slug), ("Paid", when(p.created_at)), ("Subscriptions canceled", str(len(live)))],
        explanation=f"Payment {p.id}: the subscriptions it bought are canceled and their keys refused at once, in "
                    "every process. A refund cannot be undone."
                    + ("" if p.chain_final else " The payment is not past the reorg horizon yet: the refund waits "
                                                "until it is, and is then made by the background pass.")
                    + f" Reason recorded in the audit log: {reason}",
        verb="Refund", danger=True, cancel=f"/admin/payments/{payment_id}",
        hidden=[("to", str(to)), ("reason", reason)],
    )


@page(admin=True, back="/admin/money")
async def refund(visit: Visit) -> Response:
    payment_id = visit.request.path_params["payment_id"]
    back = f"/admin/payments/{payment_id}"
    try:
        result = await visit.services.admin.refunds.refund_payment(
            payment_id, visit.form.get("to") or None, actor=_actor(visit),
            reason=validate_reason(visit.form.get("reason"), required=True))
    except GatewayError as exc:
        return visit.redirect(back, flash=("error", exc.message))
    r = result.refund
    said = f"Refund {r.id}: {format_usdc(r.amount_atomic)} USDC to the {r.destination}, {r.state}"
    if r.waiting:
        said += f" (waiting: {r.waiting.replace('_', ' ')})"
    if result.key_ids:
        said += f"; {len(result.key_ids)} key(s) revoked"
    return visit.redirect(back, flash=("success", said + "."))


@page(admin=True)
async def audit(visit: Visit) -> Response:
    rows = await list_records(visit.services.db, limit=200)
    return visit.render("admin_audit.html", title="Operator · audit log", nav="admin-audit", rows=rows)


def _actor(visit: Visit) -> str:
    assert visit.admin_actor is not None  # page(admin=True) let only operators in
    return visit.admin_actor
