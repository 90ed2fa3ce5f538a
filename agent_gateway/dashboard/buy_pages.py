"""Dashboard "Buy seats": choose pool, blocks, quantity and cycle, review the exact price, confirm.

The price comes from the API's own pricing (`make_order`, `Order.quote`) and the purchase goes
through the API's own service (`subscribe_with_balance`): the browser is one more client of both,
never a second purchase path. A browser cannot sign an x402 payment, so it pays from the prepaid
balance only."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from agent_gateway.catalog.pools import Pool
from agent_gateway.catalog.pricing import BILLING_CYCLES, MAX_QUANTITY, Order, make_order
from agent_gateway.dashboard.guard import Visit, page
from agent_gateway.errors import GatewayError, InvalidRequest, PaymentRequired
from agent_gateway.money import format_usdc
from agent_gateway.subscriptions.inventory import seats_available
from agent_gateway.db.models import SubscriptionStatus
from agent_gateway.subscriptions.service import subscribe_with_balance


@page()
async def buy_form(visit: Visit) -> Response:
    query = visit.request.query_params
    return await _form_page(visit, query.get("pool"), query.getlist("blocks"), query.get("quantity", "1"),
                            query.get("cycle", "month"))


@page()
async def review(visit: Visit) -> Response:
    """The confirmation: what exactly will be bought, for how much, and the balance after. Writes nothing."""
    query = visit.request.query_params
    pool, blocks, quantity, cycle = (query.get("pool", ""), query.getlist("blocks"), query.get("quantity", ""),
                                     query.get("cycle", "month"))
    try:
        order = _order(visit, pool, blocks, quantity, cycle)
    except GatewayError as exc:
        return await _form_page(visit, pool, blocks, quantity, cycle, error=exc.message, status=exc.status)
    assert visit.account is not None
    balance = visit.account.balance_atomic
    available = await seats_available(visit.services.db, visit.services.catalog)
    short_blocks = [b for b in order.blocks if available.get((order.pool.slug, b), 0) < order.quantity]
    if short_blocks:
        left = ", ".join(f"{b}: {available.get((order.pool.slug, b), 0)}" for b in short_blocks)
        return await _form_page(visit, pool, blocks, quantity, cycle, status=409,
                                error=f"Not enough seats left for {order.quantity} more ({left} left). "
                                      "Choose fewer seats or other blocks.")
    return visit.render(
        "buy_review.html", title="Confirm your order", nav="subscriptions", order=order, quote=order.quote(),
        blocks=visit.services.catalog.blocks, balance=balance, after=balance - order.total_atomic,
        short=_short_balance_message(visit, order, balance) if balance < order.total_atomic else None,
        form={"pool": order.pool.slug, "blocks": ",".join(order.blocks), "quantity": str(order.quantity),
              "cycle": order.billing_cycle},
        status=402 if balance < order.total_atomic else 200,
    )


@page(back="/buy")
async def buy(visit: Visit) -> Response:
    """The confirmed order (CSRF-checked POST): bought from the balance by the API's own service."""
    services, account = visit.services, visit.account
    assert account is not None
    form = visit.form
    order = _order(visit, form.get("pool", ""), form.get("blocks", "").split(","), form.get("quantity", ""),
                   form.get("cycle", ""))
    # The total shown on the confirmation; a catalog changed since then must not charge a new price.
    if form.get("total") != str(order.total_atomic):
        raise InvalidRequest("The price changed since you reviewed this order. Review it again.",
                             code="price_changed")
    try:
        bought = await subscribe_with_balance(services.db, services.clock, services.catalog, account.id, order)
    except PaymentRequired:
        return visit.redirect("/buy", flash=("error", _short_balance_message(visit, order, account.balance_atomic)))
    await services.admin.funding.pledged(order.pool.slug)  # a pledge may have reached the pool's goal
    seats = f"{len(bought)} seat{'s' if len(bought) != 1 else ''}"
    pledged = any(s.status == SubscriptionStatus.PENDING for s in bought)
    return visit.redirect(
        "/subscriptions?bought=" + ",".join(s.id for s in bought),
        flash=("success", f"{'Pledged' if pledged else 'Bought'} {seats} on {order.pool.name} "
                          f"({', '.join(order.blocks)}) for {format_usdc(order.total_atomic)} USDC from the prepaid "
                          "balance. " + ("The pool is still funding: each seat's period starts when it goes active; "
                                         "its key can be created now." if pledged
                                         else "Create each seat's API key to use it.")),
    )


def _order(visit: Visit, pool: str, blocks: list[str], quantity: str, cycle: str) -> Order:
    blocks = [b for b in blocks if b]
    try:
        count = int(quantity)
    except ValueError:
        raise InvalidRequest(f"Quantity must be a whole number from 1 to {MAX_QUANTITY}.",
                             code="invalid_quantity") from None
    if not blocks:
        raise InvalidRequest("Choose at least one block.", code="invalid_blocks")
    return make_order(visit.services.catalog, pool, blocks, count, cycle)


def _short_balance_message(visit: Visit, order: Order, balance: int) -> str:
    assert visit.account is not None
    message = (f"This order costs {format_usdc(order.total_atomic)} USDC and the prepaid balance is "
               f"{format_usdc(balance)} USDC. Add at least {format_usdc(order.total_atomic - balance)} USDC: "
               f"the operator runs agent-gateway accounts credit {visit.account.id} AMOUNT. Or buy fewer seats.")
    if visit.services.payments.enabled:
        message += (" This gateway also takes USDC over x402, but that needs a wallet signing the payment, "
                    "which this page cannot do: an agent or script pays with POST /api/pools/"
                    f"{order.pool.slug}/subscribe and a PAYMENT-SIGNATURE header.")
    return message


async def _form_page(visit: Visit, pool_slug: str | None, blocks: list[str], quantity: str, cycle: str, *,
                     error: str | None = None, status: int = 200) -> Response:
    catalog = visit.services.catalog
    offers = [p for p in catalog.pools.values() if p.status.sells]
    chosen = catalog.pool(pool_slug or "") if pool_slug else None
    if chosen is None or not chosen.status.sells:
        chosen = offers[0] if offers else None
    available = await seats_available(visit.services.db, catalog)
    assert visit.account is not None
    return visit.render(
        "buy.html", title="Buy seats", nav="subscriptions", offers=offers, pool=chosen, error=error,
        status=status, blocks=catalog.blocks, rows=_block_rows(chosen, available) if chosen else [],
        picked=set(blocks), quantity=quantity, cycle=cycle if cycle in BILLING_CYCLES else "month",
        max_quantity=MAX_QUANTITY, balance=visit.account.balance_atomic,
    )


def _block_rows(pool: Pool, available: Mapping[tuple[str, str], int]) -> list[dict]:
    return [{"name": name, "price": price, "left": available.get((pool.slug, name), 0)}
            for name, price in pool.prices_atomic.items()]
