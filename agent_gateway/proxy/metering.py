"""Token usage from upstream bytes without parsing every chunk: SSE framing, usage capture, stripping."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_INPUT = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"output_tokens"\s*:\s*(\d+)')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE = b'"usage"'
# The end of an OpenAI stream is a line of its own. Model text inside an event is JSON, which
# cannot hold a raw newline, so "[DONE]" written by the model can never match this.
_EVENT_BOUNDARY = re.compile(rb"(?<=\n\n)|(?<=\r\n\r\n)")
_DONE_EVENT = re.compile(rb"(?m)^data: ?\[DONE\]\r?$")
# Anthropic's stream ends with an `event: message_stop` line; as above, text cannot forge it.
_MESSAGE_STOP_EVENT = re.compile(rb"(?m)^event: ?message_stop\r?$")


@dataclass(frozen=True)
class Dialect:
    """How one API spells a stream's end and its token counts."""

    terminal_marker: bytes  # a cheap substring test before the terminal regex
    terminal: re.Pattern[bytes]
    prompt: re.Pattern[bytes]
    completion: re.Pattern[bytes]
    # Anthropic splits usage over events (input in message_start, output in message_delta): a
    # later event updates the counts it names; OpenAI's usage event carries both.
    merge_usage: bool


OPENAI = Dialect(b"[DONE]", _DONE_EVENT, _PROMPT, _COMPLETION, merge_usage=False)
ANTHROPIC = Dialect(b"message_stop", _MESSAGE_STOP_EVENT, _INPUT, _OUTPUT, merge_usage=True)
DIALECTS = {"openai": OPENAI, "anthropic": ANTHROPIC}


def _usage_fields(data: bytes, dialect: Dialect) -> tuple[int | None, int | None]:
    at = data.rfind(_USAGE)
    if at < 0:
        return None, None
    prompt = dialect.prompt.search(data, at)
    completion = dialect.completion.search(data, at)
    return (int(prompt.group(1)) if prompt else None), (int(completion.group(1)) if completion else None)


def find_usage(data: bytes, dialect: Dialect = OPENAI) -> tuple[int, int] | None:
    """(prompt, completion) from the last `"usage"` object in a JSON body or SSE event.

    JSON-escaped text inside messages cannot match: its quotes are preceded by backslashes."""
    prompt, completion = _usage_fields(data, dialect)
    if prompt is None:
        return None
    return prompt, completion or 0


class StreamMeter:
    """Feeds on upstream SSE bytes; forwards whole events only, records the last usage seen and,
    when the gateway asked for usage on the client's behalf, drops the usage-only event."""

    def __init__(self, strip_usage_event: bool, dialect: Dialect = OPENAI) -> None:
        self._strip = strip_usage_event
        self._dialect = dialect
        self._pending = b""
        self.events = 0
        self.usage: tuple[int, int] | None = None
        self.done = False  # the upstream sent its terminal event (`data: [DONE]`, `event: message_stop`)

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
        dialect = self._dialect
        if not self.done:
            marker = out.find(dialect.terminal_marker)
            # The terminal line starts at most a few bytes before its marker (`data: [DONE]`,
            # `event: message_stop`); the anchored search starts there instead of at byte 0.
            if marker >= 0 and dialect.terminal.search(out, max(0, marker - 16)):
                self.done = True
        at = out.find(_USAGE)
        if at < 0:
            return out
        if b"\r" in out:
            return self._inspect_crlf(out)
        # Byte scans: only the events that name a usage are cut out and read. OpenAI streams
        # with include_usage carry `"usage":null` on every chunk; those are skipped here.
        kept: list[bytes] = []
        copied = 0
        find, rfind = out.find, out.rfind
        while at >= 0:
            if out.startswith(b":null", at + 7) or out.startswith(b": null", at + 7):
                at = find(_USAGE, at + 7)
                continue
            start = rfind(b"\n\n", 0, at)
            start = 0 if start < 0 else start + 2
            end = find(b"\n\n", at)
            end = len(out) if end < 0 else end + 2
            event = out[start:end]
            self._take_usage(event)
            if self._strip and _EMPTY_CHOICES.search(event):
                self.events -= 1
                kept.append(out[copied:start])
                copied = end
            at = find(_USAGE, end)
        if not copied:
            return out
        kept.append(out[copied:])
        return b"".join(kept)

    def _inspect_crlf(self, out: bytes) -> bytes:
        kept = []
        for event in _EVENT_BOUNDARY.split(out):
            if _USAGE in event:
                self._take_usage(event)
                if self._strip and _EMPTY_CHOICES.search(event):
                    self.events -= 1
                    continue
            kept.append(event)
        return b"".join(kept)

    def _take_usage(self, event: bytes) -> None:
        if not self._dialect.merge_usage:
            usage = find_usage(event, self._dialect)
            if usage is not None:
                self.usage = usage
            return
        prompt, completion = _usage_fields(event, self._dialect)
        if prompt is None and completion is None:
            return
        old_prompt, old_completion = self.usage or (0, 0)
        self.usage = (old_prompt if prompt is None else prompt, old_completion if completion is None else completion)
