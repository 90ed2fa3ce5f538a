"""The agent-gateway command as an operator runs it: a real process, settings from the environment."""

import os
import re
import subprocess
import sys

import pytest

COMMANDS = ["serve", "migrate", "accounts", "pools", "chain", "admin", "demo", "test-upstream"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent_gateway", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
        assert run(command, "--help").returncode == 0


def test_create_an_account_and_credit_it(database_url, tmp_path):
    env = {"AGW_DATABASE_URL": database_url}
    created = run("accounts", "create", "Acme Corp", env=env)
    assert created.returncode == 0, created.stderr
    account = re.search(r"account:\s+(acct_\w+)", created.stdout).group(1)
    assert re.search(r"management key:\s+mk_\w{43}\b", created.stdout)
    credited = run("accounts", "credit", account, "125.50", env=env)
    assert credited.returncode == 0, credited.stderr
    assert "balance 125.50 USDC" in credited.stdout
    again = run("accounts", "credit", account, "0.50", env=env)
    assert "balance 126.00 USDC" in again.stdout


@pytest.mark.parametrize("amount", ["-5", "abc", "1.0000001", "0"])
def test_bad_credit_amounts_are_refused(database_url, amount):
    env = {"AGW_DATABASE_URL": database_url}
    account = re.search(r"(acct_\w+)", run("accounts", "create", "A", env=env).stdout).group(1)
    result = run("accounts", "credit", account, amount, env=env)
    assert result.returncode == 2 and "AMOUNT" in result.stderr and "Traceback" not in result.stderr
    # None of the refused credits moved the balance.
    assert "balance 1.00 USDC" in run("accounts", "credit", account, "1", env=env).stdout


def test_crediting_an_unknown_account_fails_clearly(database_url):
    result = run("accounts", "credit", "acct_nope", "5", env={"AGW_DATABASE_URL": database_url})
    assert result.returncode == 1 and "No account 'acct_nope'" in result.stderr


def test_invalid_settings_name_the_variable():
    result = run("migrate", env={"AGW_PORT": "not-a-port"})
    assert result.returncode == 2 and "AGW_PORT" in result.stderr


def test_serve_off_loopback_without_a_public_url_refuses_to_start(tmp_path):
    # Bounded: a gateway that wrongly starts would otherwise serve until killed.
    result = subprocess.run(
        [sys.executable, "-m", "agent_gateway", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "AGW_PUBLIC_URL": "", "AGW_DATABASE_URL": f"sqlite:///{tmp_path}/gw.db"},
    )
    assert result.returncode == 2
    assert "AGW_PUBLIC_URL" in result.stderr and "0.0.0.0" in result.stderr and "Traceback" not in result.stderr


def test_one_shot_commands_print_their_result_and_no_log_lines(database_url, tmp_path):
    env = {"AGW_DATABASE_URL": database_url, "AGW_LOG_LEVEL": "INFO"}
    created = run("accounts", "create", "Quiet", env=env)  # migrates a fresh database first
    assert created.returncode == 0, created.stderr
    output = created.stdout + created.stderr
    assert "alembic" not in output and " INFO " not in output, output
    assert created.stdout.startswith("account:")
    migrated = run("migrate", env=env)
    assert migrated.returncode == 0 and migrated.stderr == "" and migrated.stdout == "database schema is up to date\n"
    # AGW_LOG_LEVEL=DEBUG still shows what alembic does.
    result = run("migrate", env={"AGW_DATABASE_URL": f"sqlite:///{tmp_path}/fresh.db", "AGW_LOG_LEVEL": "DEBUG"})
    assert result.returncode == 0, result.stderr
    assert "alembic.runtime.migration: Running upgrade" in result.stderr


@pytest.mark.parametrize("env,missing", [
    ({}, ["PostgreSQL", "AGW_REDIS_URL", "AGW_SESSION_SECRET"]),
    ({"AGW_REDIS_URL": "redis://127.0.0.1:6379/0", "AGW_SESSION_SECRET": "fixed"}, ["PostgreSQL"]),
    ({"AGW_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test", "AGW_SESSION_SECRET": "fixed"},
     ["AGW_REDIS_URL"]),
    ({"AGW_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/test", "AGW_REDIS_URL": "redis://127.0.0.1:6379/0"},
     ["AGW_SESSION_SECRET"]),
])
def test_several_workers_refuse_to_start_without_what_they_share(tmp_path, env, missing):
    """Checked before anything is bound, migrated or connected to (nothing listens on these URLs)."""
    base = {"AGW_DATABASE_URL": f"sqlite:///{tmp_path}/gw.db", "AGW_REDIS_URL": "", "AGW_SESSION_SECRET": ""}
    result = run("serve", "--workers", "2", "--port", "9", env={**base, **env})
    assert result.returncode == 2, result.stderr
    assert "--workers 2 needs" in result.stderr
    for name in missing:
        assert name in result.stderr
    for name in {"PostgreSQL", "AGW_REDIS_URL", "AGW_SESSION_SECRET"} - set(missing):
        assert name not in result.stderr
    # AGW_WORKERS says the same as --workers.
    assert run("serve", "--port", "9", env={**base, **env, "AGW_WORKERS": "2"}).returncode == 2


def test_workers_that_cannot_start_stop_serve_instead_of_restarting_forever(tmp_path):
    """The database named does not exist: each worker fails its start; the supervisor stops."""
    env = {"AGW_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/agw_no_such_database",
           "AGW_REDIS_URL": "redis://127.0.0.1:6379/0", "AGW_SESSION_SECRET": "fixed", "AGW_AUTO_MIGRATE": "false"}
    result = run("serve", "--workers", "2", "--port", "0", env=env)
    assert result.returncode == 1, result.stderr
    assert "could not start; stopping the others" in result.stderr
