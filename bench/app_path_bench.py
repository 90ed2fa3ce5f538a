"""The gateway's own share of a non-streaming request, without the network: CPU per request.

    .venv/bin/python bench/app_path_bench.py [--requests 20000] [--redis URL]

Builds the app as `serve` does (SQLite, in-process leases, or Redis leases with --redis), then
calls it as an ASGI application, one request after another, on uvloop: admission (key, body,
checks, lease), the relay and the usage record. The key directory answers from a fixed record
and the upstream client returns a canned 16-token answer at once, so what is timed is the app's
code and, with --redis, the real lease round trips — not uvicorn's parser, the upstream HTTP
client or the kernel. CPU is the process's (time.process_time) over the timed requests, after a
warm-up. Steadier than bench/proxy_bench.py on a shared machine, and a complement to it: the
end-to-end figures are proxy_bench's."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop

from agent_gateway.app import create_app
from agent_gateway.db.models import KeyStatus, SubscriptionStatus
from agent_gateway.proxy.directory import KeyRecord
from agent_gateway.proxy.upstream import UpstreamResponse
from agent_gateway.settings import Settings

POOLS = """
[blocks]
day = "00:00-24:00"

[pools.bench]
name = "Bench"
models = ["test-model"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 10
prices = { day = "1.00" }
"""
REQUEST = json.dumps({"model": "test-model", "messages": [{"role": "user", "content": "benchmark prompt"}],
                      "max_tokens": 16}).encode()
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "test-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "token " * 16}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20},
}).encode()
HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"Python/3.11 aiohttp/3.14"), (b"accept", b"*/*"),
           (b"accept-encoding", b"gzip, deflate"), (b"authorization", b"Bearer sk_bench"),
           (b"content-type", b"application/json"), (b"content-length", str(len(REQUEST)).encode())]


class _CannedBody:
    async def read(self) -> bytes:
        return ANSWER

    def close(self) -> None:
        pass

    def release(self) -> None:
        pass


async def run(requests: int, redis_url: str | None) -> float:
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        (Path(tmp) / "pools.toml").write_text(POOLS)
        settings = Settings(database_url=f"sqlite:///{tmp}/bench.db", pools_file=Path(tmp) / "pools.toml",
                            redis_url=redis_url)
        app = create_app(settings)
        services = app.state.services
        now = datetime.now(UTC)
        record = KeyRecord(key_id="key_bench", name="bench", account_id="acct_bench", subscription_id="sub_bench",
                           key_status=KeyStatus.ACTIVE, deleted=False, subscription_status=SubscriptionStatus.ACTIVE,
                           pool_slug="bench", blocks=("day",), period_end=now + timedelta(days=1), created_at=now)

        async def lookup(token: str) -> KeyRecord:
            return record

        async def send(pool: Any, path: str, body: bytes, request_headers: Any, extra: Any,
                       api: str = "openai") -> UpstreamResponse:
            # What the real client reads from the request headers, then a canned answer.
            {name: request_headers[name] for name in ("content-type", "accept", "user-agent") if name in request_headers}
            return UpstreamResponse(200, "application/json", _CannedBody())

        services.directory.lookup = lookup
        services.upstream.send = send
        answered = [0]

        async def one() -> None:
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                     "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 50000), "method": "POST",
                     "root_path": "", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                     "query_string": b"", "headers": HEADERS, "state": {}}
            sent = False
            done = asyncio.Event()

            async def receive() -> dict:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": REQUEST, "more_body": False}
                await done.wait()
                return {"type": "http.disconnect"}

            async def reply(message: dict) -> None:
                if message["type"] == "http.response.start" and message["status"] == 200:
                    answered[0] += 1

            await app(scope, receive, reply)
            done.set()

        for _ in range(500):
            await one()
        services.usage._buffer.clear()  # no database writer runs here; keep the buffer small
        gc.collect()
        gc.freeze()
        started = time.process_time()
        for i in range(requests):
            await one()
            if i % 5000 == 4999:
                services.usage._buffer.clear()
        cpu = time.process_time() - started
        await services.leases.close()
        if answered[0] != requests + 500:
            raise SystemExit(f"only {answered[0]} of {requests + 500} requests were answered 200")
        return cpu / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--redis", metavar="URL", help="Redis leases (AGW_REDIS_URL) instead of in-process ones")
    opts = parser.parse_args()
    gc.set_threshold(20_000, 50, 1_000)  # as `serve` runs (cli._tune_garbage_collector)
    per_request = uvloop.run(run(opts.requests, opts.redis))
    leases = "Redis" if opts.redis else "in-process"
    print(f"app path, {leases} leases: {per_request * 1e6:.1f} µs of CPU per request ({opts.requests} requests)")


if __name__ == "__main__":
    main()
