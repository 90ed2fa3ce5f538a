"""Orders: validation against the catalog and prices in atomic units."""

import pytest

from agent_gateway.catalog.pools import load_catalog
from agent_gateway.catalog.pricing import default_order, make_order
from agent_gateway.errors import Conflict, InvalidRequest, NotFound
from tests.conftest import write_pools_file


@pytest.fixture
def catalog(tmp_path):
    return load_catalog(write_pools_file(tmp_path))


def test_a_month_costs_the_sum_of_the_blocks_per_seat(catalog):
    order = make_order(catalog, "alpha", ["europe", "asia"], 3, "month")
    assert order.blocks == ("asia", "europe")  # catalog order
    assert order.unit_price_atomic == 88_000_000
    assert order.total_atomic == 264_000_000
    assert order.period.days == 30
    assert order.quote()["total"] == "264.00"


def test_a_year_is_twelve_months_at_the_annual_discount(catalog):
    order = make_order(catalog, "alpha", ["europe"], 1, "year")
    assert order.unit_price_atomic == 499_800_000  # 49 * 12 * 0.85
    assert order.period.days == 360


@pytest.mark.parametrize(
    "pool,blocks,quantity,cycle,error,code",
    [
        ("nope", ["europe"], 1, "month", NotFound, "pool_not_found"),
        ("resting", ["europe"], 1, "month", Conflict, "pool_paused"),
        ("alpha", [], 1, "month", InvalidRequest, "invalid_blocks"),
        ("alpha", ["europe", "europe"], 1, "month", InvalidRequest, "duplicate_blocks"),
        ("alpha", ["mars"], 1, "month", InvalidRequest, "unknown_block"),
        ("tiny", ["asia"], 1, "month", InvalidRequest, "block_not_offered"),
        ("alpha", ["europe"], 0, "month", InvalidRequest, "invalid_quantity"),
        ("alpha", ["europe"], 101, "month", InvalidRequest, "invalid_quantity"),
        ("alpha", ["europe"], 1, "week", InvalidRequest, "invalid_billing_cycle"),
    ],
)
def test_bad_orders_are_refused_with_a_code(catalog, pool, blocks, quantity, cycle, error, code):
    with pytest.raises(error) as exc:
        make_order(catalog, pool, blocks, quantity, cycle)
    assert exc.value.code == code


def test_the_default_order_is_one_seat_of_the_cheapest_open_block_of_the_first_active_pool(catalog):
    everything_open = {(pool, block): 1 for pool in catalog.pools for block in catalog.pools[pool].prices_atomic}
    order = default_order(catalog, everything_open)
    assert (order.pool.slug, order.blocks, order.quantity, order.billing_cycle) == ("alpha", ("asia",), 1, "month")
    # asia sold out: the next cheapest block; alpha sold out: the next active pool.
    assert default_order(catalog, {**everything_open, ("alpha", "asia"): 0}).blocks == ("americas",)
    alpha_gone = {key: (0 if key[0] == "alpha" else n) for key, n in everything_open.items()}
    assert default_order(catalog, alpha_gone).pool.slug == "tiny"


def test_no_default_order_when_every_active_pool_is_sold_out(catalog):
    only_paused_open = {("resting", "europe"): 5}
    with pytest.raises(Conflict) as raised:
        default_order(catalog, only_paused_open)
    assert raised.value.code == "sold_out"
