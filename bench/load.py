"""Load tool: N workers, each with its own connection and its own API key, against any base URL.

    python bench/load.py --base-url http://127.0.0.1:8080/v1 --keys keys.txt --concurrency 16 \
        --requests 4000 [--stream --chunks 100] [--model test-model]

Prints one JSON line: requests, errors, seconds, requests per second, latency p50/p90/p99 in ms
(time to the last byte). Works against any OpenAI-compatible gateway, so another gateway can be
measured the same way."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def worker(url: str, key: str, body: bytes, stream: bool, quota: list[int],
                 latencies: list[float], errors: list[str]) -> None:
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        while quota[0] > 0:
            quota[0] -= 1
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if stream:
                        async for _ in response.content.iter_any():
                            pass
                    else:
                        await response.read()
                    if response.status != 200:
                        errors.append(str(response.status))
                        continue
            except aiohttp.ClientError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append(time.perf_counter() - started)


async def run(base_url: str, keys: list[str], concurrency: int, requests: int, stream: bool,
              chunks: int, model: str, warmup: int) -> dict:
    url = base_url.rstrip("/") + "/chat/completions"
    payload = {"model": model, "messages": [{"role": "user", "content": "benchmark prompt"}],
               "max_tokens": chunks}
    if stream:
        payload["stream"] = True
    body = json.dumps(payload).encode()
    if len(keys) < concurrency:
        raise SystemExit(f"need {concurrency} keys (one per connection), got {len(keys)}")
    if warmup:
        await asyncio.gather(*(worker(url, keys[i], body, stream, [warmup // concurrency + 1], [], [])
                               for i in range(concurrency)))
    quota, latencies, errors = [requests], [], []
    started = time.perf_counter()
    await asyncio.gather(*(worker(url, keys[i], body, stream, quota, latencies, errors)
                           for i in range(concurrency)))
    seconds = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return {
        "concurrency": concurrency, "stream": stream, "requests": len(latencies), "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5], "seconds": round(seconds, 3),
        "rps": round(len(latencies) / seconds, 1),
        "p50_ms": round(percentile(ms, 0.50), 3), "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3), "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--keys", required=True, help="file with one API key per line")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--chunks", type=int, default=16, help="max_tokens: chunks per streamed reply")
    parser.add_argument("--model", default="test-model")
    args = parser.parse_args(argv)
    keys = [line.strip() for line in Path(args.keys).read_text().splitlines() if line.strip()]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.base_url, keys, args.concurrency, args.requests, args.stream,
                             args.chunks, args.model, args.warmup))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
