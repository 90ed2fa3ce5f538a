"""Translation on the wire: an upstream's chat-completion bytes in, Messages bytes out.

The relay hands a translated exchange's upstream body to a `Translation`: the whole JSON body
(`whole`), or the stream chunk by chunk (`stream()`, shaped like the relay's StreamMeter: feed,
finish, done, usage, events). Each upstream SSE event is translated as it arrives."""

from __future__ import annotations

import json
import re
from typing import Any

from agent_gateway.errors import UpstreamError
from agent_gateway.messages.translate import StreamTranslator, from_chat_response, new_message_id, sse_frame

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
    """Upstream SSE bytes in, Messages SSE frames out; the finish frames come at `data: [DONE]`."""

    def __init__(self, translator: StreamTranslator) -> None:
        self._translator = translator
        self._pending = b""
        self.events = 0
        self.usage: tuple[int, int] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
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
        if not lines or self.done:
            return b""
        data = b"\n".join(lines)
        self.events += 1
        translator = self._translator
        if data.strip() == b"[DONE]":
            self.done = True
            return b"".join(sse_frame(name, event) for name, event in translator.finish())
        try:
            chunk: Any = json.loads(data)
        except ValueError as exc:
            raise UpstreamError("The upstream sent a stream event that is not JSON.", code="upstream_error") from exc
        if not isinstance(chunk, dict):
            raise UpstreamError("The upstream sent a stream event that is not a JSON object.", code="upstream_error")
        if chunk.get("error") is not None:
            raise UpstreamError("The upstream failed while streaming.", code="upstream_error")
        frames = translator.feed(chunk)
        if chunk.get("usage"):
            self.usage = (translator.input_tokens, translator.output_tokens)
        return b"".join(sse_frame(name, event) for name, event in frames)
