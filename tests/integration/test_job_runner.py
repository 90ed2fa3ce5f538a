"""Background passes on one database run in one process at a time: a process whose pass is running
elsewhere skips it that interval (and counts the skip), takes it up once the other is done or has
died, and within a process an explicit run waits for the loop's run instead of skipping it.

"Another process" is a second `Database` on the same URL (its own connection pool, so its own
PostgreSQL sessions, which is what an advisory lock is held by), and, for a process that dies
holding a pass, a real child process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from agent_gateway.db.engine import Database, lock_key
from agent_gateway.jobs.runner import JobRunner
from agent_gateway.metrics import BACKGROUND_PASSES

pytestmark = pytest.mark.anyio


def counted(name: str, outcome: str) -> float:
    return BACKGROUND_PASSES.labels(name, outcome)._value.get()


@pytest.fixture
async def two_databases(database_url: str) -> AsyncIterator[tuple[Database, Database]]:
    first, second = Database(database_url), Database(database_url)
    try:
        yield first, second
    finally:
        await first.dispose()
        await second.dispose()


class Gate:
    """A pass that records each run and, while `hold` is set, waits inside until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.inside = asyncio.Event()
        self.release = asyncio.Event()
        self.hold = True

    async def __call__(self) -> None:
        self.runs += 1
        if self.hold:
            self.inside.set()
            await self.release.wait()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_pass_running_in_one_process_is_skipped_by_the_other_then_taken_up(two_databases):
    first_db, second_db = two_databases
    a_pass, b_pass = Gate(), Gate()
    b_pass.hold = False
    a = JobRunner(60, {"reorgs": a_pass}, exclusive=first_db.exclusive)
    b = JobRunner(60, {"reorgs": b_pass}, exclusive=second_db.exclusive)
    skipped_before, ran_before = counted("reorgs", "skipped"), counted("reorgs", "ran")

    running = asyncio.create_task(a.run_pass("reorgs"))
    await asyncio.wait_for(a_pass.inside.wait(), 10)
    assert await b.run_pass("reorgs") == "skipped"
    assert b_pass.runs == 0
    assert counted("reorgs", "skipped") == skipped_before + 1

    a_pass.release.set()
    assert await asyncio.wait_for(running, 10) == "ran"
    assert await b.run_pass("reorgs") == "ran"
    assert (a_pass.runs, b_pass.runs) == (1, 1)
    assert counted("reorgs", "ran") == ran_before + 2


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_only_the_running_pass_is_held_other_passes_run_in_the_other_process(two_databases):
    first_db, second_db = two_databases
    reorgs, refunds = Gate(), Gate()
    refunds.hold = False
    a = JobRunner(60, {"reorgs": reorgs}, exclusive=first_db.exclusive)
    b = JobRunner(60, {"reorgs": Gate(), "refunds": refunds}, exclusive=second_db.exclusive)
    running = asyncio.create_task(a.run_pass("reorgs"))
    await asyncio.wait_for(reorgs.inside.wait(), 10)
    assert await b.run_pass("refunds") == "ran"
    assert refunds.runs == 1
    reorgs.release.set()
    await running


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_failing_pass_lets_go_of_its_claim(two_databases):
    first_db, second_db = two_databases

    async def broken() -> None:
        raise RuntimeError("the chain is down")

    ran = Gate()
    ran.hold = False
    failed_before = counted("payments", "failed")
    assert await JobRunner(60, {"payments": broken}, exclusive=first_db.exclusive).run_pass("payments") == "failed"
    assert counted("payments", "failed") == failed_before + 1
    assert await JobRunner(60, {"payments": ran}, exclusive=second_db.exclusive).run_pass("payments") == "ran"


HOLDER = """
import sys, psycopg
with psycopg.connect(sys.argv[1]) as connection:
    held = connection.execute("SELECT pg_try_advisory_xact_lock(%s)", (int(sys.argv[2]),)).fetchone()[0]
    print("held" if held else "not held", flush=True)
    sys.stdin.read()  # until killed
"""


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_process_that_dies_mid_pass_does_not_hold_the_pass_for_ever(database_url, two_databases):
    db, _ = two_databases
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, database_url, str(lock_key("pass:refunds"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        gate = Gate()
        gate.hold = False
        runner = JobRunner(60, {"refunds": gate}, exclusive=db.exclusive)
        assert await runner.run_pass("refunds") == "skipped"
        holder.kill()
        holder.wait(10)
        # PostgreSQL ends the dead client's session when it sees the socket close; bounded wait.
        deadline = time.monotonic() + 10
        while await runner.run_pass("refunds") != "ran":
            assert time.monotonic() < deadline, "the dead process's claim was never released"
            await asyncio.sleep(0.05)  # polling the claim, bounded by the deadline
        assert gate.runs == 1
    finally:
        holder.kill()
        holder.wait(10)


async def test_within_a_process_an_explicit_run_waits_for_the_loops_run_and_then_runs(two_databases):
    """Both databases (SQLite: always held; PostgreSQL: the claim is taken once, in turn)."""
    db, _ = two_databases
    gate = Gate()
    runner = JobRunner(60, {"expiry": gate}, exclusive=db.exclusive)
    loops = asyncio.create_task(runner.run_pass("expiry"))
    await asyncio.wait_for(gate.inside.wait(), 10)
    explicit = asyncio.create_task(runner.run_pass("expiry"))
    for _ in range(20):  # turns of the loop: without the wait, the explicit run would be inside by now
        await asyncio.sleep(0)
    assert gate.runs == 1 and not explicit.done()
    gate.hold = False
    gate.release.set()
    assert await asyncio.wait_for(loops, 10) == "ran"
    assert await asyncio.wait_for(explicit, 10) == "ran"
    assert gate.runs == 2


async def test_the_runner_of_a_served_gateway_claims_its_passes_on_the_database(gateway):
    """The served gateway's runner takes each pass's claim on its own database."""
    runner = gateway.services.jobs
    assert runner.exclusive == gateway.services.db.exclusive
    await runner.stop()  # its own loop, running a pass of its own at the wrong moment, would take the claim first
    other = Database(gateway.services.settings.database_url)
    try:
        gate = Gate()
        own = JobRunner(60, {"expiry": gate}, exclusive=other.exclusive)
        task = asyncio.create_task(own.run_pass("expiry"))
        await asyncio.wait_for(gate.inside.wait(), 10)
        expected = "ran" if other.url.startswith("sqlite") else "skipped"
        assert await runner.run_pass("expiry") == expected
        gate.release.set()
        await task
    finally:
        await other.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_stuck_pass_is_stopped_and_lets_go_of_its_claim(two_databases):
    first_db, second_db = two_databases
    stuck, later = Gate(), Gate()  # `stuck` is never released
    later.hold = False
    failed_before = counted("funding", "failed")
    a = JobRunner(60, {"funding": stuck}, exclusive=first_db.exclusive, pass_timeout_s=0.5)
    assert await asyncio.wait_for(a.run_pass("funding"), 10) == "failed"
    assert counted("funding", "failed") == failed_before + 1
    assert await JobRunner(60, {"funding": later}, exclusive=second_db.exclusive).run_pass("funding") == "ran"
