"""The admin API (`/api/admin/…`, `Bearer <AGW_ADMIN_TOKEN>`): pools and their states, reloading
the pools file, accounts, money, refunds and the audit log. Writes name their actor (X-Admin-Actor)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent_gateway.admin.accounts import parse_adjustment
from agent_gateway.admin.audit import list_records, validate_reason
from agent_gateway.admin.money import MoneySummary
from agent_gateway.admin.pools import PoolReport
from agent_gateway.db.models import Account, AuditRecord, Payment, Refund, RefundState
from agent_gateway.payments.refunds import RefundWallet
from agent_gateway.errors import InvalidRequest
from agent_gateway.money import format_usdc
from agent_gateway.services import Services
from agent_gateway.web.auth import admin
from agent_gateway.web.bodies import CamelBody, read_json, read_optional_json
from agent_gateway.web.catalog import render_funding
from agent_gateway.web.rendering import iso, ok
from agent_gateway.web.views import render_key, render_management_key, render_subscription


class StateBody(CamelBody):
    status: str = Field(min_length=1, max_length=20)
    reason: str = Field(default="", max_length=500)


class ReasonBody(CamelBody):
    reason: str = Field(default="", max_length=500)


class RefundBody(CamelBody):
    # balance | chain; absent: AGW_REFUND_TO.
    to: str | None = Field(default=None, max_length=10)
    reason: str = Field(default="", max_length=500)


class BalanceBody(CamelBody):
    # A signed decimal string in USDC: "25.00" credits, "-25.00" debits.
    amount: str = Field(min_length=1, max_length=40)
    reason: str = Field(min_length=1, max_length=500)


# --- pools ------------------------------------------------------------------------------------

def render_pool_report(report: PoolReport) -> dict[str, Any]:
    pool = report.pool
    return {
        "slug": pool.slug, "name": pool.name, "status": pool.status, "fileStatus": report.file_status,
        "models": list(pool.models), "seatsPerBlock": pool.seats,
        "blocks": [{"block": b.name, "hoursUtc": b.hours_utc, "seats": b.seats, "sold": b.sold, "left": b.left,
                    "price": format_usdc(pool.prices_atomic[b.name])} for b in report.blocks],
        "inFlight": report.in_flight, "liveSubscriptions": report.live_subscriptions,
        # Seats pledged (one per subscription, whatever its blocks) against the goal from the pools file.
        "funding": render_funding(pool, report.pledged),
    }


@admin
async def get_pools(request: Request, services: Services, actor: str) -> Response:
    return ok([render_pool_report(r) for r in await services.admin.pools.report()])


@admin
async def set_pool_state(request: Request, services: Services, actor: str) -> Response:
    body = await read_json(request, StateBody, services.settings)
    slug = request.path_params["slug"]
    await services.admin.pools.set_state(slug, body.status, actor, validate_reason(body.reason))
    report = next(r for r in await services.admin.pools.report() if r.pool.slug == slug)
    return ok(render_pool_report(report))


@admin
async def reload_pools(request: Request, services: Services, actor: str) -> Response:
    body = await read_optional_json(request, ReasonBody, services.settings)
    result = await services.admin.pools.reload(actor, validate_reason(body.reason if body else ""))
    return ok({"changed": result.changed, "sha256": result.version_sha256, "added": result.added,
               "pools": sorted(result.catalog.pools)})


# --- accounts ---------------------------------------------------------------------------------

def render_account(account: Account) -> dict[str, Any]:
    return {"id": account.id, "name": account.name, "walletAddress": account.wallet_address,
            "balance": format_usdc(account.balance_atomic), "disabled": account.disabled_at is not None,
            "disabledAt": iso(account.disabled_at), "createdAt": iso(account.created_at)}


def render_payment(payment: Payment) -> dict[str, Any]:
    return {"id": payment.id, "state": payment.state, "failureReason": payment.failure_reason,
            "method": payment.method, "network": payment.network, "payer": payment.payer,
            "amount": format_usdc(payment.amount_atomic), "amountAtomic": str(payment.amount_atomic),
            "txHash": payment.tx_hash, "pool": payment.pool_slug, "blocks": list(payment.blocks),
            "quantity": payment.quantity, "accountId": payment.account_id, "chainFinal": payment.chain_final,
            "createdAt": iso(payment.created_at), "updatedAt": iso(payment.updated_at)}


@admin
async def search_accounts(request: Request, services: Services, actor: str) -> Response:
    query = request.query_params.get("q")
    if query is None:
        raise InvalidRequest("Give ?q=: an account id, a wallet address, a key prefix or a name.",
                             code="invalid_query")
    return ok([render_account(a) for a in await services.admin.accounts.search(query)])


@admin
async def get_account(request: Request, services: Services, actor: str) -> Response:
    detail = await services.admin.accounts.detail(request.path_params["account_id"])
    subscriptions, keys = [], []
    for view in detail.subscriptions:
        subscriptions.append(render_subscription(view.subscription, view.key))
        if view.key is not None:
            keys.append(render_key(view.key, view.subscription))
    return ok({**render_account(detail.account), "subscriptions": subscriptions, "keys": keys,
               "managementKeys": [{**render_management_key(k), "revokedAt": iso(k.revoked_at)}
                                  for k in detail.management_keys],
               "balanceEntries": [{"id": e.id, "delta": format_usdc(e.delta_atomic), "kind": e.kind, "note": e.note,
                                   "createdAt": iso(e.created_at)} for e in detail.balance_entries],
               "payments": [render_payment(p) for p in detail.payments]})


@admin
async def adjust_balance(request: Request, services: Services, actor: str) -> Response:
    body = await read_json(request, BalanceBody, services.settings)
    amount = parse_adjustment(body.amount)
    account_id = request.path_params["account_id"]
    balance = await services.admin.accounts.adjust_balance(account_id, amount, actor=actor,
                                                           reason=validate_reason(body.reason, required=True))
    return ok({"id": account_id, "balance": format_usdc(balance)})


@admin
async def disable_account(request: Request, services: Services, actor: str) -> Response:
    body = await read_optional_json(request, ReasonBody, services.settings)
    account_id = request.path_params["account_id"]
    key_ids = await services.admin.accounts.disable(account_id, actor=actor,
                                                    reason=validate_reason(body.reason if body else ""))
    return ok({"id": account_id, "disabled": True, "keysRevoked": key_ids})


@admin
async def enable_account(request: Request, services: Services, actor: str) -> Response:
    body = await read_optional_json(request, ReasonBody, services.settings)
    account_id = request.path_params["account_id"]
    key_ids = await services.admin.accounts.enable(account_id, actor=actor,
                                                   reason=validate_reason(body.reason if body else ""))
    return ok({"id": account_id, "disabled": False, "keysEnabled": key_ids})


# --- money ------------------------------------------------------------------------------------

def render_money(summary: MoneySummary) -> dict[str, Any]:
    balances = summary.balances
    return {
        "days": summary.days,
        "revenueByDay": [{"day": day.isoformat(), "pools": {pool: {"amount": format_usdc(a), "payments": n}
                                                            for pool, (a, n) in pools.items()},
                          "total": format_usdc(sum(a for a, _ in pools.values()))}
                         for day, pools in summary.revenue_by_day.items()],
        "revenueByPool": {pool: {"amount": format_usdc(a), "payments": n}
                          for pool, (a, n) in summary.revenue_by_pool.items()},
        "paymentsByState": {state: {"count": n, "amount": format_usdc(a)}
                            for state, (n, a) in sorted(summary.by_state.items())},
        "needsAttention": [{"why": item.why, **render_payment(item.payment)} for item in summary.attention],
        "refundWallet": render_refund_wallet(summary.refund_wallet),
        "balances": None if balances is None else {
            "relayer": balances.relayer_address,
            "relayerNativeWei": None if balances.relayer_native_wei is None else str(balances.relayer_native_wei),
            "payTo": balances.pay_to,
            "payToUsdc": None if balances.pay_to_usdc_atomic is None else format_usdc(balances.pay_to_usdc_atomic),
            "error": balances.error},
    }


@admin
async def get_money(request: Request, services: Services, actor: str) -> Response:
    days = _int_param(request, "days", 30, 1, 366)
    return ok(render_money(await services.admin.money.summary(days)))


# --- refunds ----------------------------------------------------------------------------------

def render_refund(refund: Refund) -> dict[str, Any]:
    return {"id": refund.id, "state": refund.state, "waiting": refund.waiting, "destination": refund.destination,
            "amount": format_usdc(refund.amount_atomic), "amountAtomic": str(refund.amount_atomic),
            "paymentId": refund.payment_id, "subscriptionId": refund.subscription_id,
            "accountId": refund.account_id, "pool": refund.pool_slug, "to": refund.to_address,
            "reason": refund.reason, "note": refund.note, "actor": refund.actor, "from": refund.from_address,
            "nonce": refund.nonce, "txHash": refund.tx_hash, "blockNumber": refund.block_number,
            "createdAt": iso(refund.created_at), "updatedAt": iso(refund.updated_at),
            "finishedAt": iso(refund.finished_at)}


def render_refund_wallet(wallet: RefundWallet | None) -> dict[str, Any] | None:
    if wallet is None:
        return None
    return {"address": wallet.address,
            "usdc": None if wallet.usdc_atomic is None else format_usdc(wallet.usdc_atomic),
            "nativeWei": None if wallet.native_wei is None else str(wallet.native_wei),
            "transferCostWei": None if wallet.transfer_cost_wei is None else str(wallet.transfer_cost_wei),
            "refundsLeftByGas": wallet.refunds_left_by_gas, "outstanding": wallet.outstanding,
            "outstandingAmount": format_usdc(wallet.outstanding_atomic), "error": wallet.error}


@admin
async def refund_payment(request: Request, services: Services, actor: str) -> Response:
    body = await read_optional_json(request, RefundBody, services.settings)
    result = await services.admin.refunds.refund_payment(
        request.path_params["payment_id"], body.to if body else None, actor=actor,
        reason=validate_reason(body.reason if body else ""))
    return ok({**render_refund(result.refund), "payment": render_payment(result.payment),
               "keysRevoked": result.key_ids})


@admin
async def list_refunds(request: Request, services: Services, actor: str) -> Response:
    params = request.query_params
    state = params.get("state")
    if state is not None and state not in {s.value for s in RefundState}:
        raise InvalidRequest(f"state must be one of {', '.join(s.value for s in RefundState)}.",
                             code="invalid_state")
    rows = await services.admin.refunds.list(state=state, payment_id=params.get("payment"), pool=params.get("pool"),
                                             limit=_int_param(request, "limit", 100, 1, 500))
    return ok([render_refund(r) for r in rows])


@admin
async def get_refund(request: Request, services: Services, actor: str) -> Response:
    return ok(render_refund(await services.admin.refunds.get(request.path_params["refund_id"])))


@admin
async def get_refund_wallet(request: Request, services: Services, actor: str) -> Response:
    return ok({"defaultDestination": services.admin.refunds.default_destination,
               "chainRefunds": services.admin.refunds.chain_enabled,
               "wallet": render_refund_wallet(await services.admin.refunds.wallet())})


# --- the audit log ----------------------------------------------------------------------------

def render_audit(row: AuditRecord) -> dict[str, Any]:
    return {"id": row.id, "actor": row.actor, "action": row.action, "target": row.target, "reason": row.reason,
            "before": row.before, "after": row.after, "createdAt": iso(row.created_at)}


@admin
async def get_audit(request: Request, services: Services, actor: str) -> Response:
    params = request.query_params
    rows = await list_records(services.db, limit=_int_param(request, "limit", 100, 1, 1000),
                              actor=params.get("actor"), target=params.get("target"), action=params.get("action"),
                              before_id=params.get("before"))
    return ok([render_audit(r) for r in rows])


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}.", code=f"invalid_{name}")
    return int(raw)


routes = [
    Route("/api/admin/pools", get_pools, methods=["GET"]),
    Route("/api/admin/pools/reload", reload_pools, methods=["POST"]),
    Route("/api/admin/pools/{slug}/state", set_pool_state, methods=["POST"]),
    Route("/api/admin/accounts", search_accounts, methods=["GET"]),
    Route("/api/admin/accounts/{account_id}", get_account, methods=["GET"]),
    Route("/api/admin/accounts/{account_id}/balance", adjust_balance, methods=["POST"]),
    Route("/api/admin/accounts/{account_id}/disable", disable_account, methods=["POST"]),
    Route("/api/admin/accounts/{account_id}/enable", enable_account, methods=["POST"]),
    Route("/api/admin/money", get_money, methods=["GET"]),
    Route("/api/admin/payments/{payment_id}/refund", refund_payment, methods=["POST"]),
    Route("/api/admin/refunds", list_refunds, methods=["GET"]),
    Route("/api/admin/refunds/wallet", get_refund_wallet, methods=["GET"]),
    Route("/api/admin/refunds/{refund_id}", get_refund, methods=["GET"]),
    Route("/api/admin/audit", get_audit, methods=["GET"]),
]
