"""Pool states after the pools file seeded them: the transitions an operator may make, and the
rules a new pools file must keep against what is sold (pure; the admin service applies them).

    funding ──► activating ──► active ◄──► paused
       │  ▲          │
       │  └──────────┤  (activation called off: back to funding)
       ▼             ▼
     closed ◄────────┘   (the funding round failed; final)

Who moves a pool: `funding → activating` by the pledges reaching the goal (actor `funding-goal`);
`funding → closed` at the `funding_deadline` (`funding-deadline`) and `activating → closed` at the
activation deadline, `activation_days` after entering activating (`activation-deadline`); every
other move, and any of these earlier, by the operator. Entering `active` starts every pledge's
period; entering `closed` cancels every pledge and refunds it (payments.refunds), each in the
transition's own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent_gateway.catalog.pools import Catalog, PoolStatus
from agent_gateway.errors import Conflict

S = PoolStatus
TRANSITIONS: dict[PoolStatus, frozenset[PoolStatus]] = {
    S.FUNDING: frozenset({S.ACTIVATING, S.CLOSED}),
    S.ACTIVATING: frozenset({S.ACTIVE, S.FUNDING, S.CLOSED}),
    S.ACTIVE: frozenset({S.PAUSED}),
    S.PAUSED: frozenset({S.ACTIVE}),
    S.CLOSED: frozenset(),
}


def check_transition(slug: str, current: PoolStatus, target: PoolStatus) -> None:
    """Raise Conflict unless `current → target` is one of TRANSITIONS."""
    if target == current:
        raise Conflict(f"Pool {slug} is already {current}.", code="pool_state_unchanged")
    allowed = TRANSITIONS[current]
    if target not in allowed:
        then = f"it can go to {', '.join(sorted(allowed))}" if allowed else "it is final"
        raise Conflict(f"Pool {slug} is {current} and cannot go to {target}; {then}.",
                       code="invalid_pool_transition")


@dataclass(frozen=True)
class SeededPool:
    """What the database knows of a pool the gateway already serves."""

    status: PoolStatus
    file_status: PoolStatus  # what the pools file said when it seeded the pool


def reload_problems(catalog: Catalog, seeded: dict[str, SeededPool], sold: dict[tuple[str, str], int],
                    in_use: Iterable[tuple[str, str]]) -> list[str]:
    """Why a new pools file may not replace the running one (empty: it may).

    `sold` is seats held per (pool, block); `in_use` the (pool, block) pairs of live subscriptions
    and of payments still settling.
    A file may add pools and blocks and change anything else, but not a known pool's status (states
    change through admin transitions), nor seats below those sold, nor drop what is in use."""
    problems = []
    for slug, known in sorted(seeded.items()):
        pool = catalog.pool(slug)
        if pool is not None and pool.status != known.file_status:
            problems.append(f"pools.{slug}.status: the file says '{pool.status}' but seeded the pool as "
                            f"'{known.file_status}' (now {known.status}); pool states change only through "
                            f"`agent-gateway admin pool-state`, so restore '{known.file_status}'")
    used = set(in_use) | {pair for pair, seats in sold.items() if seats > 0}
    in_use_text = "removed, but live subscriptions, reserved seats or settling payments use it"
    for slug in sorted({slug for slug, _ in used}):
        if catalog.pool(slug) is None:
            problems.append(f"pools.{slug}: {in_use_text}")
    for (slug, block) in sorted(used):
        pool = catalog.pool(slug)
        if pool is not None and block not in pool.prices_atomic:
            problems.append(f"pools.{slug}.prices.{block}: {in_use_text}")
    for (slug, block), seats in sorted(sold.items()):
        pool = catalog.pool(slug)
        if pool is not None and block in pool.prices_atomic and pool.seats < seats:
            problems.append(f"pools.{slug}.seats: {pool.seats} is below the {seats} seats sold in the {block} block")
    return problems
