"""`agent-gateway admin …` as an operator runs it: a real process calling a running gateway's admin
API over HTTP, the token and the actor from the environment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.live import LiveGateway, live_gateway

ADMIN_TOKEN = "adm-" + "c3" * 20


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_gateway", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.fixture
def gateway(tmp_path: Path, sqlite_url: str, upstream) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path, sqlite_url, upstream, admin_token=ADMIN_TOKEN) as live:
        yield live


@pytest.fixture
def env(gateway: LiveGateway) -> dict[str, str]:
    # AGW_DATABASE_URL points nowhere useful: the commands must go through the API, not the database.
    return {"AGW_ADMIN_URL": gateway.url, "AGW_ADMIN_TOKEN": ADMIN_TOKEN, "AGW_ADMIN_ACTOR": "ops-cli",
            "AGW_DATABASE_URL": "sqlite:////nonexistent/never.db", "AGW_POOLS_FILE": str(gateway.settings.pools_file)}


def test_the_admin_commands_drive_a_running_gateway(gateway, env):
    mk = gateway.new_account(credit_usdc=20)
    result = run("admin", "pools", env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^alpha\s+active\s+in flight 0\s+day 0/500 sold", result.stdout, re.M)
    result = run("admin", "pool-state", "alpha", "paused", "--reason", "upgrade", env=env)
    assert result.returncode == 0 and "pool alpha: paused" in result.stdout, result.stderr
    assert gateway.services.catalog.pools["alpha"].status == "paused"
    result = run("admin", "pool-state", "alpha", "closed", env=env)
    assert result.returncode == 1 and "cannot go to closed" in result.stderr and "409" in result.stderr
    run("admin", "--actor", "someone", "pool-state", "alpha", "active", env=env)
    accounts = json.loads(run("admin", "--json", "find", mk[:7], env=env).stdout)
    assert len(accounts) == 1
    account = accounts[0]["id"]
    result = run("admin", "credit", account, "5.00", "--reason", "goodwill", env=env)
    assert result.returncode == 0 and "balance 25.00 USDC" in result.stdout, result.stderr
    result = run("admin", "debit", account, "30", "--reason", "too much", env=env)
    assert result.returncode == 1 and "below zero" in result.stderr
    result = run("admin", "disable", account, "--reason", "abuse", env=env)
    assert result.returncode == 0 and f"account {account} disabled" in result.stdout
    assert "DISABLED" in run("admin", "account", account, env=env).stdout
    audit = json.loads(run("admin", "--json", "audit", "--actor-name", "ops-cli", env=env).stdout)
    assert [a["action"] for a in audit] == ["account.disable", "account.balance", "pool.state"]
    assert [a["actor"] for a in json.loads(run("admin", "--json", "audit", "--limit", "1",
                                               "--action", "pool.state", env=env).stdout)] == ["someone"]
    result = run("admin", "money", env=env)
    assert result.returncode == 0 and "payments by state" in result.stdout


def test_a_reload_through_the_cli_applies_or_says_why_not(gateway, env):
    pools = gateway.settings.pools_file
    pools.write_text(pools.read_text().replace('day = "10.00"', 'day = "12.00"'))
    result = run("admin", "reload", "--reason", "price change", env=env)
    assert result.returncode == 0 and "pools file applied" in result.stdout, result.stderr
    assert gateway.services.catalog.pools["alpha"].prices_atomic["day"] == 12_000_000
    pools.write_text(pools.read_text().replace("seats = 500", "seats = 0"))
    result = run("admin", "reload", env=env)
    assert result.returncode == 1 and "pools.alpha.seats" in result.stderr
    assert gateway.services.catalog.pools["alpha"].seats == 500


def test_changes_need_an_actor_and_every_command_needs_the_token(gateway, env):
    no_actor = {**env, "AGW_ADMIN_ACTOR": ""}
    result = run("admin", "reload", env=no_actor)
    assert result.returncode == 2 and "--actor" in result.stderr
    assert run("admin", "pools", env=no_actor).returncode == 0  # reading needs no name
    result = run("admin", "pools", env={**env, "AGW_ADMIN_TOKEN": ""})
    assert result.returncode == 2 and "AGW_ADMIN_TOKEN" in result.stderr
    result = run("admin", "pools", env={**env, "AGW_ADMIN_TOKEN": "w" * 40})
    assert result.returncode == 1 and "admin token is not valid" in result.stderr
    result = run("admin", "--url", "http://127.0.0.1:9", "pools", env=env)
    assert result.returncode == 1 and "cannot reach the gateway" in result.stderr
    assert "Traceback" not in result.stderr
