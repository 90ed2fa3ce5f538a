"""The lease connection's RESP encoding, reply parser and URL reading (the live behaviour is in
tests/integration/test_leases_redis.py)."""

from __future__ import annotations

import pytest

from agent_gateway.proxy.redis_link import ReplyError, ReplyParser, _parse_url, encode


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert encode("EVALSHA", "ab", 1, b"k\r\n", 9_000) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\nk\r\n\r\n$4\r\n9000\r\n")


def test_replies_split_anywhere_come_out_whole_and_in_order() -> None:
    stream = b":1\r\n+OK\r\n-NOSCRIPT No matching script\r\n$3\r\na\r\n\r\n$-1\r\n*2\r\n:7\r\n$2\r\nhi\r\n:0\r\n"
    for cut in range(1, len(stream)):
        parser = ReplyParser()
        replies = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert replies[0] == 1 and replies[1] == "OK"
        assert isinstance(replies[2], ReplyError) and str(replies[2]).startswith("NOSCRIPT")
        assert replies[3:] == [b"a\r\n", None, [7, b"hi"], 0]


def test_garbage_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError):
        ReplyParser().feed(b"?what\r\n")


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/15", {"host": "127.0.0.1", "port": 6379, "db": 15, "password": None}),
    ("redis://:s%40cret@redis.internal/2", {"host": "redis.internal", "port": 6379, "db": 2, "password": "s@cret"}),
    ("redis://agw:pw@h:7000", {"host": "h", "port": 7000, "db": 0, "username": "agw", "password": "pw"}),
    ("unix:///run/redis.sock?db=3", {"path": "/run/redis.sock", "db": 3}),
])
def test_urls_are_read_like_redis_py_reads_them(url: str, expected: dict[str, object]) -> None:
    target = _parse_url(url)
    assert {name: target[name] for name in expected} == expected


def test_tls_urls_connect_with_tls() -> None:
    assert _parse_url("rediss://h:6380/0")["ssl"] is not None
    assert _parse_url("redis://h:6380/0")["ssl"] is None
