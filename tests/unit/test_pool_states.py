"""Pool state transitions and the rules a new pools file keeps against what is sold (pure)."""

import pytest

from agent_gateway.catalog.pools import PoolStatus, parse_catalog
from agent_gateway.catalog.states import TRANSITIONS, SeededPool, check_transition, reload_problems
from agent_gateway.errors import Conflict

S = PoolStatus
FILE = """
[blocks]
day = "00:00-12:00"
night = "12:00-24:00"

[pools.alpha]
name = "Alpha"
models = ["m"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 4
prices = { day = "1.00", night = "1.00" }
"""


def test_the_lifecycle_runs_funding_activating_active_and_closed_is_final():
    assert TRANSITIONS[S.FUNDING] == {S.ACTIVATING, S.CLOSED}
    assert TRANSITIONS[S.ACTIVATING] == {S.ACTIVE, S.FUNDING, S.CLOSED}
    assert TRANSITIONS[S.ACTIVE] == {S.PAUSED} and TRANSITIONS[S.PAUSED] == {S.ACTIVE}
    assert TRANSITIONS[S.CLOSED] == set()
    assert set(TRANSITIONS) == set(PoolStatus)
    for current, targets in TRANSITIONS.items():
        for target in PoolStatus:
            if target in targets:
                check_transition("p", current, target)
            else:
                with pytest.raises(Conflict):
                    check_transition("p", current, target)


def test_only_funding_and_active_pools_sell():
    assert {s for s in PoolStatus if s.sells} == {S.FUNDING, S.ACTIVE}


def test_a_file_that_keeps_every_rule_is_accepted():
    catalog = parse_catalog(FILE, "f")
    seeded = {"alpha": SeededPool(S.PAUSED, S.ACTIVE)}  # paused by the operator; the file still says active
    assert reload_problems(catalog, seeded, {("alpha", "day"): 4}, [("alpha", "day")]) == []


def test_every_broken_rule_is_named():
    catalog = parse_catalog(FILE.replace("seats = 4", "seats = 2").replace(', night = "1.00"', "")
                            + '\n[pools.beta]\nname = "B"\nmodels = ["b"]\nupstreams = ["http://x/v1"]\nseats = 1\n'
                              'status = "paused"\nprices = { day = "1.00" }\n', "f")
    seeded = {"alpha": SeededPool(S.ACTIVE, S.ACTIVE), "beta": SeededPool(S.ACTIVE, S.ACTIVE),
              "gone": SeededPool(S.ACTIVE, S.ACTIVE)}
    problems = reload_problems(catalog, seeded, {("alpha", "day"): 3, ("alpha", "night"): 0, ("gone", "day"): 0},
                               [("alpha", "night"), ("gone", "day")])
    assert problems == [
        "pools.beta.status: the file says 'paused' but seeded the pool as 'active' (now active); pool states change "
        "only through `agent-gateway admin pool-state`, so restore 'active'",
        "pools.gone: removed, but live subscriptions, reserved seats or settling payments use it",
        "pools.alpha.prices.night: removed, but live subscriptions, reserved seats or settling payments use it",
        "pools.alpha.seats: 2 is below the 3 seats sold in the day block",
    ]
