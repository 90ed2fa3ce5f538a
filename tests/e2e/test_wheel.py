"""The built wheel, installed outside the checkout: every operator command works from the package alone.

How the installed copy is made, and why:
- The wheel is built from a copy of the repository's files (no .venv, node_modules or .git) with
  `pip wheel --no-deps --no-build-isolation --no-index`: offline, with the setuptools that the test
  extra installs, and without leaving build/ or *.egg-info in the checkout (a stale build/lib would
  slip deleted modules into later wheels).
- The venv is made with `--system-site-packages` and the wheel installed into it with `--no-deps
  --no-index`, so nothing downloads. When the tests run in a venv (the project's .venv), a venv made
  from it gets the *base* interpreter's site-packages as its system ones, not the .venv's, so the
  dependencies would be missing. A .pth file in the new venv therefore names the test interpreter's
  site-packages: site.py appends a .pth's plain lines to sys.path but does not run the .pth files
  found in them, so the .venv's editable-install finder (which maps agent_gateway to the checkout)
  never loads, and the new venv's own site-packages, which hold the wheel, come first. The .pth is
  written after the install, so pip sees only the new venv.
- Every command runs from an empty temporary folder, with PYTHONPATH, every AGW_* variable and
  anvil removed from the environment; the first test proves `agent_gateway` is the wheel's copy.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent_gateway.testing.processes import free_port, start_gateway

ROOT = Path(__file__).resolve().parents[2]
NOT_BUILD_INPUTS = shutil.ignore_patterns(".git", ".venv", "node_modules", "test-artifacts", "build", "dist",
                                          "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", "*.db*", ".env")
# Public anvil test constants (agent_gateway.testing.devchain), never used where value is held.
RELAYER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
CUSTOM_POOLS = """
[blocks]
day = "00:00-24:00"

[pools.solo]
name = "Solo pool"
models = ["solo-1"]
upstreams = ["http://127.0.0.1:9/v1"]
seats = 2
prices = { day = "12.50" }
"""


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    workdir: Path  # an empty folder outside the checkout: every command runs here
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def command(self) -> Path:
        return self.venv / "bin" / "agent-gateway"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.command), *args], cwd=self.workdir, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def clean_env(venv: Path) -> dict[str, str]:
    """Ours, less PYTHONPATH, AGW_* and any PATH folder holding anvil, with the venv's bin/ first."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AGW_") and k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    folders = [d for d in env.get("PATH", os.defpath).split(os.pathsep) if d and not (Path(d) / "anvil").exists()]
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *folders])
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    source, dist, venv, workdir = base / "source", base / "dist", base / "venv", base / "work"
    shutil.copytree(ROOT, source, ignore=NOT_BUILD_INPUTS, symlinks=True)
    workdir.mkdir()
    env = clean_env(venv)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(dist), str(source)], env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("agent_gateway-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   env=env, check=True, timeout=120)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-index", str(wheel)], env=env, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    if sys.prefix != sys.base_prefix:  # see the module docstring
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        (purelib / "test-interpreter-site-packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return Installed(wheel, venv, workdir, env)


def test_the_installed_wheel_is_what_runs_and_holds_every_package_file(installed: Installed):
    where = subprocess.run([str(installed.python), "-c", "import agent_gateway; print(agent_gateway.__file__)"],
                           cwd=installed.workdir, env=installed.env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout
    package = ROOT / "agent_gateway"
    in_repo = {f"agent_gateway/{p.relative_to(package).as_posix()}" for p in package.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    in_wheel = set(zipfile.ZipFile(installed.wheel).namelist())
    assert in_repo - in_wheel == set()
    help_ = installed.run("--help")
    assert help_.returncode == 0 and all(c in help_.stdout for c in ("serve", "migrate", "accounts", "pools", "demo"))


def test_migrate_and_accounts_work_from_any_folder(installed: Installed):
    migrated = installed.run("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "database schema is up to date" in migrated.stdout
    assert (installed.workdir / "agent_gateway.db").is_file()  # the default: ./agent_gateway.db
    created = installed.run("accounts", "create", "Wheel Corp")
    assert created.returncode == 0, created.stderr
    account = re.search(r"account:\s+(acct_\w+)", created.stdout).group(1)
    assert re.search(r"management key:\s+mk_\w{43}\b", created.stdout)
    credited = installed.run("accounts", "credit", account, "42.50")
    assert credited.returncode == 0, credited.stderr
    assert f"account {account}: balance 42.50 USDC" in credited.stdout


def test_pools_check_reads_the_packaged_example_and_a_custom_file(installed: Installed):
    example = installed.run("pools", "check")
    assert example.returncode == 0, example.stderr
    assert example.stdout.startswith(str(installed.venv)) and "example_pools.toml: OK" in example.stdout
    assert "pool kimi26 (active)" in example.stdout and "pool core (active)" in example.stdout
    (installed.workdir / "solo.toml").write_text(CUSTOM_POOLS)
    custom = installed.run("pools", "check", "solo.toml")
    assert custom.returncode == 0, custom.stderr
    assert "solo.toml: OK" in custom.stdout and "pool solo (active): 2 seats/block; models solo-1; day 12.50" in custom.stdout


def test_serve_with_payments_configured_answers_health_pools_quotes_and_the_dashboard(installed: Installed, devchain):
    # Payments on through the anvil preset (its TestUSDC address is TOKEN): the start-up chain
    # checks read the dev chain, and the ABI loads from the wheel's package data.
    assert devchain.token == TOKEN
    chain = {"AGW_NETWORK": "anvil", "AGW_CHAIN_RPC_URL": devchain.rpc_url,
             "AGW_PAY_TO": PAY_TO, "AGW_RELAYER_KEY": RELAYER_KEY, "AGW_DATABASE_URL": "sqlite:///serve.db"}
    log = installed.workdir / "serve.log"
    process, url = start_gateway(chain, command=[str(installed.command)], base_env=installed.env,
                                 cwd=installed.workdir, log=log, timeout_s=60)
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            pools = http.get("/api/pools")
            assert pools.status_code == 200 and {p["slug"] for p in pools.json()["data"]} == {"kimi26", "core"}
            quote = http.post("/api/agent/subscribe-pool", json={"pool": "core", "blocks": ["europe"], "quantity": 1})
            assert quote.status_code == 402, quote.text
            assert "PAYMENT-REQUIRED" in quote.headers
            page = http.get("/dashboard/pools")
            assert page.status_code == 200 and "DeepSeek V4 Flash" in page.text
            assert http.get("/dashboard/static/dashboard.css").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text()


def test_the_test_upstream_runs_from_the_wheel(installed: Installed):
    port = free_port()
    process = subprocess.Popen([str(installed.command), "test-upstream", "--port", str(port)], cwd=installed.workdir,
                               env=installed.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"test-upstream exited with {process.returncode}"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "test-upstream did not answer within 60 s"
                time.sleep(0.05)  # polling for the port to open, bounded by the deadline
        assert models.status_code == 200 and models.json()["data"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_demo_without_anvil_says_so_in_one_line(installed: Installed):
    assert shutil.which("anvil", path=installed.env["PATH"]) is None
    demo = installed.run("demo")
    assert demo.returncode == 1
    assert demo.stdout == ""  # nothing started
    message = demo.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, demo.stderr
    assert message.startswith("agent-gateway: the demo cannot run: anvil") and "npm" in message
