"""The test upstream's controls and records: injected behaviours and per-key in-flight statistics."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MODES = frozenset({"ok", "fail", "stall", "cut", "stall_after", "slow_headers"})


@dataclass(frozen=True, slots=True)
class Behaviour:
    mode: str = "ok"  # one of MODES
    status: int = 500  # for fail
    after_chunks: int = 0  # for cut / stall_after
    seconds: float = 1.0  # for slow_headers
    delay_s: float | None = None  # overrides UpstreamSettings.delay_s


DEFAULT_BEHAVIOUR = Behaviour()


def parse_behaviour(text: str) -> Behaviour:
    """Parse an X-Test-Behaviour value such as "fail:503", "cut:3", "delay:0.01, stall_after:2"."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        name, _, arg = part.strip().partition(":")
        name, arg = name.strip().lower(), arg.strip()
        if not name:
            continue
        if name == "delay":
            fields["delay_s"] = float(arg)
        elif name == "fail":
            fields.update(mode="fail", status=int(arg or 500))
        elif name in ("cut", "stall_after"):
            fields.update(mode=name, after_chunks=int(arg or 0))
        elif name == "slow_headers":
            fields.update(mode=name, seconds=float(arg or 1.0))
        elif name in ("ok", "stall"):
            fields["mode"] = name
        else:
            raise ValueError(f"unknown test behaviour {name!r}")
    return Behaviour(**fields)


class BehaviourControl:
    """The behaviour applied to /v1 requests that carry no X-Test-Behaviour header."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = DEFAULT_BEHAVIOUR
        self._remaining: int | None = None

    def set(self, mode: str = "ok", *, status: int = 500, after_chunks: int = 0, seconds: float = 1.0,
            delay_s: float | None = None, count: int | None = None) -> None:
        """Apply to the next `count` requests (None = until reset)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        with self._lock:
            self._current = Behaviour(mode, int(status), int(after_chunks), float(seconds),
                                      None if delay_s is None else float(delay_s))
            self._remaining = None if count is None else int(count)

    def reset(self) -> None:
        with self._lock:
            self._current, self._remaining = DEFAULT_BEHAVIOUR, None

    @property
    def current(self) -> Behaviour:
        return self._current

    def take(self) -> Behaviour:
        if self._current is DEFAULT_BEHAVIOUR:  # lock-free fast path for the benchmark
            return DEFAULT_BEHAVIOUR
        with self._lock:
            current = self._current
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._current, self._remaining = DEFAULT_BEHAVIOUR, None
            return current


class Recorder:
    """Request statistics; safe to read and wait on from any thread or event loop.

    A request's key is its X-Agent-Gateway-Key-Id header, else its Authorization header, else "".
    """

    def __init__(self, recent: int = 1000) -> None:
        # Reentrant so predicates may call recorder methods while we evaluate them under the lock.
        self._cond = threading.Condition(threading.RLock())
        self._async_waiters: list[tuple[Callable[[Recorder], bool], asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._recent = recent
        self.in_flight = 0
        self._in_flight_by_key: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters; requests still in flight stay counted, and the peaks restart from them."""
        with self._cond:
            self.total = self.completed = self.cancelled = 0
            self.peak_in_flight = self.in_flight
            self._max_by_key = {k: v for k, v in self._in_flight_by_key.items() if v}
            self.models: deque[str | None] = deque(maxlen=self._recent)
            self._changed()

    def begin(self, key: str, model: str | None) -> None:
        with self._cond:
            self.total += 1
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
            n = self._in_flight_by_key.get(key, 0) + 1
            self._in_flight_by_key[key] = n
            if n > self._max_by_key.get(key, 0):
                self._max_by_key[key] = n
            self.models.append(model)
            self._changed()

    def end(self, key: str, cancelled: bool) -> None:
        with self._cond:
            self.in_flight -= 1
            self._in_flight_by_key[key] -= 1
            if cancelled:
                self.cancelled += 1
            else:
                self.completed += 1
            self._changed()

    def max_in_flight(self, key: str | None = None) -> int:
        """Most requests seen at once for `key`, or across all keys when key is None."""
        with self._cond:
            return self.peak_in_flight if key is None else self._max_by_key.get(key, 0)

    def in_flight_for(self, key: str) -> int:
        with self._cond:
            return self._in_flight_by_key.get(key, 0)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"total": self.total, "in_flight": self.in_flight, "max_in_flight": self.peak_in_flight,
                    "completed": self.completed, "cancelled": self.cancelled,
                    "in_flight_by_key": {k: v for k, v in self._in_flight_by_key.items() if v},
                    "max_in_flight_by_key": dict(self._max_by_key), "models": list(self.models)}

    def _changed(self) -> None:
        self._cond.notify_all()
        for waiter in list(self._async_waiters):
            pred, loop, fut = waiter
            if pred(self):
                self._async_waiters.remove(waiter)
                loop.call_soon_threadsafe(_resolve, fut)

    def wait_for_sync(self, pred: Callable[[Recorder], bool], timeout: float = 5.0) -> None:
        """Block until pred(recorder) holds; never call it from the upstream's own event loop."""
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self), timeout):
                raise TimeoutError(f"recorder condition not met within {timeout}s: {self.stats()}")

    async def wait_for(self, pred: Callable[[Recorder], bool], timeout: float = 5.0) -> None:
        """Await until pred(recorder) holds, from any event loop (the upstream's own included)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if pred(self):
                return
            waiter = (pred, loop, loop.create_future())
            self._async_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter[2], timeout)
        except TimeoutError:
            raise TimeoutError(f"recorder condition not met within {timeout}s: {self.stats()}") from None
        finally:
            with self._cond:
                if waiter in self._async_waiters:
                    self._async_waiters.remove(waiter)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
