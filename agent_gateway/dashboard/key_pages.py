"""Dashboard API key pages: list, create (shown once), and disable, enable or delete with a confirmation."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.responses import Response

from agent_gateway.dashboard.guard import Visit, form_field, page
from agent_gateway.db.models import SubscriptionStatus
from agent_gateway.errors import NotFound
from agent_gateway.keys import api_keys
from agent_gateway.keys.api_keys import KeyView
from agent_gateway.keys.lifecycle import KeyLifecycle
from agent_gateway.subscriptions.service import list_subscriptions


@dataclass(frozen=True)
class KeyAction:
    verb: str
    question: str
    explanation: str
    done: str
    danger: bool
    run: Callable[[KeyLifecycle, str, str], Awaitable[object]]


ACTIONS = {
    "disable": KeyAction(
        "Disable", "Disable this key?",
        "Requests with this key are refused at once (403), including any request still streaming. "
        "You can enable it again later.",
        "disabled; requests with it are refused from now on", True, KeyLifecycle.disable_key,
    ),
    "enable": KeyAction(
        "Enable", "Enable this key?",
        "The key can call the pool's models again during its subscription's blocks.",
        "enabled", False, KeyLifecycle.enable_key,
    ),
    "delete": KeyAction(
        "Delete", "Delete this key?",
        "The key stops working at once and for good. Its subscription keeps its seat, "
        "and you can create a new key for it afterwards.",
        "deleted; its subscription can have a new key", True, KeyLifecycle.delete_key,
    ),
}


@page(back="/keys")
async def keys(visit: Visit) -> Response:
    return await _keys_page(visit)


@page(back="/keys")
async def create_key(visit: Visit) -> Response:
    services, account = visit.services, visit.account
    assert account is not None
    name = api_keys.validate_key_name(form_field(visit, "name", "A key name"))
    subscription_id = form_field(visit, "subscription_id", "A subscription")
    view, token = await api_keys.mint_key(services.db, services.clock, account.id, subscription_id, name)
    # The plaintext is in this response only; the page's script swaps the URL to /keys, so a reload
    # shows the list without it (and without a script, re-posting finds the key exists: 409).
    return await _keys_page(visit, created=view, plaintext=token.plaintext)


@page(back="/keys")
async def confirm_key_action(visit: Visit) -> Response:
    action, view = await _action_and_key(visit)
    return visit.render(
        "confirm.html", title=action.question, nav="keys", question=action.question,
        explanation=action.explanation, verb=action.verb, danger=action.danger,
        subject=f"{view.key.name} ({view.key.prefix}…{view.key.last_four})",
        details=[("Pool", _pool_name(visit, view.subscription.pool_slug)),
                 ("Blocks", ", ".join(view.subscription.blocks)), ("Status", view.key.status)],
        cancel="/keys",
    )


@page(back="/keys")
async def run_key_action(visit: Visit) -> Response:
    action, view = await _action_and_key(visit)
    assert visit.account is not None
    await action.run(visit.services.keys, visit.account.id, view.key.id)
    return visit.redirect("/keys", flash=("success", f"Key “{view.key.name}” {action.done}."))


async def _action_and_key(visit: Visit) -> tuple[KeyAction, KeyView]:
    assert visit.account is not None
    action = ACTIONS.get(visit.request.path_params["action"])
    if action is None:
        raise NotFound("There is no such action on a key.", code="route_not_found")
    key_id = visit.request.path_params["key_id"]
    views = await api_keys.list_keys(visit.services.db, visit.account.id)
    view = next((v for v in views if v.key.id == key_id), None)
    if view is None:
        raise NotFound("That API key does not exist or was deleted.", code="api_key_not_found")
    return action, view


async def _keys_page(visit: Visit, created: KeyView | None = None, plaintext: str | None = None) -> Response:
    services, account = visit.services, visit.account
    assert account is not None
    views = await api_keys.list_keys(services.db, account.id)
    subscriptions = await list_subscriptions(services.db, account.id)
    # A pledge's key can be made before its pool is live (inference is refused until then).
    keyless = [s.subscription for s in subscriptions
               if s.subscription.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING) and s.key is None]
    return visit.render(
        "keys.html", title="API keys", nav="keys", views=views, keyless=keyless,
        has_subscriptions=bool(subscriptions), created=created, plaintext=plaintext,
        pool_names={slug: pool.name for slug, pool in services.catalog.pools.items()},
        preselect=visit.request.query_params.get("subscription"),  # "Create its key" on Subscriptions
        status=201 if created else 200,
    )


def _pool_name(visit: Visit, slug: str) -> str:
    pool = visit.services.catalog.pool(slug)
    return pool.name if pool else slug
