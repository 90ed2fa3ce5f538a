"""The pieces behind the attempt limits: the address an attempt counts under, the forwarded-header
rule, and the sliding one-minute log (in memory, in Redis, and when Redis is down)."""

from __future__ import annotations

import uuid

import pytest

from agent_gateway.web.edge import TrustForwardedHeaders
from agent_gateway.web.throttle import client_address
from agent_gateway.ratelimit import MemoryAttemptLimiter, RedisAttemptLimiter

pytestmark = pytest.mark.anyio


def test_an_ipv6_client_counts_per_64_and_a_mapped_ipv4_as_itself():
    at = lambda host: client_address({"client": (host, 1234)})  # noqa: E731
    assert at("2001:db8:1:2::1") == at("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert at("2001:db8:1:3::1") != at("2001:db8:1:2::1")
    assert at("::ffff:203.0.113.9") == at("203.0.113.9") == "203.0.113.9"
    assert client_address({"client": None}) == "unknown"


async def forwarded(trusted: str, peer: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    seen = {}

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.update(client=scope["client"][0], scheme=scope["scheme"])

    scope = {"type": "http", "client": (peer, 5000), "scheme": "http", "headers": headers}
    await TrustForwardedHeaders(app, trusted)(scope, None, None)
    return seen["client"], seen["scheme"]


@pytest.mark.parametrize("peer,headers,expected", [
    # A trusted proxy: the rightmost entry that is not one of ours is the client.
    ("10.0.0.5", [(b"x-forwarded-for", b"6.6.6.6, 2.2.2.2, 10.0.0.7")], ("2.2.2.2", "http")),
    ("10.0.0.5", [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"[2001:db8::5]:443")],
     ("2001:db8::5", "http")),
    ("10.0.0.5", [(b"x-forwarded-for", b"2.2.2.2:8443"), (b"x-forwarded-proto", b"http, https")], ("2.2.2.2", "https")),
    ("10.0.0.5", [(b"x-forwarded-for", b"10.0.0.9, 10.0.0.8")], ("10.0.0.9", "http")),
    # A garbled last hop, or an unknown scheme: the peer and its scheme stay.
    ("10.0.0.5", [(b"x-forwarded-for", b"2.2.2.2, not-an-ip"), (b"x-forwarded-proto", b"gopher")],
     ("10.0.0.5", "http")),
    # Anyone else's forwarded headers change nothing.
    ("192.0.2.1", [(b"x-forwarded-for", b"2.2.2.2"), (b"x-forwarded-proto", b"https")], ("192.0.2.1", "http")),
])
async def test_forwarded_headers_count_only_from_trusted_proxies(peer, headers, expected):
    assert await forwarded("10.0.0.0/8", peer, headers) == expected


async def test_the_memory_log_slides_over_one_minute():
    now = [1000.0]
    limiter = MemoryAttemptLimiter(3, now=lambda: now[0])
    assert [await limiter.take("a") for _ in range(3)] == [None, None, None]
    assert await limiter.take("a") == 60 and await limiter.check("a") == 60
    assert await limiter.take("b") is None  # another address has its own allowance
    now[0] += 30
    await limiter.record("a")  # a failed attempt is counted even over the limit
    assert await limiter.check("a") == 30
    now[0] += 30.5  # the first three aged out; the one recorded at +30 s remains
    assert await limiter.check("a") is None


async def test_the_memory_log_forgets_addresses_past_its_bound():
    limiter = MemoryAttemptLimiter(1, max_addresses=100)
    for i in range(1000):
        await limiter.record(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._log) <= 100



async def test_the_redis_log_is_shared_and_bounded(redis_url):
    prefix = f"agwtest-{uuid.uuid4().hex[:8]}"
    first, second = (RedisAttemptLimiter(redis_url, 3, prefix=prefix) for _ in range(2))
    try:
        assert await first.take("a") is None and await second.take("a") is None
        await first.record("a")
        assert 55 <= await second.check("a") <= 60 and 55 <= await first.take("a") <= 60
        for _ in range(10):
            await second.record("a")
        assert await first._redis.zcard(f"{prefix}:attempts:a") == 3
        assert 0 < await first._redis.pttl(f"{prefix}:attempts:a") <= 60_000
    finally:
        await first._redis.delete(f"{prefix}:attempts:a")
        await first.close()
        await second.close()


async def test_with_redis_down_attempts_are_still_limited_by_the_process():
    limiter = RedisAttemptLimiter("redis://127.0.0.1:9/0", 2, connect_timeout_s=0.2)
    try:
        assert [await limiter.take("a") for _ in range(2)] == [None, None]
        assert await limiter.take("a") == 60
    finally:
        await limiter.close()
