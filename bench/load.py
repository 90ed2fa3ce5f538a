"""Load tool: N workers, each with its own connection and its own API key, against any base URL.

    python bench/load.py --base-url http://127.0.0.1:8080/v1 --keys keys.txt --concurrency 16 \
        --requests 4000 [--seconds 5] [--stream --chunks 100] [--model test-model] \
        [--api chat|messages] [--auth bearer|x-api-key]

Prints one JSON line: requests, errors, seconds, requests per second, latency p50/p90/p99 in ms
(time to the last byte) and, when streaming, the SSE events and content chunks per response.
`--api chat` posts OpenAI chat completions; `--api messages` posts Anthropic Messages
({model, max_tokens, messages, stream}, with an anthropic-version header and the key as x-api-key
unless `--auth bearer`). `--seconds` runs for that long instead of a fixed number of requests.
Works against any OpenAI- or Anthropic-compatible gateway, so another gateway can be measured
the same way."""

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


def count_stream(body: bytes, api: str) -> tuple[int, int]:
    """SSE events (blank-line terminated) and content chunks (text deltas) in one streamed reply."""
    marker = b"event: content_block_delta" if api == "messages" else b'"content":"'
    return body.count(b"\n\n"), body.count(marker)


async def send(session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes, stream: bool,
               api: str, errors: list[str], counts: list[tuple[int, int]]) -> bool:
    """One request to its last byte; False (and the error recorded) unless it was a 200."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if stream:
                parts = [part async for part in response.content.iter_any()]
            else:
                await response.read()
            if response.status != 200:
                errors.append(str(response.status))
                return False
    except aiohttp.ClientError as exc:
        errors.append(type(exc).__name__)
        return False
    if stream:
        counts.append(count_stream(b"".join(parts), api))
    return True


async def worker(url: str, headers: dict[str, str], body: bytes, stream: bool, api: str, quota: list[int],
                 deadline: float, latencies: list[float], errors: list[str],
                 counts: list[tuple[int, int]], starts: list[float] | None = None) -> None:
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        while quota[0] > 0 and time.perf_counter() < deadline:
            quota[0] -= 1
            started = time.perf_counter()
            if await send(session, url, headers, body, stream, api, errors, counts):
                latencies.append(time.perf_counter() - started)
                if starts is not None:
                    starts.append(started)


def request_of(api: str, auth: str, key: str, model: str, chunks: int, stream: bool) -> tuple[str, dict[str, str], bytes]:
    """The path, headers and body of one request."""
    payload: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "benchmark prompt"}],
                                  "max_tokens": chunks}
    if stream:
        payload["stream"] = True
    headers = {"Content-Type": "application/json"}
    if auth == "x-api-key":
        headers["x-api-key"] = key
    else:
        headers["Authorization"] = f"Bearer {key}"
    if api == "messages":
        headers["anthropic-version"] = "2023-06-01"
    return ("/messages" if api == "messages" else "/chat/completions"), headers, json.dumps(payload).encode()


async def run(base_url: str, keys: list[str], concurrency: int, requests: int, stream: bool,
              chunks: int, model: str, warmup: int, api: str = "chat", auth: str = "bearer",
              seconds: float | None = None) -> dict:
    if len(keys) < concurrency:
        raise SystemExit(f"need {concurrency} keys (one per connection), got {len(keys)}")
    calls = [request_of(api, auth, keys[i], model, chunks, stream) for i in range(concurrency)]
    url = base_url.rstrip("/") + calls[0][0]
    forever = float("inf")
    warm_latencies: list[float] = []
    if warmup:
        await asyncio.gather(*(worker(url, headers, body, stream, api, [warmup // concurrency + 1], forever,
                                      warm_latencies, [], []) for _, headers, body in calls))
    quota = [requests if seconds is None else 1 << 62]
    latencies: list[float] = []
    starts: list[float] = []
    errors: list[str] = []
    counts: list[tuple[int, int]] = []
    started = time.perf_counter()
    deadline = forever if seconds is None else started + seconds
    await asyncio.gather(*(worker(url, headers, body, stream, api, quota, deadline, latencies, errors, counts,
                                  starts) for _, headers, body in calls))
    elapsed = time.perf_counter() - started
    result = {"api": api, "concurrency": concurrency, "stream": stream, **summary(
        latencies, [at - started for at in starts], errors, elapsed), "warmup_requests": len(warm_latencies)}
    if counts:
        result["events_per_response"] = [min(e for e, _ in counts), max(e for e, _ in counts)]
        result["chunks_per_response"] = [min(c for _, c in counts), max(c for _, c in counts)]
    return result


def summary(latencies: list[float], offsets: list[float], errors: list[str], elapsed: float) -> dict:
    """Requests, rate and latency (ms): p50/p90/p99, max, how many took over 100 ms, and the
    slowest five as [seconds into the run when sent, ms] so a stall can be placed in time."""
    ms = [x * 1000 for x in latencies]
    slowest = sorted(zip(ms, offsets), reverse=True)[:5]
    return {
        "requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
        "seconds": round(elapsed, 3), "rps": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(ms, 0.50), 3), "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3), "max_ms": round(max(ms), 3) if ms else None,
        "over_100ms": sum(x > 100 for x in ms), "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
        "slowest": [[round(at, 3), round(x, 1)] for x, at in slowest],
    }


async def open_loop(base_url: str, keys: list[str], rate: float, seconds: float, stream: bool, chunks: int,
                    model: str, warmup_s: float, api: str = "chat", auth: str = "bearer") -> dict:
    """A fixed arrival rate spread over the keys: arrival i is due at start + i / rate, whatever
    happened to the ones before it. It goes out on a key with nothing in flight (one connection
    per key); when every key is busy it is not sent and counts as late ("no free key"). Latency
    runs from the arrival's due time, so a send the load tool itself delayed is counted too."""
    calls = [request_of(api, auth, key, model, chunks, stream) for key in keys]
    url = base_url.rstrip("/") + calls[0][0]
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, force_close=False))
                for _ in calls]
    free = list(range(len(calls)))  # a stack: the key freed last goes next, its connection is warm
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, due: float, measured: bool, sink: tuple[list[float], list[float], list[str]]) -> None:
        latencies, offsets, errors = sink
        _, headers, body = calls[index]
        try:
            if await send(sessions[index], url, headers, body, stream, api, errors, counts) and measured:
                latencies.append(time.perf_counter() - due)
                offsets.append(due - measured_from)
        finally:
            free.append(index)

    async def phase(length: float, measured: bool) -> tuple[list[float], list[float], list[str], int, int, float]:
        sink: tuple[list[float], list[float], list[str]] = ([], [], [])
        late = sent = 0
        lag: list[float] = []
        begin = time.perf_counter()
        total = int(length * rate)
        i = 0
        while i < total:
            now = time.perf_counter()
            while i < total and begin + i / rate <= now:
                due = begin + i / rate
                i += 1
                if not free:
                    late += 1
                    continue
                sent += 1
                lag.append(now - due)
                task = asyncio.create_task(one(free.pop(), due, measured, sink))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if i < total:
                await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
        return (*sink, late, sent, max(lag) if lag else 0.0)

    counts: list[tuple[int, int]] = []
    measured_from = time.perf_counter()
    try:
        if warmup_s > 0:
            await phase(warmup_s, False)
        measured_from = time.perf_counter()
        latencies, offsets, errors, late, sent, max_lag = await phase(seconds, True)
        offered_s = time.perf_counter() - measured_from
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for session in sessions:
            await session.close()
    result = {"api": api, "mode": "open-loop", "offered_rps": rate, "keys": len(calls), "stream": stream,
              **summary(latencies, offsets, errors, offered_s), "sent": sent, "late_no_free_key": late,
              "max_send_lag_ms": round(max_lag * 1000, 3)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--keys", required=True, help="file with one API key per line")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, help="run this long (after warm-up) instead of --requests")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--chunks", type=int, default=16, help="max_tokens: chunks per streamed reply")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--api", choices=["chat", "messages"], default="chat",
                        help="chat: POST {base}/chat/completions; messages: POST {base}/messages (Anthropic)")
    parser.add_argument("--auth", choices=["bearer", "x-api-key"],
                        help="how the key is sent (default: bearer for chat, x-api-key for messages)")
    parser.add_argument("--rate", type=float,
                        help="open loop: send this many requests per second over --keys-used keys for "
                             "--seconds (default 10), after --warmup-seconds at the same rate")
    parser.add_argument("--keys-used", type=int, default=64, help="open loop: how many keys to spread over")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="open loop: unmeasured lead-in")
    args = parser.parse_args(argv)
    keys = [line.strip() for line in Path(args.keys).read_text().splitlines() if line.strip()]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    auth = args.auth or ("x-api-key" if args.api == "messages" else "bearer")
    if args.rate:
        if len(keys) < args.keys_used:
            raise SystemExit(f"need {args.keys_used} keys, got {len(keys)}")
        result = asyncio.run(open_loop(args.base_url, keys[:args.keys_used], args.rate, args.seconds or 10.0,
                                       args.stream, args.chunks, args.model, args.warmup_seconds, args.api, auth))
    else:
        result = asyncio.run(run(args.base_url, keys, args.concurrency, args.requests, args.stream,
                                 args.chunks, args.model, args.warmup, args.api, auth, args.seconds))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
