"""The pools file: defaults, and a bad file refused with a message that names the field."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent_gateway.catalog.pools import CatalogError, load_catalog
from agent_gateway.cli import main
from agent_gateway.settings import EXAMPLE_POOLS_FILE

GOOD_POOL = """
[pools.p]
name = "P"
models = ["m"]
upstreams = ["http://127.0.0.1:9000/v1"]
seats = 10
prices = { europe = "49.00" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pools.toml"
    path.write_text(text)
    return path


def test_the_example_file_loads_with_the_default_blocks():
    catalog = load_catalog(EXAMPLE_POOLS_FILE)
    assert {n: b.hours_utc for n, b in catalog.blocks.items()} == {
        "asia": "00:00-08:00", "europe": "08:00-16:00", "americas": "16:00-24:00"}
    assert catalog.pools["kimi26"].prices_atomic == {"asia": 39_000_000, "europe": 49_000_000, "americas": 45_000_000}


def test_blocks_default_when_the_file_names_none(tmp_path):
    catalog = load_catalog(write(tmp_path, GOOD_POOL))
    assert list(catalog.blocks) == ["asia", "europe", "americas"]
    assert catalog.pools["p"].status == "active"
    assert catalog.pools["p"].upstream_api == "openai"


def test_a_pool_may_pass_messages_through_to_an_anthropic_upstream(tmp_path):
    catalog = load_catalog(write(tmp_path, GOOD_POOL + 'upstream_api = "anthropic"\n'))
    assert catalog.pools["p"].upstream_api == "anthropic"


def test_a_funding_round_has_a_goal_in_seats_and_an_optional_deadline(tmp_path):
    catalog = load_catalog(write(tmp_path, GOOD_POOL + 'status = "funding"\n'))
    assert catalog.pools["p"].funding_goal == 10 and catalog.pools["p"].funding_deadline is None  # default: `seats`
    text = GOOD_POOL.replace('europe = "49.00"', 'europe = "49.00", asia = "39.00"') + (
        'status = "funding"\nfunding_goal = 15\nfunding_deadline = 2027-01-31T12:00:00+02:00\n')
    pool = load_catalog(write(tmp_path, text)).pools["p"]
    assert pool.funding_goal == 15  # seats in total: up to 10 in each of two blocks
    assert pool.funding_deadline == datetime(2027, 1, 31, 10, 0, tzinfo=UTC)
    local = load_catalog(write(tmp_path, GOOD_POOL + "funding_deadline = 2027-01-31T00:00:00\n")).pools["p"]
    assert local.funding_deadline == datetime(2027, 1, 31, 0, 0, tzinfo=UTC)  # no offset: read as UTC


@pytest.mark.parametrize(
    "text,field",
    [
        (GOOD_POOL.replace('seats = 10', 'seats = 0'), "pools.p.seats"),
        (GOOD_POOL.replace('seats = 10', 'seats = "10"'), "pools.p.seats"),
        (GOOD_POOL.replace('seats = 10\n', ''), "pools.p.seats"),
        (GOOD_POOL.replace('"49.00"', '"-1"'), "pools.p.prices"),
        (GOOD_POOL.replace('"49.00"', '"49.0000001"'), "pools.p.prices"),
        (GOOD_POOL.replace('"49.00"', '49.0'), "pools.p.prices.europe"),
        (GOOD_POOL.replace('europe =', 'mars ='), "pools.p.prices.mars"),
        (GOOD_POOL.replace('http://127.0.0.1:9000/v1', 'ftp://x'), "pools.p.upstreams"),
        (GOOD_POOL.replace('models = ["m"]', 'models = []'), "pools.p.models"),
        (GOOD_POOL + 'status = "sleeping"\n', "pools.p.status"),
        (GOOD_POOL + 'annual_discount = "1.5"\n', "pools.p.annual_discount"),
        (GOOD_POOL + 'colour = "red"\n', "pools.p.colour"),
        (GOOD_POOL + 'upstream_api = "claude"\n', "pools.p.upstream_api"),
        (GOOD_POOL + 'upstream_api = true\n', "pools.p.upstream_api"),
        ('[blocks]\neurope = "08:00-17:60"\n' + GOOD_POOL, "blocks.europe"),
        ('[pools.BAD]\nname="x"\n', "pools.BAD"),
        (GOOD_POOL + 'funding_goal = 0\n', "pools.p.funding_goal"),
        (GOOD_POOL + 'funding_goal = 11\n', "pools.p.funding_goal"),  # more than 10 seats in its one block
        (GOOD_POOL + 'funding_deadline = "2027-01-31"\n', "pools.p.funding_deadline"),
        (GOOD_POOL + 'funding_deadline = 2027-01-31\n', "pools.p.funding_deadline"),  # a date, not a moment
    ],
)
def test_a_bad_file_names_the_field(tmp_path, text, field):
    with pytest.raises(CatalogError) as exc:
        load_catalog(write(tmp_path, text))
    assert field in str(exc.value), str(exc.value)
    assert str(tmp_path) in str(exc.value)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(write(tmp_path, "[pools\n"))
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "absent.toml")


def test_the_cli_check_command_reports_the_field_and_fails(tmp_path, capsys):
    bad = write(tmp_path, GOOD_POOL.replace('seats = 10', 'seats = -3'))
    assert main(["pools", "check", str(bad)]) == 2
    assert "pools.p.seats" in capsys.readouterr().err
    assert main(["pools", "check", str(write(tmp_path, GOOD_POOL))]) == 0
    assert "pool p (active): 10 seats/block" in capsys.readouterr().out
