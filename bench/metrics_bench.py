"""What /metrics bookkeeping costs a request, in one process and under `serve --workers N`.

    .venv/bin/python bench/metrics_bench.py

A proxied request counts itself once and moves the in-flight gauge up and down; under several
workers those values live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR),
so each update is also a write to a memory-mapped file. Each mode runs in a fresh interpreter
(the mode is chosen when prometheus_client is imported) and prints the time per request."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

RUN = """
import timeit
from prometheus_client import Counter, Gauge, Histogram
requests = Counter("bench_requests_total", "r", ["endpoint", "outcome"]).labels("chat", "ok")
in_flight = Gauge("bench_in_flight", "f", multiprocess_mode="livesum")
overhead = Histogram("bench_overhead_seconds", "o")
def one():
    in_flight.inc(); overhead.observe(0.0004); in_flight.dec(); requests.inc()
n = 200_000
print(f"{min(timeit.repeat(one, number=n, repeat=3)) / n * 1e6:.2f}")
"""


def main() -> None:
    rows = []
    for mode in ("one process", "several workers (multiprocess files)"):
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with tempfile.TemporaryDirectory() as directory:
            if mode.startswith("several"):
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            out = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, check=True)
        rows.append((mode, out.stdout.strip()))
    print("| metrics mode | µs per request (counter, gauge up and down, histogram) |")
    print("|---|---|")
    for mode, us in rows:
        print(f"| {mode} | {us} |")


if __name__ == "__main__":
    main()
