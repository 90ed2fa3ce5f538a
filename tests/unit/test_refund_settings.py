"""The refund settings and the pools file's activation deadline, validated at start."""

from __future__ import annotations

import pytest

from agent_gateway.catalog.pools import CatalogError, parse_catalog
from agent_gateway.settings import Settings

RELAYER = "0x" + "11" * 32
REFUND = "0x" + "22" * 32
CHAIN = {"chain_rpc_url": "http://127.0.0.1:8545", "chain_id": 31337, "usdc_address": "0x" + "33" * 20,
         "pay_to": "0x" + "44" * 20, "relayer_key": RELAYER}


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_refunds_go_to_the_balance_unless_the_operator_chooses_the_chain():
    assert settings().refund_to == "balance" and settings().refund_private_key is None
    chosen = settings(**CHAIN, refund_to="chain", refund_private_key=REFUND)
    assert chosen.refund_to == "chain" and REFUND not in repr(chosen)


@pytest.mark.parametrize(("values", "message"), [
    ({**CHAIN, "refund_to": "chain"}, "AGW_REFUND_TO=chain needs AGW_REFUND_PRIVATE_KEY"),
    ({**CHAIN, "refund_private_key": RELAYER}, "must not be AGW_RELAYER_KEY"),
    ({**CHAIN, "refund_private_key": RELAYER.removeprefix("0x").upper()}, "must not be AGW_RELAYER_KEY"),
    ({**CHAIN, "refund_private_key": "0x1234"}, "must be a private key"),
    ({"refund_private_key": REFUND}, "x402 payments are off"),
    ({**CHAIN, "refund_to": "wallet"}, "refund_to"),
])
def test_bad_refund_settings_are_refused_naming_the_variable_never_the_key(values, message):
    with pytest.raises(ValueError, match=message) as refused:
        settings(**values)
    assert REFUND.removeprefix("0x") not in str(refused.value) and RELAYER.removeprefix("0x") not in str(refused.value)


POOL = """
[blocks]
day = "00:00-24:00"

[pools.round]
name = "Round"
models = ["m"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 2
status = "funding"
prices = {{ day = "1.00" }}
{extra}
"""


@pytest.mark.parametrize(("extra", "days"), [("", 14.0), ("activation_days = 3", 3.0),
                                             ("activation_days = 0.5", 0.5)])
def test_the_activation_deadline_defaults_to_two_weeks(extra, days):
    assert parse_catalog(POOL.format(extra=extra), "pools.toml").pools["round"].activation_days == days


@pytest.mark.parametrize("extra", ["activation_days = 0", "activation_days = -1", "activation_days = 366",
                                   'activation_days = "3"', "activation_days = nan"])
def test_a_bad_activation_deadline_is_refused_naming_the_field(extra):
    with pytest.raises(CatalogError, match="pools.round.activation_days"):
        parse_catalog(POOL.format(extra=extra), "pools.toml")
