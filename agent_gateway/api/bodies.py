"""Request bodies: bounded reads, JSON decoding and pydantic validation with field-named errors."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel
from starlette.requests import Request

from agent_gateway.errors import BodyTooLarge, InvalidRequest

ModelT = TypeVar("ModelT", bound=BaseModel)


class CamelBody(BaseModel):
    """Request bodies: camelCase on the wire, strict types, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False, extra="forbid", strict=True)


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"The request body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, model: type[ModelT], max_bytes: int) -> ModelT:
    raw = await read_body(request, max_bytes)
    if not raw.strip():
        raise InvalidRequest("The request needs a JSON body.", code="missing_body")
    data = parse_json_object(raw)
    if _has_nul(data):
        # PostgreSQL cannot store NUL in text; no field of ours has a use for it.
        raise InvalidRequest("Text in the request body must not contain NUL (\\u0000) characters.",
                             code="invalid_field")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation(exc), code="invalid_field") from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def describe_validation(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "is not a known field"
        problems.append(f"{where}: {message}" if where else message)
    return "Invalid request body: " + "; ".join(problems)
