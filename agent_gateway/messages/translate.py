"""Anthropic Messages <-> OpenAI chat completions: requests, responses and stream events.

Pure functions and one small state machine, no HTTP. The field mapping (translated, passed,
ignored, refused) is the table in docs/decisions.md, "Anthropic Messages: translation".
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import orjson

from agent_gateway.errors import InvalidRequest, UpstreamError

Event = tuple[str, dict[str, Any]]

# Accepted and dropped on purpose (see docs/decisions.md): hints with no chat-completions
# equivalent that clients send on every request; refusing them would break those clients.
IGNORED_TOP_LEVEL = frozenset({"thinking", "top_k", "service_tier"})
TRANSLATED_TOP_LEVEL = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "metadata",
        "tools",
        "tool_choice",
    }
)

FINISH_TO_STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class TranslationError(InvalidRequest):
    """A Messages field that has no translation, or a field of the wrong shape (named by path)."""

    code = "unsupported_field"


def _invalid(path: str, what: str) -> TranslationError:
    return TranslationError(f"{path}: {what}", code="invalid_field")


def _unsupported(path: str, what: str) -> TranslationError:
    return TranslationError(f"{path}: {what}", code="unsupported_field")


# --- requests --------------------------------------------------------------------------------


def to_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a chat completions request for the same model."""
    for key in body:
        if key not in TRANSLATED_TOP_LEVEL and key not in IGNORED_TOP_LEVEL:
            raise _unsupported(key, "this field is not supported by this gateway's Messages API")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "a model name (string) is required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _invalid("max_tokens", "a positive integer is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "a non-empty list of messages is required")

    chat_messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        chat_messages.append({"role": "system", "content": _system_text(body["system"])})
    for i, message in enumerate(messages):
        chat_messages.extend(_chat_messages_of(message, f"messages[{i}]"))

    chat: dict[str, Any] = {"model": model, "messages": chat_messages, "max_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            value = body[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise _invalid(name, "a number is required")
            chat[name] = value
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid("stop_sequences", "a list of strings is required")
        if stops:
            chat["stop"] = list(stops)
    if body.get("metadata") is not None:
        user = _user_of(body["metadata"])
        if user is not None:
            chat["user"] = user
    if body.get("tools") is not None:
        chat["tools"] = _chat_tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat.update(_chat_tool_choice(body["tool_choice"]))
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _invalid("stream", "true or false is required")
        chat["stream"] = stream
        if stream:
            chat["stream_options"] = {"include_usage": True}
    return chat


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _invalid("system", "a string or a list of text blocks is required")
    parts = []
    for j, block in enumerate(system):
        path = f"system[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _unsupported(f"{path}.type", "only text blocks are supported in system")
        parts.append(_text_of(block, path))
    return "\n\n".join(parts)


def _text_of(block: dict[str, Any], path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{path}.text", "a string is required")
    return text


def _user_of(metadata: Any) -> str | None:
    if not isinstance(metadata, dict):
        raise _invalid("metadata", "an object is required")
    for key in metadata:
        if key != "user_id":
            raise _unsupported(f"metadata.{key}", "only metadata.user_id is supported")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise _invalid("metadata.user_id", "a string is required")
    return user


def _chat_messages_of(message: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise _invalid(path, "an object with role and content is required")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _invalid(f"{path}.role", "must be user or assistant")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _invalid(f"{path}.content", "a string or a list of content blocks is required")
    if role == "assistant":
        return [_assistant_message(content, f"{path}.content")]
    return _user_messages(content, f"{path}.content")


def _assistant_message(blocks: list[Any], path: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        bpath = f"{path}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_of(block, bpath))
        elif kind == "tool_use":
            calls.append(_tool_call_of(block, bpath))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # replayed reasoning: the chat upstream has no place for it (decisions.md)
        else:
            raise _unsupported(f"{bpath}.type", f"block type {kind!r} is not supported in assistant turns")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_call_of(block: dict[str, Any], path: str) -> dict[str, Any]:
    call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise _invalid(path, "tool_use needs a string id and name")
    if not isinstance(tool_input, dict):
        raise _invalid(f"{path}.input", "an object is required")
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(tool_input, ensure_ascii=False)},
    }


def _user_messages(blocks: list[Any], path: str) -> list[dict[str, Any]]:
    # Chat completions wants each tool result as its own "tool" message right after the
    # assistant turn that asked, so tool results go first and the rest of the turn follows.
    tool_messages: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        bpath = f"{path}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, bpath)})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, bpath)}})
        elif kind == "tool_result":
            message, images = _tool_message(block, bpath)
            tool_messages.append(message)
            tool_images.extend(images)
        else:
            raise _unsupported(f"{bpath}.type", f"block type {kind!r} is not supported in user turns")
    out = list(tool_messages)
    # The tool results' images go in the user turn after every tool message, ahead of its text.
    parts = tool_images + parts
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _image_url(block: dict[str, Any], path: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _invalid(f"{path}.source", "an image source object is required")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise _invalid(f"{path}.source", "base64 images need media_type and data strings")
        return f"data:{media};base64,{data}"
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str):
            raise _invalid(f"{path}.source.url", "a string is required")
        return url
    raise _unsupported(f"{path}.source.type", f"image source {kind!r} is not supported")


def _tool_message(block: dict[str, Any], path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool_result as a "tool" message, and its images, which a tool message cannot carry (a
    coding agent's file-reading tool returns screenshots this way)."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise _invalid(f"{path}.tool_use_id", "a string is required")
    content = block.get("content", "")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            ppath = f"{path}.content[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_text_of(part, ppath))
            elif kind == "image":
                images.append({"type": "image_url", "image_url": {"url": _image_url(part, ppath)}})
            else:
                raise _unsupported(f"{ppath}.type", f"{kind!r} in a tool result is not supported (text and images only)")
        content = "\n".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise _invalid(f"{path}.content", "a string or a list of text and image blocks is required")
    return {"role": "tool", "tool_call_id": call_id, "content": content}, images


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("tools", "a list is required")
    out = []
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid(path, "an object is required")
        if tool.get("type") not in (None, "custom"):
            raise _unsupported(f"{path}.type", f"server tool {tool.get('type')!r} is not supported")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise _invalid(path, "a tool needs a string name and an input_schema object")
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise _invalid("tool_choice", "an object is required")
    kind = choice.get("type")
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "none":
        out = {"tool_choice": "none"}
    elif kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _invalid("tool_choice.name", "a string is required")
        out = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    else:
        raise _unsupported("tool_choice.type", f"{kind!r} is not supported")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False
    return out


# --- responses -------------------------------------------------------------------------------


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def matched_stop_of(choice: dict[str, Any]) -> str | None:
    """The stop sequence the upstream says it matched: vLLM's `stop_reason`, SGLang's `matched_stop`.

    Either may also be an integer (a stop token id), which is an ordinary end of turn."""
    for key in ("stop_reason", "matched_stop"):
        value = choice.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def stop_reason_of(finish_reason: str | None, matched_stop: str | None) -> str:
    if finish_reason == "stop" and matched_stop is not None:
        return "stop_sequence"
    return FINISH_TO_STOP_REASON.get(finish_reason or "stop", "end_turn")


def _tool_input(arguments: Any, call_id: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError) as exc:
        raise UpstreamError(f"the upstream's tool call {call_id} has arguments that are not JSON") from exc
    if not isinstance(parsed, dict):
        raise UpstreamError(f"the upstream's tool call {call_id} has arguments that are not a JSON object")
    return parsed


def from_chat_response(chat: dict[str, Any], *, model: str) -> dict[str, Any]:
    """A non-streaming chat completion as a Messages response."""
    choices = chat.get("choices") or []
    choice = choices[0] if choices else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content") or message.get("refusal")
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        call_id = call.get("id") or "toolu_" + secrets.token_hex(12)
        content.append(
            {
                "type": "tool_use",
                "id": call_id,
                "name": function.get("name", ""),
                "input": _tool_input(function.get("arguments"), call_id),
            }
        )
    matched = matched_stop_of(choice)
    stop_reason = stop_reason_of(choice.get("finish_reason"), matched)
    usage = chat.get("usage") or {}
    return {
        "id": new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": matched if stop_reason == "stop_sequence" else None,
        "usage": {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
        },
    }


# --- streams ---------------------------------------------------------------------------------


class StreamTranslator:
    """chat.completion.chunk objects in, Messages stream events out, one chunk at a time.

    Blocks are numbered in order of appearance; a block is stopped when the next one starts
    (text after a tool call opens a new text block), and the last one in finish()."""

    def __init__(self, *, model: str, message_id: str, stop_sequences: list[str] | None = None) -> None:
        self.model = model
        self.message_id = message_id
        self.stop_sequences = stop_sequences
        self.input_tokens = 0
        self.output_tokens = 0
        self._started = False
        self._blocks = 0
        self._open: int | None = None  # index of the open block
        self._open_is_text = False
        self._tool_blocks: dict[int, int] = {}  # the upstream's tool call index -> our block index
        self._finish_reason: str | None = None
        self._matched_stop: str | None = None

    def _start(self, events: list[Event]) -> None:
        self._started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }
        events.append(("message_start", {"type": "message_start", "message": message}))

    def _close_open(self, events: list[Event]) -> None:
        if self._open is not None:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": self._open}))
            self._open = None

    def _open_block(self, events: list[Event], block: dict[str, Any], *, is_text: bool) -> int:
        self._close_open(events)
        index = self._blocks
        self._blocks += 1
        self._open, self._open_is_text = index, is_text
        events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        return index

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        usage = chunk.get("usage")
        if usage:
            self.input_tokens = int(usage.get("prompt_tokens") or self.input_tokens)
            self.output_tokens = int(usage.get("completion_tokens") or self.output_tokens)
        if not self._started:
            self._start(events)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                if self._open is None or not self._open_is_text:
                    self._open_block(events, {"type": "text", "text": ""}, is_text=True)
                delta_event = {"type": "text_delta", "text": text}
                events.append(("content_block_delta", {"type": "content_block_delta", "index": self._open, "delta": delta_event}))
            for call in delta.get("tool_calls") or ():
                self._feed_tool_call(events, call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                self._matched_stop = matched_stop_of(choice)
        return events

    def _feed_tool_call(self, events: list[Event], call: dict[str, Any]) -> None:
        upstream_index = call.get("index", 0)
        function = call.get("function") or {}
        index = self._tool_blocks.get(upstream_index)
        opened = index is None
        if index is None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or "toolu_" + secrets.token_hex(12),
                "name": function.get("name") or "",
                "input": {},
            }
            index = self._open_block(events, block, is_text=False)
            self._tool_blocks[upstream_index] = index
        arguments = function.get("arguments")
        # The opening chunk's empty arguments become the empty first delta Anthropic sends too.
        if isinstance(arguments, str) and (arguments or opened):
            # An upstream that interleaves two calls' arguments gets deltas on the earlier (already
            # stopped) index; clients accumulate by index, so the input still assembles.
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if not self._started:
            self._start(events)
        self._close_open(events)
        matched = self._matched_stop
        if matched is not None and self.stop_sequences is not None and matched not in self.stop_sequences:
            matched = None
        stop_reason = stop_reason_of(self._finish_reason, matched)
        delta = {"stop_reason": stop_reason, "stop_sequence": matched if stop_reason == "stop_sequence" else None}
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events


_EVENT_PREFIX: dict[str, bytes] = {}


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    prefix = _EVENT_PREFIX.get(event)
    if prefix is None:
        prefix = _EVENT_PREFIX[event] = f"event: {event}\ndata: ".encode()
    # orjson writes compact JSON, UTF-8 as it is (like json.dumps with ensure_ascii=False). Text
    # it cannot encode (a lone surrogate the upstream escaped) goes out \u-escaped instead.
    try:
        return prefix + orjson.dumps(data) + b"\n\n"
    except TypeError:
        return prefix + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def frames_of(events: list[Event]) -> bytes:
    """The SSE bytes of a list of events, in order."""
    if len(events) == 1:
        name, data = events[0]
        return sse_frame(name, data)
    return b"".join([sse_frame(name, data) for name, data in events])
