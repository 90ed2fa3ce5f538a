"""The iterative depth scan agrees with the real nesting of any JSON document, however its strings
are escaped; repeated keys are found however they are spelled."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_gateway.strict_json import JsonRefused, dumps_passed_on, exceeds_depth, loads_strict, loads_watching

# Text full of what can fool a scanner: quotes, backslashes, brackets, escapes, non-ASCII.
TRICKY = st.text(alphabet=st.sampled_from(list('ab"\\[]{}/\n\tu0é😀')), max_size=8)
DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY, inner, max_size=3),
    max_leaves=40,
)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS, st.booleans(), st.integers(min_value=0, max_value=8))
def test_the_depth_scan_agrees_with_the_real_nesting(document, ascii_only, max_depth):
    raw = json.dumps(document, ensure_ascii=ascii_only).encode()
    assert exceeds_depth(raw, max_depth) == (_depth(document) > max_depth)


@pytest.mark.parametrize("raw", [
    b'["]' + b"[" * 70 + b"]" * 70 + b'"]',        # brackets inside a string: depth 1
    b'["\\\\"' + b"," + b"[" * 5 + b"]" * 5 + b"]",  # an escaped backslash ends the string
    b'["\\"' + b"[" * 70 + b'"]',                # an escaped quote does not end it
])
def test_brackets_inside_strings_do_not_count(raw):
    json.loads(raw)
    assert not exceeds_depth(raw, 8)


@pytest.mark.parametrize("raw", [
    b'[1,' + b"[" * 9 + b'"]]]]]]]]]"' + b"]" * 9 + b"]",  # closers in a string close nothing
    b'["\\\\"' + b"[" * 9 + b'"' + b"]" * 9 + b"]",  # the quote after an escaped backslash ends the string
    b"[" * 100_000,                                # never closed
])
def test_structure_hidden_behind_strings_is_still_counted(raw):
    assert exceeds_depth(raw, 8)


@pytest.mark.parametrize("raw,key", [
    (b'{"a":1,"a":2}', "a"),
    (b'{"x":[{"b":1,"b":2}]}', "b"),
    (b'{"model":1,"mod\\u0065l":2}', "model"),
])
def test_a_repeated_key_is_refused_by_name(raw, key):
    with pytest.raises(JsonRefused) as refused:
        loads_strict(raw, 64)
    assert refused.value.code == "duplicate_key" and repr(key) in refused.value.message


def test_only_watched_keys_must_not_repeat_on_the_fast_path():
    watched = frozenset({"model", "stream"})
    assert loads_watching(b'{"model":"m","n":1,"n":2}', 64, watched) == {"model": "m", "n": 2}
    for raw in (b'{"model":"m","model":"n"}', b'{"model":"m","\\u006dodel":"n"}',
                b'{"stream":true,"m":{"stream":1,"stream":2}}'):
        with pytest.raises(JsonRefused):
            loads_watching(raw, 64, watched)


@pytest.mark.parametrize("raw", [b'{"a":NaN}', b'{"a":-Infinity}', b'{"a":"\\u0000"}', b'{"\\ud800":1}',
                                 b'{"a":"\\udc00x"}', b"\xff{}"])
def test_what_cannot_be_stored_or_is_not_json_is_refused(raw):
    with pytest.raises(JsonRefused):
        loads_strict(raw, 64)


def test_a_surrogate_pair_is_a_character_not_a_lone_surrogate():
    assert loads_strict(b'{"a":"\\ud83d\\ude00"}', 64) == {"a": "😀"}


WATCHED = frozenset({"model", "stream", "stream_options"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
))
def test_the_fast_path_reads_what_json_reads(value):
    """orjson is used where it reads exactly as json: any document json writes (big integers and
    lone surrogates included) decodes to the same value, and is re-encoded to the same value."""
    raw = json.dumps({"model": "m", "x": value}).encode()
    assert loads_watching(raw, 64, WATCHED) == json.loads(raw)
    again = dumps_passed_on({**loads_watching(raw, 64, WATCHED), "stream": True}, raw)
    assert json.loads(again) == {**json.loads(raw), "stream": True}


@pytest.mark.parametrize("raw", [
    b'{"model":"m","n":18446744073709551616}',   # past 64 bits: orjson would read a float
    b'{"model":"m","n":-9223372036854775809}',
    b'{"model":"m","n":1e400}',                  # json reads infinity; orjson refuses it
    b'{"model":"m","t":"\\ud800"}',              # a lone surrogate: orjson refuses it
])
def test_what_orjson_reads_differently_is_passed_on_as_json_reads_it(raw):
    """Re-encoded bodies keep json's reading: integers exact, infinity as before, surrogates kept."""
    sent = dumps_passed_on({**loads_watching(raw, 64, WATCHED), "stream": True}, raw)
    assert sent == json.dumps({**json.loads(raw), "stream": True}).encode()


def test_a_changed_body_is_written_compact_and_in_utf8():
    raw = '{"model": "m", "messages": [{"content": "héllo"}]}'.encode()
    assert dumps_passed_on(loads_watching(raw, 64, WATCHED), raw) == '{"model":"m","messages":[{"content":"héllo"}]}'.encode()
