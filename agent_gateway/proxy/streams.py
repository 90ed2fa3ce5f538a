"""This process's running streams by key, so a revocation can end them wherever they run."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Cancel = Callable[[str], object]


class StreamRegistry:
    """This process's running streams, by key id, each with a callback that cancels it."""

    def __init__(self) -> None:
        # Keyed by a per-registration token rather than a set of callables, so registering the
        # same callable twice still gives two independent removers.
        self._streams: dict[str, dict[object, Cancel]] = {}

    def add(self, key_id: str, cancel: Cancel) -> Callable[[], None]:
        token = object()
        self._streams.setdefault(key_id, {})[token] = cancel

        def remove() -> None:
            streams = self._streams.get(key_id)
            if streams is not None:
                streams.pop(token, None)
                if not streams:
                    del self._streams[key_id]

        return remove

    def cancel_key(self, key_id: str, reason: str) -> int:
        # Copy first: a callback may finish its stream and call its remover while we iterate.
        callbacks = list(self._streams.get(key_id, {}).values())
        for cancel in callbacks:
            try:
                cancel(reason)
            except Exception:
                log.exception("cancelling a stream of key %s failed", key_id)
        return len(callbacks)

    def count(self, key_id: str) -> int:
        return len(self._streams.get(key_id, ()))


class Registration:
    """A request's place in the registry, taken *before* its lease is acquired.

    A revocation that lands between admission and the start of the relay is kept here and acted
    on when the relay binds its canceller. (One that lands before the registration was published
    after its tombstone was written, so the acquire that follows is refused anyway.)"""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._cancel: Cancel | None = None

    def cancel(self, reason: str) -> None:
        if self._cancel is not None:
            self._cancel(reason)
        elif self.reason is None:
            self.reason = reason

    def bind(self, cancel: Cancel) -> None:
        self._cancel = cancel
