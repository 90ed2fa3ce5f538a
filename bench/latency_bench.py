"""Tail latency from a cold start, and open-loop latency: direct vs one gateway process, same run.

    .venv/bin/python bench/latency_bench.py [--runs 3] [--seconds 10] [--rate 2000] [--quick]
        [--database URL] [--redis URL]

Starts the test upstream, provisions 64 keys through a gateway (SQLite unless --database), stops
it, then `--runs` times: starts a fresh gateway process on that database (cold key cache, no
pooled connections) and, with no warm-up, runs `bench/load.py` closed-loop at concurrency 64, 16
and 1, non-streaming (16 tokens) then streaming (100 chunks), then open-loop at `--rate` requests
per second over the 64 keys (non-streaming, 1 s unmeasured lead-in). Every cell runs the direct
baseline (the same load against the upstream) right before the gateway. The first gateway cell of
every run is the first traffic that process sees. Prints a Markdown report: per cell and run the
max latency and the requests over 100 ms, and the spread of p50/p99/max over the runs."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_bench import PYTHON, POOLS, ROOT, provision_keys, start, stop, wait_http  # noqa: E402

from agent_gateway.testing.processes import free_port, start_gateway  # noqa: E402

KEYS = 64
CLOSED = [(False, 16, 64), (False, 16, 16), (False, 16, 1), (True, 100, 64), (True, 100, 16), (True, 100, 1)]


def load(base_url: str, keys_file: Path, args: list[str]) -> dict:
    command = [PYTHON, str(ROOT / "bench" / "load.py"), "--base-url", base_url, "--keys", str(keys_file), *args]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def closed(stream: bool, chunks: int, concurrency: int, seconds: float) -> list[str]:
    args = ["--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", "0", "--chunks", str(chunks)]
    return args + (["--stream"] if stream else [])


def opened(rate: float, seconds: float) -> list[str]:
    return ["--rate", str(rate), "--seconds", str(seconds), "--keys-used", str(KEYS), "--warmup-seconds", "1"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of every cell")
    parser.add_argument("--rate", type=float, default=2000.0, help="open loop: requests per second offered")
    parser.add_argument("--quick", action="store_true", help="2 s cells, one run")
    parser.add_argument("--database", help="AGW_DATABASE_URL (default: a fresh SQLite file)")
    parser.add_argument("--redis", metavar="URL", help="keep leases in this Redis (AGW_REDIS_URL)")
    parser.add_argument("--only", choices=["closed", "non-stream", "open"],
                        help="run only the closed-loop cells, only the closed-loop non-streaming ones, or only open loop")
    opts = parser.parse_args()
    if opts.quick:
        opts.seconds, opts.runs = 2.0, 1
    runs: list[list[tuple[str, dict, dict]]] = []
    with tempfile.TemporaryDirectory(prefix="agw-bench-") as tmp:
        work = Path(tmp)
        up_port, gw_port = free_port(), free_port()
        upstream = start(["test-upstream", "--port", str(up_port)])
        up_url = f"http://127.0.0.1:{up_port}"
        (work / "pools.toml").write_text(POOLS.format(upstream=up_url))
        env = {"AGW_DATABASE_URL": opts.database or f"sqlite:///{work / 'bench.db'}",
               "AGW_POOLS_FILE": str(work / "pools.toml"), "AGW_LOG_LEVEL": "WARNING"}
        if opts.redis:
            env["AGW_REDIS_URL"] = opts.redis
        processes = [upstream]
        try:
            wait_http(up_url + "/v1/models", upstream)
            gateway, gateway_url = start_gateway(env, port=gw_port)
            processes.append(gateway)
            (work / "keys.txt").write_text("\n".join(provision_keys(gateway_url, env, KEYS)))
            (work / "direct.txt").write_text("\n".join(f"direct-{i}" for i in range(KEYS)))
            stop([gateway])
            for _ in range(opts.runs):
                gateway, gateway_url = start_gateway(env, port=gw_port)
                processes.append(gateway)
                cells: list[tuple[str, dict, dict]] = []
                plan: list[tuple[str, list[str]]] = []
                if opts.only != "open":
                    plan += [(f"{'stream 100 chunks' if stream else 'non-stream'} | c={concurrency}",
                              closed(stream, chunks, concurrency, opts.seconds))
                             for stream, chunks, concurrency in CLOSED if not (stream and opts.only == "non-stream")]
                if opts.only is None or opts.only == "open":
                    plan.append((f"open loop, non-stream | {opts.rate:g} req/s", opened(opts.rate, opts.seconds)))
                for name, args in plan:
                    direct = load(up_url + "/v1", work / "direct.txt", args)
                    via = load(gateway_url + "/v1", work / "keys.txt", args)
                    cells.append((name, direct, via))
                    print(name, json.dumps({"direct": direct, "gateway": via}), file=sys.stderr, flush=True)
                stop([gateway])
                processes.remove(gateway)
                runs.append(cells)
        finally:
            stop(processes)
    print(report(runs, opts))
    return 0


def report(runs: list[list[tuple[str, dict, dict]]], opts: argparse.Namespace) -> str:
    lines = [f"Machine: {platform.machine()}, {_cpu()}, Linux {platform.release()}, "
             f"CPython {platform.python_version()}; {len(runs)} run(s), {opts.seconds:g} s per cell, "
             f"each run on a freshly started gateway.", "",
             "| mode | load | run | direct rps | gateway rps | direct p50 / p99 / max ms | gateway p50 / p99 / max ms | "
             "added p50 / p99 / max ms | gateway > 100 ms | late (no free key) direct / gateway | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for number, cells in enumerate(runs, 1):
        for name, direct, via in cells:
            late = (f"{direct.get('late_no_free_key', '–')} / {via.get('late_no_free_key', '–')}"
                    if "late_no_free_key" in via else "–")
            lines.append(
                f"| {name} | {number} | {direct['rps']:.0f} | {via['rps']:.0f} | {_triple(direct)} | {_triple(via)} | "
                f"{_added(direct, via)} | {via['over_100ms']} | {late} | {direct['errors'] + via['errors']} |")
    lines += ["", "Spread over the runs (min – max):", "",
              "| mode | load | added p50 ms | added p99 ms | gateway max ms | gateway > 100 ms |",
              "|---|---|---|---|---|---|"]
    for index, (name, _, _) in enumerate(runs[0] if runs else []):
        cells = [cells[index] for cells in runs]
        p50 = [via["p50_ms"] - direct["p50_ms"] for _, direct, via in cells]
        p99 = [via["p99_ms"] - direct["p99_ms"] for _, direct, via in cells]
        top = [via["max_ms"] or 0.0 for _, _, via in cells]
        over = [via["over_100ms"] for _, _, via in cells]
        lines.append(f"| {name} | {min(p50):.2f} – {max(p50):.2f} | {min(p99):.2f} – {max(p99):.2f} | "
                     f"{min(top):.1f} – {max(top):.1f} | {min(over)} – {max(over)} |")
    return "\n".join(lines)


def _triple(result: dict) -> str:
    return f"{result['p50_ms']:.2f} / {result['p99_ms']:.2f} / {result['max_ms'] or 0:.1f}"


def _added(direct: dict, via: dict) -> str:
    return (f"{via['p50_ms'] - direct['p50_ms']:.2f} / {via['p99_ms'] - direct['p99_ms']:.2f} / "
            f"{(via['max_ms'] or 0) - (direct['max_ms'] or 0):.1f}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{sum(1 for x in Path('/proc/cpuinfo').read_text().splitlines() if x.startswith('processor'))}" \
                   f" × {line.split(':', 1)[1].strip()}"
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
