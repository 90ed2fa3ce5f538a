"""Request bodies: bounded reads, strict JSON (bounded depth, no repeated keys), forms, and
pydantic validation with field-named errors. Every face reads its bodies through here; the JSON
rules themselves live in `strict_json`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel
from starlette.requests import Request
from starlette.responses import JSONResponse

from agent_gateway.errors import BodyTooLarge, InvalidRequest
from agent_gateway.settings import Settings
from agent_gateway.strict_json import JsonRefused, check_depth, loads_strict, loads_watching

ModelT = TypeVar("ModelT", bound=BaseModel)


class CamelBody(BaseModel):
    """Request bodies: camelCase on the wire, strict types, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False, extra="forbid", strict=True)


async def read_body(request: Request, max_bytes: int, headers: Mapping[str, str] | None = None) -> bytes:
    """The whole body, 413 past `max_bytes`. `headers`: the request's, already read into a dict
    (lower-case names), to spare building Starlette's Headers for one lookup."""
    declared = (request.headers if headers is None else headers).get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, model: type[ModelT], settings: Settings) -> ModelT:
    body = await read_optional_json(request, model, settings)
    if body is None:
        raise InvalidRequest("The request needs a JSON body.", code="missing_body")
    return body


async def read_optional_json(request: Request, model: type[ModelT], settings: Settings) -> ModelT | None:
    """Like `read_json`, but None for an empty body (a route that gives "no body" a meaning)."""
    raw = await read_body(request, settings.max_body_bytes)
    if not raw.strip():
        return None
    data = parse_json_object(raw, settings.max_json_depth)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc), code="invalid_field") from None


def parse_json_object(raw: bytes, max_depth: int, *, watched_keys: frozenset[str] | None = None) -> dict[str, Any]:
    """A JSON object from untrusted bytes, or a 400 naming the problem.

    Default (bodies we validate and may store): no key twice in any object, no NUL or lone
    surrogate in any text. With `watched_keys` (bodies we pass on, like /v1's): only those keys
    must not repeat, checked cheaply. Either way the nesting is bounded before parsing."""
    try:
        data = loads_strict(raw, max_depth) if watched_keys is None else loads_watching(raw, max_depth, watched_keys)
    except JsonRefused as exc:
        raise InvalidRequest(_BODY_MESSAGES.get(exc.code, exc.message), code=exc.code) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


_BODY_MESSAGES = {
    "invalid_json": "The request body is not valid JSON (UTF-8, no NaN or Infinity).",
}


async def read_form(request: Request, max_bytes: int, max_fields: int) -> dict[str, str]:
    """An urlencoded form: bounded size and field count, UTF-8, each field once, no NUL."""
    raw = await read_body(request, max_bytes)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=max_fields)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form is not valid UTF-8 or has too many fields.", code="invalid_form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise InvalidRequest(f"The form field {name!r} appears twice; send it once.", code="duplicate_key")
        if "\x00" in name or "\x00" in value:
            raise InvalidRequest("Form fields must not contain NUL characters.", code="invalid_form")
        form[name] = value
    return form


def describe_validation(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "is not a known field"
        problems.append(f"{where}: {message}" if where else message)
    return "Invalid request body: " + "; ".join(problems)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BoundedBody:
    """ASGI wrapper for an inner app that reads and parses bodies without bounds of its own (the
    MCP SDK): the whole body is read first, refused with 413 past `max_bytes` and with 400 when
    it is JSON nested deeper than `max_depth`, then replayed to the inner app unchanged.

    Mount it in front of that app only; routes that read their bodies through this module
    already have both bounds and pay nothing for this."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            raw = await self._read(scope, receive)
            if raw:
                try:
                    raw.decode("utf-8")
                    check_depth(raw, self.max_depth)
                except UnicodeDecodeError:
                    raise InvalidRequest("The request body is not valid UTF-8.", code="invalid_json") from None
                except JsonRefused as exc:
                    raise InvalidRequest(exc.message, code=exc.code) from None
        except InvalidRequest as exc:
            body = {"error": {"type": exc.type, "code": exc.code, "message": exc.message}}
            await JSONResponse(body, status_code=exc.status)(scope, receive, send)
            return
        await self.app(scope, _replay(raw, receive), send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        too_large = BodyTooLarge(f"The request body is larger than {self.max_bytes} bytes.")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidRequest("The client went away before sending the whole body.", code="incomplete_body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would say it

    return replay
