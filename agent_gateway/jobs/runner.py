"""The periodic runner: calls each pass every interval until stopped; a failing pass is logged, not fatal.

Several processes on one database (`serve --workers N`, or several servers) would each run every
pass. A pass is safe to run twice at once (each is written for it), but that doubles its work:
every reorg re-check and refund look-up would go to the chain once per process. So a pass runs in
one process at a time: the one that holds its `Exclusive` claim (a PostgreSQL advisory lock, see
`db.engine.Database.exclusive`); the others skip it that interval. Within a process, two calls of
one pass (the loop's and an explicit `run_once`) wait for each other instead of skipping, so a
caller of `run_once` sees every pass done.

A pass that runs longer than `pass_timeout_s` is cancelled and counted as failed: one stuck pass
(a query waiting on a lock, a bug) would otherwise hold its claim, and every other process would
skip that pass, for as long as the process lives. Cancelling is safe: every pass writes each step
durably, as a crash would leave it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from agent_gateway.metrics import BACKGROUND_PASSES

log = logging.getLogger(__name__)

Pass = Callable[[], Awaitable[object]]
# `exclusive(name)` yields True while this process holds `name` against every other process.
Exclusive = Callable[[str], AbstractAsyncContextManager[bool]]


@asynccontextmanager
async def always_held(name: str) -> AsyncIterator[bool]:
    """One process only (SQLite, or tests): nothing to share."""
    yield True


class JobRunner:
    def __init__(self, interval_s: float, passes: dict[str, Pass], exclusive: Exclusive = always_held,
                 pass_timeout_s: float = 600) -> None:
        self.interval_s = interval_s
        self.passes = passes
        self.exclusive = exclusive
        self.pass_timeout_s = pass_timeout_s
        self._running = {name: asyncio.Lock() for name in passes}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="agent-gateway-jobs")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def run_once(self) -> None:
        for name in self.passes:
            await self.run_pass(name)

    async def run_pass(self, name: str) -> str:
        """Run one pass here unless another process is running it; the outcome: ran, skipped or failed."""
        async with self._running[name]:
            try:
                async with self.exclusive(f"pass:{name}") as held:
                    if held:
                        async with asyncio.timeout(self.pass_timeout_s):
                            await self.passes[name]()
                outcome = "ran" if held else "skipped"
            except TimeoutError:
                log.error("background pass %s took over %g s and was stopped; it runs again next interval", name,
                          self.pass_timeout_s)
                outcome = "failed"
            except Exception:
                log.exception("background pass %s failed; it runs again next interval", name)
                outcome = "failed"
        BACKGROUND_PASSES.labels(name, outcome).inc()
        return outcome

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await self.run_once()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
