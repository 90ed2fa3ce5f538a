"""Fast, deterministic OpenAI-compatible test upstream with failure injection and in-flight recording.

With `tools`, chat completions answer with a deterministic tool call (streamed or whole). It also
speaks Anthropic Messages natively (`/v1/messages`, `/v1/messages/count_tokens`): text,
tools and the exact stream event sequence, usage in `message_start` and `message_delta`."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import random
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent_gateway.testing.recorder import Behaviour, BehaviourControl, Recorder, DEFAULT_BEHAVIOUR, parse_behaviour

MAX_TOKENS_CAP = 10_000
# ASCII-only tokens, so they can be spliced into JSON bytes without escaping.
_VOCAB = [b"tok%d " % i for i in range(4096)]
_JSON_CT = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "conflict_error", 422: "invalid_request_error",
                429: "rate_limit_exceeded"}


@dataclass
class UpstreamSettings:
    delay_s: float = 0.0  # between stream chunks; a non-stream reply waits delay_s * tokens in total
    chunks: int = 16  # tokens (= content chunks) per completion when the request sets no max_tokens
    models: list[str] = field(default_factory=lambda: ["test-model", "test-model-large", "test-embedding"])
    first_byte_delay_s: float = 0.0
    embedding_dimensions: int = 16
    # Replaces the generated tokens, cycled; ASCII without quotes or backslashes (spliced into JSON).
    words: tuple[str, ...] = ()
    # Seconds a stream stays open after its last event (an upstream slow to close its response).
    linger_s: float = 0.0


class _CutConnection(Exception):
    """Raised after a partial response so uvicorn drops the connection mid-body."""


class _QuietCut(logging.Filter):
    # uvicorn logs every app exception with a traceback; an injected cut is expected, not news.
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _CutConnection))


def _install_log_filter() -> None:
    log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietCut) for f in log.filters):
        log.addFilter(_QuietCut())


class _Client:
    """Watches for http.disconnect, started lazily so replies without waits pay nothing."""

    __slots__ = ("_receive", "_task")

    def __init__(self, receive: Callable[[], Any]) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    def _watcher(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())
        return self._task

    async def sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False if the client disconnected meanwhile."""
        done, _ = await asyncio.wait((self._watcher(),), timeout=seconds)
        return not done

    async def wait_gone(self) -> None:
        await self._watcher()

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()


class _Reply(NamedTuple):
    status: int
    body: bytes  # the whole JSON body, or the stream's closing bytes (finish chunk, usage, [DONE])
    chunks: list[bytes] | None = None  # SSE content chunks when streaming
    tokens: int = 0


class _BadRequest(Exception):
    pass


def _error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def _words(value: Any) -> tuple[str, int]:
    """Prompt text and its deterministic token count (whitespace words; token ids count one each)."""
    if isinstance(value, str):
        return value, len(value.split())
    if isinstance(value, list):
        if all(isinstance(v, int) for v in value):
            return " ".join(map(str, value)), len(value)
        texts, count = [], 0
        for item in value:
            text, n = _words(item.get("text") if isinstance(item, dict) else item)
            texts.append(text)
            count += n
        return "\n".join(texts), count
    return "", 0


def _anthropic_error_body(status: int, message: str) -> bytes:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            529: "overloaded_error"}.get(status, "api_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def _block_text(content: Any) -> Any:
    """A Messages content (a string or blocks) as `_words` reads it: text, tool results, tool input."""
    if not isinstance(content, list):
        return content
    texts: list[Any] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            texts.append(_block_text(block.get("content")))
        elif block.get("type") == "tool_use":
            texts.append(json.dumps(block.get("input")))
        else:
            texts.append(block.get("text"))
    return [t for t in texts if isinstance(t, str | list)]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), json.dumps(data, separators=(",", ":")).encode())


def _max_tokens(payload: dict[str, Any], default: int) -> int:
    n = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return min(max(int(n), 1), MAX_TOKENS_CAP) if isinstance(n, int | float) else default


def _usage(prompt: int, completion: int) -> bytes:
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}' % (prompt, completion, prompt + completion)


class _Upstream:
    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.recorder = Recorder()
        self.behaviour = BehaviourControl()
        self._ids = itertools.count(1)
        self._parsed: dict[bytes, Behaviour | str] = {}
        # The last request's headers (lowercase names), kept in place so tests can read them.
        self.last_headers: dict[str, str] = {}
        self.models_body = json.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "agent-gateway-test"} for m in settings.models
        ]}).encode()

    def behaviour_for(self, header: bytes | None) -> Behaviour | str:
        """The request's behaviour, or an error message for a malformed X-Test-Behaviour header."""
        if header is None:
            return self.behaviour.take()
        parsed = self._parsed.get(header)
        if parsed is None:
            try:
                parsed = parse_behaviour(header.decode("latin-1"))
            except ValueError as exc:
                parsed = f"bad X-Test-Behaviour header: {exc}"
            if len(self._parsed) < 1024:  # tests reuse a handful of values; don't grow without bound
                self._parsed[header] = parsed
        return parsed

    def completion(self, payload: dict[str, Any], chat: bool) -> _Reply:
        model = payload.get("model")
        if not isinstance(model, str):
            raise _BadRequest("'model' is required")
        if chat:
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("'messages' must be a non-empty list")
            text, prompt = _words([m.get("content") if isinstance(m, dict) else None for m in messages])
        else:
            if "prompt" not in payload:
                raise _BadRequest("'prompt' is required")
            text, prompt = _words(payload["prompt"])
        n = _max_tokens(payload, self.settings.chunks)
        # Seeded by the prompt, so different prompts stream different (but reproducible) text.
        seed = zlib.crc32(text.encode())
        if self.settings.words:
            toks = [self.settings.words[i % len(self.settings.words)].encode("ascii") for i in range(n)]
        else:
            toks = [_VOCAB[(seed + i * 7) % 4096] for i in range(n)]
        rid, created, mj = next(self._ids), int(time.time()), json.dumps(model).encode()
        call = self._tool_call(payload, rid) if chat else None
        if call is not None:
            return self._tool_call_reply(payload, call, rid, created, prompt)
        if not payload.get("stream"):
            content = b"".join(toks)
            if chat:
                body = (b'{"id":"chatcmpl-%d","object":"chat.completion","created":%d,"model":%s,"choices":'
                        b'[{"index":0,"message":{"role":"assistant","content":"%s","refusal":null},'
                        b'"logprobs":null,"finish_reason":"stop"}],"usage":%s,"system_fingerprint":null}'
                        % (rid, created, mj, content, _usage(prompt, n)))
            else:
                body = (b'{"id":"cmpl-%d","object":"text_completion","created":%d,"model":%s,"choices":'
                        b'[{"index":0,"text":"%s","logprobs":null,"finish_reason":"stop"}],"usage":%s}'
                        % (rid, created, mj, content, _usage(prompt, n)))
            return _Reply(200, body, None, n)
        opts = payload.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        # OpenAI sends "usage":null on every chunk once include_usage is set, then one usage-only chunk.
        unull = b',"usage":null' if with_usage else b""
        if chat:
            obj, prefix, fp = b"chat.completion.chunk", b"chatcmpl", b'"system_fingerprint":null,'
            first, piece, last = b'"delta":{"role":"assistant","content":"%s"}', b'"delta":{"content":"%s"}', b'"delta":{}'
        else:
            obj, prefix, fp = b"text_completion", b"cmpl", b""
            first = piece = b'"text":"%s"'
            last = b'"text":""'
        head = b'data: {"id":"%s-%d","object":"%s","created":%d,"model":%s,%s' % (prefix, rid, obj, created, mj, fp)
        mid = b',"logprobs":null,"finish_reason":null}]%s}\n\n' % unull
        chunks = [head + b'"choices":[{"index":0,' + ((first if i == 0 else piece) % t) + mid
                  for i, t in enumerate(toks)]
        tail = head + b'"choices":[{"index":0,' + last + b',"logprobs":null,"finish_reason":"stop"}]%s}\n\n' % unull
        if with_usage:
            tail += head + b'"choices":[],"usage":%s}\n\n' % _usage(prompt, n)
        return _Reply(200, tail + _DONE, chunks, n)

    @staticmethod
    def _tool_call(payload: dict[str, Any], rid: int) -> dict[str, Any] | None:
        """With tools, a last turn that is not a tool result is answered by a call of the first
        tool, arguments {"query": the turn's text} (as the Messages endpoint does)."""
        tools, last = payload.get("tools"), payload["messages"][-1]
        if not (isinstance(tools, list) and tools and isinstance(tools[0], dict)) or not isinstance(last, dict):
            return None
        function = tools[0].get("function")
        if last.get("role") == "tool" or not isinstance(function, dict):
            return None
        query, _ = _words(last.get("content"))
        return {"id": "call_test_%d" % rid, "type": "function",
                "function": {"name": function.get("name"), "arguments": json.dumps({"query": query})}}

    def _tool_call_reply(self, payload: dict[str, Any], call: dict[str, Any], rid: int, created: int,
                         prompt: int) -> _Reply:
        n = len(call["function"]["arguments"].split())
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        head = {"id": "chatcmpl-%d" % rid, "created": created, "model": payload["model"], "system_fingerprint": None}
        if not payload.get("stream"):
            body = {**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "logprobs": None, "finish_reason": "tool_calls"}]}
            return _Reply(200, json.dumps(body).encode(), None, n)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return b"data: %s\n\n" % json.dumps(body).encode()

        opening = {"index": 0, "id": call["id"], "type": "function",
                   "function": {"name": call["function"]["name"], "arguments": ""}}
        pieces = call["function"]["arguments"].split(" ")
        chunks = [chunk({"role": "assistant", "content": None, "tool_calls": [opening]})] + [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p + (" " if i < len(pieces) - 1 else "")}}]})
            for i, p in enumerate(pieces)]
        tail = chunk({}, "tool_calls")
        opts = payload.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            tail += b"data: %s\n\n" % json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                                    "usage": usage}).encode()
        return _Reply(200, tail + _DONE, chunks, n)

    def _tokens(self, text: str, n: int) -> list[bytes]:
        # Seeded by the prompt, so different prompts give different (but reproducible) text.
        if self.settings.words:
            return [self.settings.words[i % len(self.settings.words)].encode("ascii") for i in range(n)]
        seed = zlib.crc32(text.encode())
        return [_VOCAB[(seed + i * 7) % 4096] for i in range(n)]

    def _messages_prompt(self, payload: dict[str, Any]) -> tuple[str, int, list[Any]]:
        if not isinstance(payload.get("model"), str):
            raise _BadRequest("model: Field required")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _BadRequest("messages: must be a non-empty list of messages")
        parts = [_block_text(payload.get("system"))] + [_block_text(m.get("content")) for m in messages]
        text, prompt = _words([p for p in parts if p is not None])
        return text, prompt, messages

    def count_tokens(self, payload: dict[str, Any]) -> _Reply:
        _, prompt, _ = self._messages_prompt(payload)
        return _Reply(200, json.dumps({"input_tokens": prompt}).encode())

    def messages(self, payload: dict[str, Any]) -> _Reply:
        """A Messages reply. With tools, a user turn that carries no tool result is answered by a
        call of the first tool (input {"query": the turn's text}); otherwise text is generated."""
        text, prompt, messages = self._messages_prompt(payload)
        max_tokens = payload.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _BadRequest("max_tokens: Field required (a positive integer)")
        model = payload["model"]
        mid = "msg_test_%d" % next(self._ids)
        tools = payload.get("tools")
        last = messages[-1].get("content")
        answered = isinstance(last, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last)
        block: dict[str, Any]
        if isinstance(tools, list) and tools and isinstance(tools[0], dict) and not answered:
            last_text, _ = _words(_block_text(last))
            tool_input = {"query": last_text}
            block = {"type": "tool_use", "id": "toolu_test_%d" % next(self._ids), "name": tools[0].get("name"),
                     "input": tool_input}
            n, stop = len(json.dumps(tool_input).split()), "tool_use"
            pieces = [json.dumps(tool_input)]
        else:
            n = min(max_tokens, self.settings.chunks)
            stop = "max_tokens" if max_tokens < self.settings.chunks else "end_turn"
            pieces = [t.decode("ascii") for t in self._tokens(text, n)]
            block = {"type": "text", "text": "".join(pieces)}
        usage = {"input_tokens": prompt, "output_tokens": n}
        if not payload.get("stream"):
            body = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [block],
                    "stop_reason": stop, "stop_sequence": None, "usage": usage}
            return _Reply(200, json.dumps(body).encode(), None, n)
        start = {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": 1}}}
        opening: dict[str, Any]
        if block["type"] == "text":
            opening, delta_of = {"type": "text", "text": ""}, (lambda p: {"type": "text_delta", "text": p})
        else:
            opening = {**block, "input": {}}
            delta_of = (lambda p: {"type": "input_json_delta", "partial_json": p})
        head = (_sse("message_start", start)
                + _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": opening})
                + _sse("ping", {"type": "ping"}))
        deltas = [_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta_of(p)})
                  for p in pieces]
        chunks = [head + deltas[0], *deltas[1:]]
        tail = (_sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                + _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": n}})
                + _sse("message_stop", {"type": "message_stop"}))
        return _Reply(200, tail, chunks, n)

    def embeddings(self, payload: dict[str, Any]) -> _Reply:
        model, inputs = payload.get("model"), payload.get("input")
        if not isinstance(model, str) or inputs is None:
            raise _BadRequest("'model' and 'input' are required")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        dims = int(payload.get("dimensions") or self.settings.embedding_dimensions)
        as_b64 = payload.get("encoding_format") == "base64"
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            text, n = _words(item)
            tokens += n
            rng = random.Random(zlib.crc32(text.encode()))
            vec = [rng.uniform(-1.0, 1.0) for _ in range(dims)]
            norm = sum(v * v for v in vec) ** 0.5 or 1.0
            vec = [v / norm for v in vec]
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        body = {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return _Reply(200, json.dumps(body).encode())


class _Endpoint:
    """Raw ASGI endpoint: Starlette passes class instances straight through, skipping Request/Response."""

    def __init__(self, up: _Upstream, kind: str) -> None:
        self.up, self.kind = up, kind

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        key = auth = header = None
        for name, value in scope["headers"]:
            if name == b"x-agent-gateway-key-id":
                key = value
            elif name == b"authorization":
                auth = value
            elif name == b"x-test-behaviour" or name == b"x-test-behavior":
                header = value
        key_s = (key if key is not None else auth or b"").decode("latin-1")
        if self.kind in ("messages", "count_tokens"):
            self.up.last_headers.clear()
            self.up.last_headers.update((n.decode("latin-1"), v.decode("latin-1")) for n, v in scope["headers"])
        payload: Any = {}
        if self.kind != "models":
            message = await receive()
            body = message.get("body", b"")
            while message.get("more_body"):
                message = await receive()
                body += message.get("body", b"")
            if message["type"] == "http.disconnect":
                return
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
        model = payload.get("model") if isinstance(payload, dict) else None
        rec, client = self.up.recorder, _Client(receive)
        rec.begin(key_s, model if isinstance(model, str) else None)
        cancelled = True  # also the verdict when the server cancels us at shutdown
        try:
            cancelled = await self._serve(send, client, payload, self.up.behaviour_for(header))
        except _CutConnection:
            cancelled = False
            raise
        finally:
            client.close()
            rec.end(key_s, cancelled)

    def _error(self, status: int, message: str) -> _Reply:
        anthropic = self.kind in ("messages", "count_tokens")
        return _Reply(status, (_anthropic_error_body if anthropic else _error_body)(status, message))

    async def _serve(self, send: Callable[..., Any], client: _Client, payload: Any, beh: Behaviour | str) -> bool:
        """Send the reply; True if the client disconnected first."""
        if isinstance(beh, str):
            return await _send_whole(send, client, self._error(400, beh), DEFAULT_BEHAVIOUR, 0.0)
        settings = self.up.settings
        if beh.mode == "stall":
            await client.wait_gone()
            return True
        wait = settings.first_byte_delay_s + (beh.seconds if beh.mode == "slow_headers" else 0.0)
        if wait > 0 and not await client.sleep(wait):
            return True
        if beh.mode == "fail":
            return await _send_whole(send, client, self._error(beh.status, "injected failure"), DEFAULT_BEHAVIOUR, 0.0)
        try:
            if not isinstance(payload, dict):
                raise _BadRequest("request body must be a JSON object")
            if self.kind == "models":
                reply = _Reply(200, self.up.models_body)
            elif self.kind == "embeddings":
                reply = self.up.embeddings(payload)
            elif self.kind == "messages":
                reply = self.up.messages(payload)
            elif self.kind == "count_tokens":
                reply = self.up.count_tokens(payload)
            else:
                reply = self.up.completion(payload, chat=self.kind == "chat")
        except _BadRequest as exc:
            return await _send_whole(send, client, self._error(400, str(exc)), DEFAULT_BEHAVIOUR, 0.0)
        delay = settings.delay_s if beh.delay_s is None else beh.delay_s
        if reply.chunks is None:
            return await _send_whole(send, client, reply, beh, delay * reply.tokens)
        return await _send_stream(send, client, reply, beh, delay, settings.linger_s)


async def _send_whole(send: Callable[..., Any], client: _Client, reply: _Reply, beh: Behaviour, wait: float) -> bool:
    if wait > 0 and not await client.sleep(wait):
        return True
    body = reply.body
    await send({"type": "http.response.start", "status": reply.status,
                "headers": [_JSON_CT, (b"content-length", b"%d" % len(body))]})
    if beh.mode in ("cut", "stall_after"):
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        if beh.mode == "cut":
            raise _CutConnection
        await client.wait_gone()
        return True
    await send({"type": "http.response.body", "body": body})
    return False


async def _send_stream(send: Callable[..., Any], client: _Client, reply: _Reply, beh: Behaviour, delay: float,
                       linger: float = 0.0) -> bool:
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    chunks = reply.chunks or []
    partial = beh.mode in ("cut", "stall_after")
    for i in range(min(beh.after_chunks, len(chunks)) if partial else len(chunks)):
        if i and delay > 0 and not await client.sleep(delay):
            return True
        await send({"type": "http.response.body", "body": chunks[i], "more_body": True})
    if beh.mode == "cut":
        raise _CutConnection
    if beh.mode == "stall_after":
        await client.wait_gone()
        return True
    if delay > 0 and not await client.sleep(delay):
        return True
    if linger > 0:
        await send({"type": "http.response.body", "body": reply.body, "more_body": True})
        if not await client.sleep(linger):
            return False  # the client had everything; leaving early is not a cancellation
        await send({"type": "http.response.body", "body": b""})
        return False
    await send({"type": "http.response.body", "body": reply.body})
    return False


def create_upstream_app(settings: UpstreamSettings | None = None) -> Starlette:
    """The test upstream; app.state.recorder is a Recorder and app.state.behaviour a BehaviourControl."""
    up = _Upstream(settings or UpstreamSettings())
    _install_log_filter()

    async def set_behaviour(request: Request) -> JSONResponse:
        try:
            spec = await request.json()
            up.behaviour.set(**spec)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True, "behaviour": asdict(up.behaviour.current)})

    async def reset(request: Request) -> JSONResponse:
        up.behaviour.reset()
        up.recorder.reset()
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(up.recorder.stats())

    app = Starlette(routes=[
        Route("/v1/chat/completions", _Endpoint(up, "chat"), methods=["POST"]),
        Route("/v1/completions", _Endpoint(up, "completions"), methods=["POST"]),
        Route("/v1/embeddings", _Endpoint(up, "embeddings"), methods=["POST"]),
        Route("/v1/models", _Endpoint(up, "models"), methods=["GET"]),
        Route("/v1/messages", _Endpoint(up, "messages"), methods=["POST"]),
        Route("/v1/messages/count_tokens", _Endpoint(up, "count_tokens"), methods=["POST"]),
        Route("/_control/behaviour", set_behaviour, methods=["POST"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/stats", stats, methods=["GET"]),
    ])
    app.state.recorder = up.recorder
    app.state.behaviour = up.behaviour
    app.state.settings = up.settings
    app.state.last_headers = up.last_headers
    return app


def run_test_upstream(host: str, port: int, settings: UpstreamSettings) -> None:
    """Serve the test upstream in the foreground until interrupted (backs `agent-gateway test-upstream`)."""
    import uvicorn

    uvicorn.run(create_upstream_app(settings), host=host, port=port, access_log=False, log_level="info")
