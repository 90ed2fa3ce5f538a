"""Translation on the wire: an upstream's chat-completion bytes in, Messages bytes out.

The relay hands a translated exchange's upstream body to a `Translation`: the whole JSON body
(`whole`), or the stream chunk by chunk (`stream()`, shaped like the relay's StreamMeter: feed,
finish, done, usage, events). Each upstream SSE event is translated as it arrives."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from agent_gateway.errors import UpstreamError
from agent_gateway.messages.translate import StreamTranslator, frames_of, from_chat_response, new_message_id

_EVENT_END = re.compile(rb"\r?\n\r?\n")


class Translation:
    """One Messages request served by a chat-completions upstream."""

    def __init__(self, *, model: str, stop_sequences: list[str] | None = None) -> None:
        self.model = model
        self.stop_sequences = stop_sequences

    def whole(self, body: bytes) -> bytes:
        try:
            chat = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("The upstream's chat completion is not JSON.", code="upstream_error") from exc
        if not isinstance(chat, dict):
            raise UpstreamError("The upstream's chat completion is not a JSON object.", code="upstream_error")
        return json.dumps(from_chat_response(chat, model=self.model), ensure_ascii=False).encode()

    def stream(self) -> TranslatedStream:
        return TranslatedStream(StreamTranslator(model=self.model, message_id=new_message_id(),
                                                 stop_sequences=self.stop_sequences))


class TranslatedStream:
    """Upstream SSE bytes in, Messages SSE frames out; the finish frames come at `data: [DONE]`.

    Event boundaries are found with byte scans and each event's JSON is parsed once (orjson):
    this runs once per upstream event, so it is most of what translation costs per chunk."""

    def __init__(self, translator: StreamTranslator) -> None:
        self._translator = translator
        self._pending = b""
        self.events = 0
        self.usage: tuple[int, int] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            return self._feed_crlf(data)
        out: list[bytes] = []
        start, find = 0, data.find
        while (end := find(b"\n\n", start)) >= 0:
            raw = data[start:end]
            start = end + 2
            # The common shape, one `data: ...` line, skips the general line parsing.
            if raw[:6] == b"data: " and b"\n" not in raw and raw[6:7] == b"{":
                frames = self._json(raw[6:])
            else:
                frames = self._event(raw)
            if frames:
                out.append(frames)
        self._pending = data[start:]
        return b"".join(out)

    def _feed_crlf(self, data: bytes) -> bytes:
        # Rare: an upstream that ends its lines with CR LF; split on any blank line.
        out: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(data):
            out.append(self._event(data[start:end.start()]))
            start = end.end()
        self._pending = data[start:]
        return b"".join(out)

    def finish(self) -> bytes:
        tail, self._pending = self._pending, b""
        out = self._event(tail) if tail.strip() else b""
        if not self.done:
            raise UpstreamError("The upstream's stream ended before it was complete.", code="upstream_error")
        return out

    def _event(self, raw: bytes) -> bytes:
        lines = [line[5:].lstrip() for line in raw.splitlines() if line.startswith(b"data:")]
        if not lines:
            return b""
        data = b"\n".join(lines)
        if data.strip() == b"[DONE]":
            if self.done:
                return b""
            self.events += 1
            self.done = True
            return frames_of(self._translator.finish())
        return self._json(data)

    def _json(self, data: bytes) -> bytes:
        if self.done:
            return b""
        self.events += 1
        try:
            chunk: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            # orjson refuses some JSON the standard library reads (a lone surrogate escape in
            # model text): only then is the slower parser asked, and only its refusal is a 502.
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise UpstreamError("The upstream sent a stream event that is not JSON.", code="upstream_error") from exc
        if not isinstance(chunk, dict):
            raise UpstreamError("The upstream sent a stream event that is not a JSON object.", code="upstream_error")
        if chunk.get("error") is not None:
            raise UpstreamError("The upstream failed while streaming.", code="upstream_error")
        translator = self._translator
        frames = translator.feed(chunk)
        if chunk.get("usage"):
            self.usage = (translator.input_tokens, translator.output_tokens)
        return frames_of(frames)
