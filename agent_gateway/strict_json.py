"""Strict JSON for untrusted bytes: bounded nesting checked before parsing, no repeated keys,
no NaN/Infinity, UTF-8 only. Pure (no HTTP); `web.bodies` and `payments.wire` apply it.

The nesting bound is checked by a byte scan that never recurses, before `json.loads` sees the
text: CPython's decoder recurses once per level, and with a high recursion limit a deep enough
document overflows the C stack and kills the process instead of raising.
"""

from __future__ import annotations

import functools
import json
import re
from array import array
from collections.abc import Collection
from itertools import accumulate
from typing import Any

import orjson

DEFAULT_MAX_DEPTH = 64

# Only quotes, brackets and backslashes (which may escape a quote) matter to the nesting.
_NOT_MARKS = bytes(b for b in range(256) if b not in b'"[]{}\\')
_ESCAPED = b"\\/bfnrtu"  # a backslash and what it can escape besides `"` and `\`
_NOT_ESCAPES = bytes(b for b in range(256) if b not in b'"[]{}' + _ESCAPED)
# An opener counts +1 and a closer -1 (as signed bytes), whatever its kind.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
# An escape that spells an ASCII lowercase letter or "_" (`\u006d` is "m"): the only way to write a
# key such as "model" without the literal text `"model"`. Encoders never escape those characters.
_LETTER_ESCAPE = re.compile(rb"\\u00(?:[67][0-9a-fA-F]|5[fF])")
_NUL_OR_SURROGATE = re.compile("[\x00\ud800-\udfff]")
_NUL_OR_SURROGATE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
# Numbers orjson does not read or write as json does: integers past 64 bits (orjson reads them as
# floats, and refuses to write them) and numbers past a double's range (json reads 1e400 as
# infinity and writes `Infinity`; orjson refuses to read it and writes infinity as null). Found
# with one translate (every digit becomes "0", "E" becomes "e") and substring searches, many
# times faster than a regular expression; a match anywhere (strings included) takes the json way.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_INTEGER, _BIG_EXPONENTS = b"0" * 19, (b"e000", b"e+000")


class JsonRefused(ValueError):
    """Text that is not acceptable JSON; `code` is a stable snake_case reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def exceeds_depth(raw: bytes, max_depth: int) -> bool:
    """True when arrays and objects in `raw` nest deeper than `max_depth`. Linear, iterative.

    Brackets inside strings are ignored. Bracket kinds are not matched against each other: text
    with mismatched kinds is invalid and `json.loads` stops at the mismatch, so the number of
    brackets open before any point bounds how deep the decoder ever goes. `raw` must be valid
    UTF-8 (then no byte of a multi-byte character is ASCII)."""
    marks = raw.translate(None, _NOT_MARKS)
    if marks.count(b"[") + marks.count(b"{") <= max_depth:
        return False
    if b"\\" in marks:
        # Escapes, left to right as JSON reads them: `\\` pairs, then `\"`; any backslash left
        # starts an escape that cannot hide a quote. Done on the marks plus every character that
        # may follow a backslash, so each backslash still sits next to what it escapes.
        marks = raw.translate(None, _NOT_ESCAPES).replace(b"\\\\", b"").replace(b'\\"', b"")
    # Split on quotes: even parts are outside strings (an unterminated string is cut off).
    outside = b"".join(marks.translate(None, _ESCAPED).split(b'"')[::2])
    if outside.count(b"[") + outside.count(b"{") <= max_depth:
        return False
    return max(accumulate(array("b", outside.translate(_STEPS)))) > max_depth


def check_depth(raw: bytes, max_depth: int) -> None:
    if exceeds_depth(raw, max_depth):
        raise JsonRefused("json_too_deep", f"The JSON nests deeper than {max_depth} levels of arrays and objects.")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        _raise_repeated(pairs, None)
    return obj


def _raise_repeated(pairs: list[tuple[str, Any]], watched: Collection[str] | None) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and (watched is None or key in watched):
            raise JsonRefused("duplicate_key", f"The key {key!r} appears twice in one JSON object; send it once.")
        seen.add(key)


# Decoders are built once: json.loads with keyword arguments builds a new one per call.
_PLAIN = json.JSONDecoder(parse_constant=_refuse_constant)
_NO_REPEATS = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_refuse_repeats)


@functools.lru_cache(maxsize=8)
def _watching(watched: frozenset[str]) -> json.JSONDecoder:
    def refuse_watched_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            _raise_repeated(pairs, watched)
        return obj

    return json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=refuse_watched_repeats)


def _decode_utf8(raw: bytes, max_depth: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonRefused("invalid_json", "The JSON is not valid UTF-8.") from None
    check_depth(raw, max_depth)
    return text


def _parse(decoder: json.JSONDecoder, text: str) -> Any:
    try:
        return decoder.decode(text)
    except JsonRefused:
        raise
    except (ValueError, RecursionError):
        # RecursionError cannot happen under the depth bound; it is caught so that a bound set
        # above the interpreter's recursion limit still answers 400, not 500.
        raise JsonRefused("invalid_json", "The text is not valid JSON.") from None


def loads_strict(raw: bytes, max_depth: int) -> Any:
    """Decode untrusted JSON that may be stored: bounded depth, no key twice in any object, no
    NaN/Infinity, and no NUL or lone surrogate in any key or string."""
    data = _parse(_NO_REPEATS, _decode_utf8(raw, max_depth))
    # Both can only come from a \\u escape (raw ones are not valid JSON text or UTF-8).
    if _NUL_OR_SURROGATE_ESCAPE.search(raw) and has_unstorable_text(data):
        raise JsonRefused("invalid_field", "Text in the JSON must not contain NUL (\\u0000) characters "
                                           "or unpaired surrogates (\\ud800-\\udfff).")
    return data


def loads_watching(raw: bytes, max_depth: int, watched: frozenset[str]) -> Any:
    """Decode untrusted JSON fast: bounded depth, no NaN/Infinity, and none of the `watched`
    keys twice in any object (other keys are the receiver's business).

    The careful parse (a hook per object) runs only when a watched key could repeat: its quoted
    name occurs more than once, or the text has an escape that spells a lowercase letter or "_"
    (a key written as `"mod\\u0065l"` is "model"); escapes are the only way to spell a key
    other than its plain quoted name.

    Otherwise orjson reads it (4× faster than json on a chat body of a few kB) unless the text
    may hold an integer past 64 bits; what orjson refuses (a lone surrogate escape, a BOM, a
    number past a double's range, invalid text) goes to json, which answers as it always did.
    Either way the value is the one json reads."""
    if (b"\\u00" in raw and _LETTER_ESCAPE.search(raw)) or _may_repeat(raw, watched):
        return _parse(_watching(watched), _decode_utf8(raw, max_depth))
    if not exceeds_depth(raw, max_depth) and _LONG_INTEGER not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the json path below refuses it with its reason, or reads what orjson does not
    return _parse(_PLAIN, _decode_utf8(raw, max_depth))


def dumps_passed_on(data: Any, source: bytes) -> bytes:
    """The JSON bytes of a body changed on its way upstream: `data`, made from what
    `loads_watching` read in `source`. orjson writes it (compact, UTF-8) unless only json writes
    it as it was read: infinity (from a huge number in `source`) as `Infinity`, where orjson
    would write null; integers past 64 bits and lone surrogates, which orjson refuses."""
    marked = source.translate(_DIGITS_AS_ZERO)
    if not any(exponent in marked for exponent in _BIG_EXPONENTS):
        try:
            return orjson.dumps(data)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(data).encode()


def _may_repeat(raw: bytes, watched: frozenset[str]) -> bool:
    return any(raw.count(quoted) > 1 for quoted in _quoted(watched))


@functools.lru_cache(maxsize=8)
def _quoted(watched: frozenset[str]) -> tuple[bytes, ...]:
    return tuple(f'"{key}"'.encode() for key in watched)


def has_unstorable_text(value: Any) -> bool:
    """True when a key or string anywhere in `value` holds NUL or a lone surrogate: PostgreSQL
    cannot store NUL, and a lone surrogate cannot be encoded as UTF-8. Iterative."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _NUL_OR_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
