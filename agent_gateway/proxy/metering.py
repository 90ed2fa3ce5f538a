"""Token usage from upstream bytes without parsing every chunk: SSE framing, usage capture, stripping."""

from __future__ import annotations

import re

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE = b'"usage"'
# The end of an OpenAI stream is a line of its own. Model text inside an event is JSON, which
# cannot hold a raw newline, so "[DONE]" written by the model can never match this.
_EVENT_BOUNDARY = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)")
_DONE_EVENT = re.compile(rb"(?m)^data: ?\[DONE\]\r?$")


def find_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) from the last `"usage"` object in a JSON body or SSE event.

    JSON-escaped text inside messages cannot match: its quotes are preceded by backslashes."""
    at = data.rfind(_USAGE)
    if at < 0:
        return None
    prompt = _PROMPT.search(data, at)
    completion = _COMPLETION.search(data, at)
    if prompt is None:
        return None
    return int(prompt.group(1)), int(completion.group(1)) if completion else 0


class StreamMeter:
    """Feeds on upstream SSE bytes; forwards whole events only, records the last usage seen and,
    when the gateway asked for usage on the client's behalf, drops the usage-only event."""

    def __init__(self, strip_usage_event: bool) -> None:
        self._strip = strip_usage_event
        self._pending = b""
        self.events = 0
        self.usage: tuple[int, int] | None = None
        self.done = False  # the upstream sent its terminal `data: [DONE]` event

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        if cut == 0:
            self._pending = data
            return b""
        out, self._pending = data[:cut], data[cut:]
        return self._inspect(out)

    def finish(self) -> bytes:
        out, self._pending = self._pending, b""
        return self._inspect(out) if out else b""

    def _inspect(self, out: bytes) -> bytes:
        self.events += out.count(b"data:")
        if not self.done and b"[DONE]" in out and _DONE_EVENT.search(out):
            self.done = True
        if _USAGE not in out:
            return out
        kept = []
        for event in _EVENT_BOUNDARY.split(out):
            if _USAGE in event:
                usage = find_usage(event)
                if usage is not None:
                    self.usage = usage
                if self._strip and _EMPTY_CHOICES.search(event):
                    self.events -= 1
                    continue
            kept.append(event)
        return b"".join(kept)
