"""Dashboard account pages: subscriptions with how to pay for seats, and management keys."""

from __future__ import annotations

import json
from datetime import datetime

from starlette.responses import Response

from agent_gateway.catalog.pools import Catalog
from agent_gateway.clock import as_utc
from agent_gateway.dashboard.guard import Visit, form_field, page
from agent_gateway.dashboard.rendering import when
from agent_gateway.dashboard.sessions import Session
from agent_gateway.db.models import ManagementKey, SubscriptionStatus
from agent_gateway.errors import NotFound
from agent_gateway.keys import management as mkeys
from agent_gateway.keys.api_keys import validate_key_name
from agent_gateway.money import format_usdc
from agent_gateway.subscriptions.service import SubscriptionView, list_subscriptions


@page()
async def subscriptions(visit: Visit) -> Response:
    services, account = visit.services, visit.account
    assert account is not None
    catalog = services.catalog
    views = await list_subscriptions(services.db, account.id)
    rows = [_subscription_row(catalog, view, services.clock.now()) for view in views]
    offers = [pool for pool in catalog.pools.values() if pool.status.sells]
    example = offers[0] if offers else None
    example_blocks = [next(iter(example.prices_atomic))] if example else []
    # The renewal example names the seat the user picked (?renew=…), else the first active one.
    active = [v.subscription.id for v in views if v.subscription.status == SubscriptionStatus.ACTIVE]
    picked = visit.request.query_params.get("renew")
    renew_id = picked if picked in active else (active[0] if active else None)
    return visit.render(
        "subscriptions.html", title="Subscriptions", nav="subscriptions", rows=rows, offers=offers,
        blocks=catalog.blocks, balance=format_usdc(account.balance_atomic), example=example,
        renew_id=renew_id, bought=set(visit.request.query_params.get("bought", "").split(",")) - {""},
        subscribe_body=json.dumps({"blocks": example_blocks, "quantity": 1, "billingCycle": "month"}),
        agent_body=json.dumps({"pool": example.slug if example else "POOL", "blocks": example_blocks,
                               "quantity": 1}),
        renew_body=json.dumps({"subscriptionId": renew_id or "SUBSCRIPTION_ID", "billingCycle": "month"}),
    )


def _subscription_row(catalog: Catalog, view: SubscriptionView, now: datetime) -> dict:
    sub = view.subscription
    pool = catalog.pool(sub.pool_slug)
    return {
        "view": view,
        "pool_name": pool.name if pool else sub.pool_slug,
        "blocks": [(b, catalog.blocks[b].hours_utc if b in catalog.blocks else "") for b in sub.blocks],
        "days_left": max(0, (as_utc(sub.period_end) - now).days),
    }


@page(back="/management-keys")
async def management_keys(visit: Visit) -> Response:
    return await _management_keys_page(visit)


@page(back="/management-keys")
async def create_management_key(visit: Visit) -> Response:
    services, account = visit.services, visit.account
    assert account is not None
    name = validate_key_name(form_field(visit, "name", "A key name"))
    key, token = await mkeys.create_management_key(services.db, services.clock, account.id, name)
    return await _management_keys_page(visit, created=key, plaintext=token.plaintext)


@page(back="/management-keys")
async def confirm_revoke(visit: Visit) -> Response:
    key = await _owned_key(visit)
    own = key.id == visit.mkey_id
    explanation = "Requests with this management key are refused from now on."
    if own:
        explanation += " It is the key you signed in with: you will be signed out."
    return visit.render(
        "confirm.html", title="Revoke management key?", nav="management-keys",
        question="Revoke this management key?", explanation=explanation, verb="Revoke", danger=True,
        subject=f"{key.name} ({key.prefix}…{key.last_four})",
        details=[("Created", when(key.created_at)), ("Last used", when(key.last_used_at))],
        cancel="/management-keys",
    )


@page(back="/management-keys")
async def revoke(visit: Visit) -> Response:
    services, account = visit.services, visit.account
    assert account is not None
    key = await _owned_key(visit)
    await mkeys.revoke_management_key(services.db, services.clock, account.id, key.id)
    if key.id == visit.mkey_id:
        visit.session = Session.anonymous(services.clock.now())
        return visit.redirect("/signin", flash=(
            "info", f"Management key “{key.name}” is revoked; you were signed in with it. Sign in with another key."))
    return visit.redirect("/management-keys", flash=("success", f"Management key “{key.name}” is revoked."))


async def _owned_key(visit: Visit) -> ManagementKey:
    assert visit.account is not None
    key_id = visit.request.path_params["key_id"]
    keys = await mkeys.list_management_keys(visit.services.db, visit.account.id)
    key = next((k for k in keys if k.id == key_id), None)
    if key is None:
        raise NotFound("That management key does not exist or was already revoked.",
                       code="management_key_not_found")
    return key


async def _management_keys_page(visit: Visit, created: ManagementKey | None = None,
                                plaintext: str | None = None) -> Response:
    assert visit.account is not None
    keys = await mkeys.list_management_keys(visit.services.db, visit.account.id)
    return visit.render(
        "management_keys.html", title="Management keys", nav="management-keys", keys=keys,
        created=created, plaintext=plaintext, status=201 if created else 200,
    )
