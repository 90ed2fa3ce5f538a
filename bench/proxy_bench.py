"""Proxy benchmark: the test upstream called directly vs through one gateway process, same run.

    .venv/bin/python bench/proxy_bench.py [--quick] [--client aiohttp|httpx] [--redis URL]
        [--only stream|non-stream] [--messages]
    .venv/bin/python bench/proxy_bench.py --throughput [--runs 3] [--concurrency 64] [--seconds 5]
        [--servers uvicorn,granian,uvicorn:2,uvicorn@DIR] [--redis URL] [--database URL]

Starts the test upstream and a gateway (SQLite; leases in process, or in Redis with --redis) as
separate processes, provisions one API key per connection, then runs bench/load.py at concurrency 1 / 16 / 64,
non-streaming and streaming (100 chunks), first direct, then through the gateway. Also holds
1,000 concurrent streams through the gateway and reads its peak RSS (not with --only). Prints a
Markdown report, with the streaming gateway / direct requests per second at concurrency 64.

With --messages it runs the Anthropic Messages rows instead: streaming 100 chunks at concurrency
1 / 16 / 64 (5 s per cell, 1.5 s with --quick), through a pool with `upstream_api = "anthropic"`
(passthrough to the upstream's /v1/messages; baseline: Messages sent to the upstream directly) and
through a pool with the default `upstream_api = "openai"` (translated to /v1/chat/completions;
baseline: chat completions sent to the upstream directly), on one gateway process, and reports
the gateway's CPU per chunk in each mode and their ratio.

With --throughput it runs only non-streaming requests at one concurrency (64 by default), --runs
times, each run the direct baseline first and then the gateway under every server in --servers,
and reports the gateway's CPU per request and requests per second with their spread."""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from agent_gateway.testing.processes import free_port, start_gateway

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
POOLS = """
[blocks]
day = "00:00-24:00"

[pools.bench]
name = "Bench"
models = ["test-model"]
upstreams = ["{upstream}/v1"]
seats = 5000
prices = {{ day = "1.00" }}
"""
# Messages rows: "bench" (upstream_api "openai", the default) translates; "claude" passes through.
MESSAGES_POOLS = POOLS + """
[pools.claude]
name = "Bench Messages"
models = ["test-model"]
upstreams = ["{upstream}/v1"]
upstream_api = "anthropic"
seats = 5000
prices = {{ day = "1.00" }}
"""
MESSAGES_CHUNKS = 100


def wait_http(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "agent_gateway", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def provision_keys(gateway: str, env: dict[str, str], count: int, pool: str = "bench") -> list[str]:
    created = subprocess.run([PYTHON, "-m", "agent_gateway", "accounts", "create", "bench"],
                             env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    account = re.search(r"(acct_\w+)", created).group(1)
    mk = re.search(r"(mk_\w+)", created).group(1)
    subprocess.run([PYTHON, "-m", "agent_gateway", "accounts", "credit", account, str(count)],
                   env={**os.environ, **env}, capture_output=True, check=True)
    headers = {"Authorization": f"Bearer {mk}"}
    keys: list[str] = []
    with httpx.Client(base_url=gateway, headers=headers, timeout=60) as http:
        while len(keys) < count:
            batch = min(100, count - len(keys))
            subs = http.post(f"/api/pools/{pool}/subscribe", json={"blocks": ["day"], "quantity": batch}).json()
            for sub in subs["data"]["subscriptions"]:
                minted = http.post("/api/keys/subscription", json={"name": "bench", "subscriptionId": sub["id"]})
                keys.append(minted.json()["data"]["apiKey"])
    return keys


def load(base_url: str, keys_file: Path, concurrency: int, requests: int, stream: bool, chunks: int,
         api: str = "chat", seconds: float | None = None, warmup: int | None = None) -> dict:
    args = [PYTHON, str(ROOT / "bench" / "load.py"), "--base-url", base_url, "--keys", str(keys_file),
            "--concurrency", str(concurrency), "--requests", str(requests), "--chunks", str(chunks),
            "--warmup", str(min(requests // 4, 400) if warmup is None else warmup), "--api", api]
    if stream:
        args.append("--stream")
    if seconds is not None:
        args += ["--seconds", str(seconds)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def hold_streams(gateway: str, keys: list[str], pid: int) -> dict:
    """Open one long stream per key at once; report how many completed and the gateway's peak RSS."""
    import asyncio

    import aiohttp

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.05)

    async def one(session: aiohttp.ClientSession, key: str, started: list[int]) -> bool:
        body = {"model": "test-model", "stream": True, "max_tokens": 100,
                "messages": [{"role": "user", "content": "hold"}]}
        async with session.post(gateway + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            if response.status != 200:
                return False
            started[0] += 1
            async for _ in response.content.iter_any():
                pass
            return True

    async def run() -> tuple[int, int, float]:
        started = [0]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(s, k, started) for k in keys), return_exceptions=True)
        return sum(r is True for r in results), started[0], time.perf_counter() - t0

    baseline = rss_mb(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ok, started, seconds = asyncio.run(run())
    stop.set()
    sampler.join()
    return {"streams": len(keys), "completed": ok, "rss_before_mb": round(baseline, 1),
            "rss_peak_mb": round(peak[0], 1), "seconds": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                        help="the gateway's upstream HTTP client (AGW_UPSTREAM_CLIENT)")
    parser.add_argument("--redis", metavar="URL", help="keep leases in this Redis (AGW_REDIS_URL)")
    parser.add_argument("--only", choices=["stream", "non-stream"],
                        help="run only these rows (and, for stream, skip the 1,000 held streams too)")
    parser.add_argument("--messages", action="store_true",
                        help="run the Anthropic Messages rows (passthrough vs translated) instead")
    parser.add_argument("--throughput", action="store_true",
                        help="run only non-streaming at one concurrency, --runs times, and report the spread")
    parser.add_argument("--runs", type=int, default=3, help="with --throughput: direct + gateway pairs")
    parser.add_argument("--concurrency", type=int, default=64, help="with --throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="with --throughput: per cell")
    parser.add_argument("--database", help="with --throughput: AGW_DATABASE_URL (default: a fresh SQLite file; "
                                           "`uvicorn:N` needs PostgreSQL)")
    parser.add_argument("--servers", default="uvicorn",
                        help="with --throughput: comma-separated ASGI servers, each its own gateway process "
                             "measured in turn within every run (uvicorn: `agent-gateway serve`; granian: "
                             "granian, if importable, serving the same app, one worker; uvicorn:N: `serve "
                             "--workers N`, its CPU summed over the workers; NAME@DIR: the gateway's "
                             "code from the checkout in DIR, e.g. the commit before a change)")
    opts = parser.parse_args()
    if opts.messages:
        print(messages_report(run_messages(opts)))
        return 0
    if opts.throughput:
        print(throughput_report(run_throughput(opts), opts))
        return 0
    scale = 0.2 if opts.quick else 1.0
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        work = Path(tmp)
        up_port, slow_port, gw_port = free_port(), free_port(), free_port()
        upstream = start(["test-upstream", "--port", str(up_port)])
        slow = start(["test-upstream", "--port", str(slow_port), "--delay-ms", "50"])
        up_url, slow_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{slow_port}"
        (work / "pools.toml").write_text(POOLS.format(upstream=up_url))
        env = {"AGW_DATABASE_URL": f"sqlite:///{work / 'bench.db'}", "AGW_POOLS_FILE": str(work / "pools.toml"),
               "AGW_LOG_LEVEL": "WARNING", "AGW_UPSTREAM_CLIENT": opts.client}
        if opts.redis:
            env["AGW_REDIS_URL"] = opts.redis
        processes = [upstream, slow]
        try:
            for url, process in ((up_url + "/v1/models", upstream), (slow_url + "/v1/models", slow)):
                wait_http(url, process)
            gateway, gateway_url = start_gateway(env, port=gw_port)
            processes.append(gateway)
            keys = provision_keys(gateway_url, env, 1000)
            (work / "keys.txt").write_text("\n".join(keys))
            (work / "direct.txt").write_text("\n".join(f"direct-{i}" for i in range(1000)))
            rows = []
            plan = [(False, 16, {1: 1500, 16: 6000, 64: 8000}), (True, 100, {1: 200, 16: 800, 64: 1600})]
            for stream, chunks, sizes in plan:
                if opts.only and stream != (opts.only == "stream"):
                    continue
                for concurrency, n in sizes.items():
                    n = max(50, int(n * scale))
                    direct = load(up_url + "/v1", work / "direct.txt", concurrency, n, stream, chunks)
                    cpu0 = cpu_seconds(gateway.pid)
                    via = load(gateway_url + "/v1", work / "keys.txt", concurrency, n, stream, chunks)
                    cpu = cpu_seconds(gateway.pid) - cpu0
                    rows.append((stream, chunks, concurrency, direct, via, cpu))
            held = None
            if not opts.only:
                # 1,000 streams held at once, against the slow upstream (100 chunks 50 ms apart, ~5 s each).
                (work / "pools.toml").write_text(POOLS.format(upstream=slow_url))
                gateway.terminate()
                gateway.wait(10)
                gateway, gateway_url = start_gateway(env, port=gw_port)
                processes.append(gateway)
                held = hold_streams(gateway_url, keys, gateway.pid)
        finally:
            stop(processes)
    print(report(rows, held))
    return 0


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def run_messages(opts: argparse.Namespace) -> list[tuple]:
    """Messages streams through both kinds of pool on one gateway, each after its direct baseline.

    The upstream runs with `--chunks 100`: it streams min(max_tokens, chunks) text deltas for
    /v1/messages but max_tokens chunks for /v1/chat/completions, so max_tokens 100 gives 100 content
    chunks on both paths (the load tool counts them)."""
    seconds = 1.5 if opts.quick else 5.0
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        work = Path(tmp)
        up_port, gw_port = free_port(), free_port()
        upstream = start(["test-upstream", "--port", str(up_port), "--chunks", str(MESSAGES_CHUNKS)])
        up_url = f"http://127.0.0.1:{up_port}"
        (work / "pools.toml").write_text(MESSAGES_POOLS.format(upstream=up_url))
        env = {"AGW_DATABASE_URL": opts.database or f"sqlite:///{work / 'bench.db'}",
               "AGW_POOLS_FILE": str(work / "pools.toml"), "AGW_LOG_LEVEL": "WARNING", "AGW_UPSTREAM_CLIENT": opts.client}
        if opts.redis:
            env["AGW_REDIS_URL"] = opts.redis
        processes = [upstream]
        try:
            wait_http(up_url + "/v1/models", upstream)
            gateway, gateway_url = start_gateway(env, port=gw_port)
            processes.append(gateway)
            (work / "translated.txt").write_text("\n".join(provision_keys(gateway_url, env, 64, pool="bench")))
            (work / "passthrough.txt").write_text("\n".join(provision_keys(gateway_url, env, 64, pool="claude")))
            (work / "direct.txt").write_text("\n".join(f"direct-{i}" for i in range(64)))
            rows = []
            # (mode, API of the direct baseline, the pool's keys): the client always speaks Messages.
            # Interleaved by concurrency, so both modes meet the gateway in the same state.
            for concurrency in (1, 16, 64):
                for mode, direct_api, keys in (("passthrough", "messages", "passthrough.txt"),
                                               ("translated", "chat", "translated.txt")):
                    warmup = max(50, 4 * concurrency)
                    direct = load(up_url + "/v1", work / "direct.txt", concurrency, 0, True, MESSAGES_CHUNKS,
                                  api=direct_api, seconds=seconds, warmup=warmup)
                    cpu0 = cpu_seconds(gateway.pid)
                    via = load(gateway_url + "/v1", work / keys, concurrency, 0, True, MESSAGES_CHUNKS,
                               api="messages", seconds=seconds, warmup=warmup)
                    cpu = cpu_seconds(gateway.pid) - cpu0
                    rows.append((mode, direct_api, concurrency, direct, via, cpu))
        finally:
            stop(processes)
    return rows


def granian_app() -> object:
    """The app as `agent-gateway serve` builds it, for granian's `--factory` (bench only)."""
    from agent_gateway.app import create_app
    from agent_gateway.cli import _tune_garbage_collector, configure_logging
    from agent_gateway.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, serving=True)
    app = create_app(settings)
    _tune_garbage_collector()
    return app


def start_server(server: str, env: dict[str, str], port: int) -> tuple[subprocess.Popen, str, list[int]]:
    """A gateway process under `server`; returns it, its URL and the pids whose CPU is counted.
    `NAME@DIR` runs the gateway's code from another checkout (DIR first on PYTHONPATH): the code
    before a change, measured in the same runs as the code after it. `uvicorn:N` is
    `serve --workers N` (PostgreSQL, Redis and a session secret needed): its CPU is the parent's
    plus every worker's."""
    server, _, checkout = server.partition("@")
    server, _, workers = server.partition(":")
    if workers:
        env = {**env, "AGW_WORKERS": workers, "AGW_SESSION_SECRET": "bench-secret-shared-by-the-workers"}
    cwd = None
    if checkout:
        # Run from the checkout too: `python -m` puts the working directory ahead of PYTHONPATH.
        cwd = Path(checkout).resolve()
        env = {**env, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
    if server == "uvicorn":
        process, url = start_gateway(env, port=port, cwd=cwd)
        return process, url, [process.pid, *children(process.pid)]
    if server != "granian":
        raise SystemExit(f"unknown server {server!r}")
    # `python -m granian`: granian installed in the venv, or anywhere on PYTHONPATH.
    process = subprocess.Popen(
        [PYTHON, "-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning",
         "--working-dir", str(ROOT / "bench"), "proxy_bench:granian_app"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", process)
    # granian serves from a worker process of its own: that is the one whose CPU counts.
    return process, url, children(process.pid) or [process.pid]


def children(pid: int) -> list[int]:
    return [int(child) for child in
            subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def run_throughput(opts: argparse.Namespace) -> list[tuple[int, str, dict, dict, float]]:
    """Non-streaming requests (16 tokens) at one concurrency, `--runs` times: each run is the
    direct baseline, then the same load through the gateway under each server in turn, so they
    share the machine's state. Returns (run, server, direct, via, gateway CPU seconds over the cell)."""
    servers = [name.strip() for name in opts.servers.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        work = Path(tmp)
        up_port = free_port()
        upstream = start(["test-upstream", "--port", str(up_port)])
        up_url = f"http://127.0.0.1:{up_port}"
        (work / "pools.toml").write_text(POOLS.format(upstream=up_url))
        env = {"AGW_DATABASE_URL": opts.database or f"sqlite:///{work / 'bench.db'}",
               "AGW_POOLS_FILE": str(work / "pools.toml"), "AGW_LOG_LEVEL": "WARNING", "AGW_UPSTREAM_CLIENT": opts.client}
        if opts.redis:
            env["AGW_REDIS_URL"] = opts.redis
        processes = [upstream]
        try:
            wait_http(up_url + "/v1/models", upstream)
            gateways = {}
            for server in servers:
                process, url, pids = start_server(server, env, free_port())
                processes.append(process)
                gateways[server] = (url, pids)
            first_url = gateways[servers[0]][0]
            (work / "keys.txt").write_text("\n".join(provision_keys(first_url, env, opts.concurrency)))
            (work / "direct.txt").write_text("\n".join(f"direct-{i}" for i in range(opts.concurrency)))
            warmup = max(200, 8 * opts.concurrency)
            for url, _ in gateways.values():  # first contact: keys into the cache, connections opened
                load(url + "/v1", work / "keys.txt", opts.concurrency, warmup, False, 16, warmup=0)
            rows = []
            for run in range(1, opts.runs + 1):
                direct = load(up_url + "/v1", work / "direct.txt", opts.concurrency, 0, False, 16,
                              seconds=opts.seconds, warmup=warmup)
                for server, (url, pids) in gateways.items():
                    cpu0 = sum(map(cpu_seconds, pids))
                    via = load(url + "/v1", work / "keys.txt", opts.concurrency, 0, False, 16,
                               seconds=opts.seconds, warmup=warmup)
                    rows.append((run, server, direct, via, sum(map(cpu_seconds, pids)) - cpu0))
        finally:
            stop(processes)
    return rows


def throughput_report(rows: list[tuple[int, str, dict, dict, float]], opts: argparse.Namespace) -> str:
    leases = "Redis" if opts.redis else "in-process"
    lines = [f"Non-streaming, concurrency {opts.concurrency}, {leases} leases, {opts.seconds:g} s per cell.", "",
             "| run | server | direct rps | gateway rps | direct p50 / p99 ms | gateway p50 / p99 ms | "
             "gateway CPU per request | errors |", "|---|---|---|---|---|---|---|---|"]
    per_request: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    for run, server, direct, via, cpu in rows:
        served = via["requests"] + via["warmup_requests"]
        per_request.setdefault(server, []).append(cpu / max(1, served) * 1e6)
        rps.setdefault(server, []).append(via["rps"])
        lines.append(f"| {run} | {server} | {direct['rps']:.0f} | {via['rps']:.0f} | "
                     f"{direct['p50_ms']:.2f} / {direct['p99_ms']:.2f} | {via['p50_ms']:.2f} / {via['p99_ms']:.2f} | "
                     f"{per_request[server][-1]:.0f} µs | {via['errors'] + direct['errors']} |")
    lines.append("")
    for server in per_request:
        cpu, served = per_request[server], rps[server]
        lines.append(f"{server}: gateway rps {min(served):.0f}–{max(served):.0f} (median {statistics.median(served):.0f}); "
                     f"CPU per request {min(cpu):.0f}–{max(cpu):.0f} µs (median {statistics.median(cpu):.0f} µs).")
    return "\n".join(lines)


def messages_report(rows: list[tuple]) -> str:
    lines = ["| mode | conc. | direct rps | gateway rps | direct p50 / p99 ms | gateway p50 / p99 ms | "
             "added p50 / p99 ms | max ms direct / gateway | gateway > 100 ms | gateway CPU per chunk | "
             "chunks / events per reply | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    per_chunk: dict[tuple[str, int], float] = {}
    totals: dict[str, list[float]] = {"passthrough": [0.0, 0], "translated": [0.0, 0]}
    for mode, direct_api, concurrency, direct, via, cpu in sorted(rows, key=lambda row: row[0]):
        served = via["requests"] + via["warmup_requests"]
        per_chunk[mode, concurrency] = cpu / max(1, served) / MESSAGES_CHUNKS
        totals[mode][0] += cpu
        totals[mode][1] += served * MESSAGES_CHUNKS
        counted = "/".join(str(x) for x in sorted(set(via["chunks_per_response"])))
        events = "/".join(str(x) for x in sorted(set(via["events_per_response"])))
        lines.append(
            f"| {mode} (direct: {'Messages' if direct_api == 'messages' else 'chat'}) | {concurrency} | {direct['rps']:.0f} | {via['rps']:.0f} | "
            f"{direct['p50_ms']:.2f} / {direct['p99_ms']:.2f} | {via['p50_ms']:.2f} / {via['p99_ms']:.2f} | "
            f"{via['p50_ms'] - direct['p50_ms']:.2f} / {via['p99_ms'] - direct['p99_ms']:.2f} | {tail(direct, via)} | "
            f"{per_chunk[mode, concurrency] * 1e6:.1f} µs | {counted} / {events} | "
            f"{via['errors'] + direct['errors']} |")
    lines.append("")
    ratios = []
    for concurrency in (1, 16, 64):
        if ("passthrough", concurrency) in per_chunk and ("translated", concurrency) in per_chunk:
            ratio = per_chunk["translated", concurrency] / per_chunk["passthrough", concurrency]
            ratios.append(f"{ratio:.2f}× at concurrency {concurrency}")
    overall = [cpu / max(1, chunks) for cpu, chunks in (totals["passthrough"], totals["translated"])]
    if overall[0]:
        ratios.append(f"{overall[1] / overall[0]:.2f}× over all three ({overall[0] * 1e6:.1f} → "
                      f"{overall[1] * 1e6:.1f} µs per chunk)")
    lines.append("Translated / passthrough gateway CPU per chunk (target ≤ 1.5×): " + ", ".join(ratios) + ".")
    return "\n".join(lines)


def tail(direct: dict, via: dict) -> str:
    """The slowest request direct and through the gateway, and the gateway's count over 100 ms."""
    return f"{direct['max_ms']:.1f} / {via['max_ms']:.1f} | {via['over_100ms']}"


def report(rows: list, held: dict | None) -> str:
    lines = ["| mode | conc. | direct rps | gateway rps | direct p50 / p99 ms | gateway p50 / p99 ms | "
             "added p50 / p99 ms | max ms direct / gateway | gateway > 100 ms | gateway CPU per request | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stream, chunks, concurrency, direct, via, cpu in rows:
        mode = f"stream {chunks} chunks" if stream else "non-stream"
        per_request = cpu / max(1, via["requests"] + min(via["requests"] // 4, 400))
        extra = f"{per_request * 1e6:.0f} µs"
        if stream:
            extra += f" ({per_request / chunks * 1e6:.1f} µs/chunk)"
        lines.append(
            f"| {mode} | {concurrency} | {direct['rps']:.0f} | {via['rps']:.0f} | "
            f"{direct['p50_ms']:.2f} / {direct['p99_ms']:.2f} | {via['p50_ms']:.2f} / {via['p99_ms']:.2f} | "
            f"{via['p50_ms'] - direct['p50_ms']:.2f} / {via['p99_ms'] - direct['p99_ms']:.2f} | {tail(direct, via)} | "
            f"{extra} | "
            f"{via['errors']} |")
    lines.append("")
    for stream, chunks, concurrency, direct, via, cpu in rows:
        if stream and concurrency == 64:
            lines.append(f"Stream at concurrency 64, gateway / direct requests per second: {via['rps'] / direct['rps']:.2f}.")
    if held is not None:
        lines.append(f"1,000 concurrent streams through one gateway process: {held['completed']}/{held['streams']} "
                     f"completed in {held['seconds']} s; gateway RSS {held['rss_before_mb']} MB idle, "
                     f"{held['rss_peak_mb']} MB peak.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
