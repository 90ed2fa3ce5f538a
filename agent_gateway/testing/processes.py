"""Gateway processes for tests and benchmarks: a free loopback port, and `agent-gateway serve`
started as a child process and waited for until it answers /healthz."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx


# Under pytest-xdist each worker ("gw0", "gw1", ...) takes its ports from a block of its own, below
# Linux's ephemeral range (32768-60999), so a port one worker has chosen but not yet bound is never
# handed to another worker, nor to an outgoing connection. Elsewhere the kernel chooses.
_WORKER_PORTS_START, _WORKER_PORTS_BLOCK, _WORKER_BLOCKS = 20_000, 1_000, 12
_next_port: list[int] = []


def free_port() -> int:
    """A loopback port nothing listens on now (it is bound and released to check)."""
    block = _worker_block()
    if block is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    first = _WORKER_PORTS_START + block * _WORKER_PORTS_BLOCK
    if not _next_port:  # a random start, so a child process using the same block rarely meets us
        _next_port.append(random.randrange(_WORKER_PORTS_BLOCK))
    for _ in range(_WORKER_PORTS_BLOCK):
        port = first + _next_port[0] % _WORKER_PORTS_BLOCK
        _next_port[0] += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + _WORKER_PORTS_BLOCK - 1}")


def _worker_block() -> int | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit() and int(worker[2:]) < _WORKER_BLOCKS:
        return int(worker[2:])
    return None


def start_gateway(env: dict[str, str], *, port: int | None = None, log: Path | None = None,
                  timeout_s: float = 60.0, command: Sequence[str] = (sys.executable, "-m", "agent_gateway"),
                  base_env: Mapping[str, str] | None = None, cwd: Path | None = None,
                  ) -> tuple[subprocess.Popen, str]:
    """Start `<command> serve` (by default `python -m agent_gateway serve`) with `env` added to
    `base_env` (by default ours), in `cwd`; return it and its URL once /healthz answers. Its output
    goes to `log` (appended) or nowhere; a start that fails raises with the log's text. The bound is
    generous: a start is mostly imports (2 s of CPU), and under the parallel test run several
    gateways, anvil and Chromium share two cores."""
    port = port or free_port()
    output = log.open("a") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen([*command, "serve", "--port", str(port)], cwd=cwd,
                               env={**(os.environ if base_env is None else base_env), **env},
                               stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}: {_tail(log)}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)  # polling for the port to open, bounded by the deadline
    process.kill()
    raise RuntimeError(f"gateway did not start within {timeout_s:g} s: {_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
