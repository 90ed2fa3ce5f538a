"""Orders: validation against the catalog and prices in atomic units."""

import pytest

from agent_gateway.catalog.pools import load_catalog
from agent_gateway.catalog.pricing import make_order
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
