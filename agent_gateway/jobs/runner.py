"""The periodic runner: calls each pass every interval until stopped; a failing pass is logged, not fatal."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Pass = Callable[[], Awaitable[object]]


class JobRunner:
    def __init__(self, interval_s: float, passes: dict[str, Pass]) -> None:
        self.interval_s = interval_s
        self.passes = passes
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="agent-gateway-jobs")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def run_once(self) -> None:
        for name, job in self.passes.items():
            try:
                await job()
            except Exception:
                log.exception("background pass %s failed; it runs again next interval", name)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await self.run_once()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
