"""The dashboard as its own small ASGI app: its routes, static files and HTML error pages."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent_gateway.dashboard import account_pages, admin_pages, buy_pages, key_pages, public_pages, usage_pages
from agent_gateway.dashboard.guard import Dashboard, routing_error
from agent_gateway.dashboard.rendering import STATIC_DIR, PageRenderer
from agent_gateway.dashboard.sessions import SessionCodec
from agent_gateway.services import Services


def create_dashboard(services: Services) -> Starlette:
    """Mounted by the gateway at /dashboard. No middleware: sessions and forgery checks are per
    route (see `guard.page`), so nothing here touches the /v1 hot path."""
    app = Starlette(
        routes=[
            Route("/", public_pages.index, methods=["GET"]),
            Route("/signin", public_pages.signin_form, methods=["GET"]),
            Route("/signin", public_pages.signin, methods=["POST"]),
            Route("/signout", public_pages.signout, methods=["POST"]),
            Route("/pools", public_pages.pools, methods=["GET"]),
            Route("/keys", key_pages.keys, methods=["GET"]),
            Route("/keys", key_pages.create_key, methods=["POST"]),
            Route("/keys/{key_id}/{action}", key_pages.confirm_key_action, methods=["GET"]),
            Route("/keys/{key_id}/{action}", key_pages.run_key_action, methods=["POST"]),
            Route("/subscriptions", account_pages.subscriptions, methods=["GET"]),
            Route("/buy", buy_pages.buy_form, methods=["GET"]),
            Route("/buy/review", buy_pages.review, methods=["GET"]),
            Route("/buy", buy_pages.buy, methods=["POST"]),
            Route("/usage", usage_pages.usage, methods=["GET"]),
            Route("/management-keys", account_pages.management_keys, methods=["GET"]),
            Route("/management-keys", account_pages.create_management_key, methods=["POST"]),
            Route("/management-keys/{key_id}/revoke", account_pages.confirm_revoke, methods=["GET"]),
            Route("/management-keys/{key_id}/revoke", account_pages.revoke, methods=["POST"]),
            # The operator's pages (AGW_ADMIN_TOKEN and a name; every change audited).
            Route("/admin/signin", admin_pages.signin_form, methods=["GET"]),
            Route("/admin/signin", admin_pages.signin, methods=["POST"]),
            Route("/admin", admin_pages.pools, methods=["GET"]),
            Route("/admin/pools/reload", admin_pages.reload_pools, methods=["POST"]),
            Route("/admin/pools/{slug}/state", admin_pages.set_pool_state, methods=["POST"]),
            Route("/admin/accounts", admin_pages.accounts, methods=["GET"]),
            Route("/admin/accounts/{account_id}", admin_pages.account, methods=["GET"]),
            Route("/admin/accounts/{account_id}/{action}", admin_pages.account_action, methods=["POST"]),
            Route("/admin/money", admin_pages.money, methods=["GET"]),
            Route("/admin/payments/{payment_id}", admin_pages.payment, methods=["GET"]),
            Route("/admin/payments/{payment_id}/refund", admin_pages.confirm_refund, methods=["GET"]),
            Route("/admin/payments/{payment_id}/refund", admin_pages.refund, methods=["POST"]),
            Route("/admin/audit", admin_pages.audit, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={HTTPException: routing_error},
    )
    app.state.dashboard = Dashboard(services, SessionCodec(services.settings.session_secret), PageRenderer())
    return app
