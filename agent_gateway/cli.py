"""The `agent-gateway` command: serve, migrate, accounts, pools, chain, admin, demo, test-upstream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from agent_gateway.admin_client import add_admin_commands
from agent_gateway.catalog.pools import CatalogError, load_catalog
from agent_gateway.errors import GatewayError
from agent_gateway.settings import Settings

if TYPE_CHECKING:  # imported lazily below, so `--help` stays fast
    from agent_gateway.clock import Clock
    from agent_gateway.db.engine import Database

EPILOG = """\
Settings come from AGW_* environment variables and a .env file (see .env.example).
With none set, the gateway uses a SQLite file ./agent_gateway.db and the example pools.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-gateway",
        description="Sell seats on LLM inference pools; proxy each key with one request in flight.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the gateway HTTP server (migrates the database first)")
    serve.add_argument("--host", help="interface to bind (default AGW_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default AGW_PORT, 8080)")
    serve.add_argument(
        "--workers", type=int, metavar="N",
        help="worker processes sharing the port (default AGW_WORKERS, 1); N > 1 needs PostgreSQL "
             "(AGW_DATABASE_URL), AGW_REDIS_URL and a fixed AGW_SESSION_SECRET, and refuses to start without them")
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date and exit")
    migrate.set_defaults(run=_migrate)

    accounts = commands.add_parser("accounts", help="create accounts and credit their prepaid USDC")
    account_commands = accounts.add_subparsers(dest="accounts_command", metavar="ACTION", required=True)
    create = account_commands.add_parser(
        "create", help="create an account; prints its id and its first mk_ key (shown once)"
    )
    create.add_argument("name", help="a display name for the account")
    create.set_defaults(run=_accounts_create)
    credit = account_commands.add_parser("credit", help="add prepaid USDC to an account's balance")
    credit.add_argument("account", help="the account id (acct_…)")
    credit.add_argument("amount", help='USDC as a decimal string, e.g. "100.00"')
    credit.set_defaults(run=_accounts_credit)

    pools = commands.add_parser("pools", help="inspect the pools file")
    pool_commands = pools.add_subparsers(dest="pools_command", metavar="ACTION", required=True)
    check = pool_commands.add_parser("check", help="load and validate a pools file, print a summary")
    check.add_argument("file", nargs="?", help="the pools file (default AGW_POOLS_FILE or the example)")
    check.set_defaults(run=_pools_check)

    chain = commands.add_parser("chain", help="check the x402 chain settings against the chain")
    chain_commands = chain.add_subparsers(dest="chain_command", metavar="ACTION", required=True)
    chain_check = chain_commands.add_parser(
        "check", help="run serve's start-up chain checks (chain id, token domain and decimals, payTo, "
                      "relayer gas, the refund wallet's USDC and gas); one line each, exit 1 on a FAIL")
    chain_check.set_defaults(run=_chain_check)
    add_admin_commands(commands)

    demo = commands.add_parser(
        "demo", help="run the end-to-end demo on embedded defaults (own servers, temporary database)"
    )
    demo.set_defaults(run=_demo)

    upstream = commands.add_parser(
        "test-upstream", help="run the OpenAI-compatible test upstream (deterministic tokens)"
    )
    upstream.add_argument("--host", default="127.0.0.1")
    upstream.add_argument("--port", type=int, default=9000)
    upstream.add_argument("--delay-ms", type=float, default=0.0, help="delay between stream chunks")
    upstream.add_argument("--chunks", type=int, default=16, help="tokens per completion by default")
    upstream.set_defaults(run=_test_upstream)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"agent-gateway: invalid settings: {_settings_problems(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, serving=args.command in SERVING_COMMANDS)
    run: Callable[[argparse.Namespace, Settings], int] = args.run
    try:
        return run(args, settings)
    except CatalogError as exc:
        print(f"agent-gateway: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"agent-gateway: {exc.message}", file=sys.stderr)
        return 1


# Commands that keep running and log what they do; the others print their result and exit.
SERVING_COMMANDS = {"serve", "test-upstream"}


def configure_logging(level: str, *, serving: bool) -> None:
    """A one-shot command's output is its result: its log lines (alembic's "Running upgrade …",
    a service's "account created …") show only at AGW_LOG_LEVEL=DEBUG; warnings always show.
    alembic's own chatter is kept at WARNING under `serve` too, unless DEBUG."""
    numeric = logging.getLevelName(level.upper())
    debug = numeric == logging.DEBUG
    if not serving and not debug:
        numeric = max(numeric, logging.WARNING)
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.DEBUG if debug else logging.WARNING)


def _settings_problems(exc: ValidationError) -> str:
    return "; ".join(
        f"AGW_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" if err["loc"]
        else err["msg"].removeprefix("Value error, ")
        for err in exc.errors()
    )


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    workers = settings.workers if args.workers is None else args.workers
    if workers > 1:
        with _shared_metrics_directory():
            return _serve_now(args, settings, workers)
    return _serve_now(args, settings, workers)


@contextmanager
def _shared_metrics_directory() -> Iterator[None]:
    """Several workers add up their metrics through files in one directory (prometheus_client's
    multiprocess mode), named by PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported. An
    operator's own directory is used as it is; ours is made empty here and removed at the end."""
    if "prometheus_client" in sys.modules:  # imported already: the values are per process
        logging.getLogger(__name__).warning("metrics stay per worker: prometheus_client was imported first")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    directory = tempfile.mkdtemp(prefix="agent-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _serve_now(args: argparse.Namespace, settings: Settings, workers: int) -> int:
    from agent_gateway import server
    from agent_gateway.app import create_app

    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    try:
        if workers < 1:
            raise server.ServeSettingsError(f"--workers must be 1 or more, not {workers}")
        server.check_serving_settings(settings)
        server.check_worker_settings(settings, workers)
    except server.ServeSettingsError as exc:
        print(f"agent-gateway: invalid settings: {exc}", file=sys.stderr)
        return 2
    if workers > 1:
        load_catalog(settings.pools_file)  # a bad pools file is refused here, not by every worker
        if settings.auto_migrate:
            from agent_gateway.db.migrate import upgrade_database

            upgrade_database(settings.database_url)  # once, before the workers start
            settings.auto_migrate = False
        _tune_garbage_collector()  # before the fork: the frozen start-up objects stay shared
        return server.serve_workers(lambda: create_app(settings), settings, workers)
    app = create_app(settings)
    _tune_garbage_collector()
    server.serve(app, settings)
    return 0


def _tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the request path.

    Start-up leaves ~160,000 long-lived objects (SQLAlchemy, pydantic, Starlette, our modules);
    each full collection walked them all and stalled every request in flight for tens of
    milliseconds. Freezing them and collecting the young generation less often cut the proxy's
    p99 at 64 connections from ~110 ms to ~30 ms and its CPU per request by a quarter
    (docs/performance.md)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1_000)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from agent_gateway.db.migrate import upgrade_database

    upgrade_database(settings.database_url)
    print("database schema is up to date")
    return 0


def _accounts_create(args: argparse.Namespace, settings: Settings) -> int:
    from agent_gateway.accounts.service import create_account

    async def run() -> None:
        db = await _ready_database(settings)
        try:
            account, token = await create_account(db, _clock(), args.name)
        finally:
            await db.dispose()
        print(f"account:        {account.id}")
        print(f"management key: {token.plaintext}")
        print("Store the management key now: it is shown only this once.")

    asyncio.run(run())
    return 0


def _accounts_credit(args: argparse.Namespace, settings: Settings) -> int:
    from agent_gateway.accounts.service import credit_account
    from agent_gateway.money import format_usdc, parse_usdc

    try:
        amount = parse_usdc(args.amount)
    except ValueError as exc:
        print(f"agent-gateway: AMOUNT {exc}", file=sys.stderr)
        return 2
    if amount == 0:
        print("agent-gateway: AMOUNT must be above zero", file=sys.stderr)
        return 2

    async def run() -> None:
        db = await _ready_database(settings)
        try:
            balance = await credit_account(db, _clock(), args.account, amount, note="credited by CLI")
        finally:
            await db.dispose()
        print(f"account {args.account}: balance {format_usdc(balance)} USDC")

    asyncio.run(run())
    return 0


def _pools_check(args: argparse.Namespace, settings: Settings) -> int:
    from agent_gateway.money import format_usdc

    path = Path(args.file) if args.file else settings.pools_file
    catalog = load_catalog(path)
    print(f"{path}: OK")
    print("blocks: " + ", ".join(f"{b.name} {b.label}" for b in catalog.blocks.values()))
    for pool in catalog.pools.values():
        prices = ", ".join(f"{b} {format_usdc(p)}" for b, p in pool.prices_atomic.items())
        print(f"pool {pool.slug} ({pool.status}): {pool.seats} seats/block; models {', '.join(pool.models)}; {prices} USDC/30d")
    return 0


def _chain_check(args: argparse.Namespace, settings: Settings) -> int:
    from urllib.parse import urlsplit

    from agent_gateway.lifespan import chain_adapter_for, facilitator_for, refund_wallet_for
    from agent_gateway.networks import chain_defaults
    from agent_gateway.payments.checks import CheckStatus, run_chain_checks

    chain, adapter = settings.chain, chain_adapter_for(settings)
    if chain is None or adapter is None:
        print("agent-gateway: payments are off: set AGW_NETWORK or AGW_CHAIN_ID, and AGW_CHAIN_RPC_URL, "
              "AGW_PAY_TO, and AGW_RELAYER_KEY or AGW_FACILITATOR_URL (see .env.example)", file=sys.stderr)
        return 2
    rpc = urlsplit(chain.rpc_url)  # scheme and host only: hosted RPC URLs carry an API key
    confirmations = settings.confirmations or chain_defaults(chain.chain_id).confirmations
    print(f"chain {chain.network} ({settings.network or 'no preset'}), token {chain.usdc_address}, "
          f"RPC {rpc.scheme}://{rpc.hostname}{f':{rpc.port}' if rpc.port else ''}, confirmations {confirmations}")
    for line in settings.preset_overrides:
        print(f"note  {line}")

    async def run() -> int:
        facilitator = facilitator_for(settings)
        refund_wallet = refund_wallet_for(settings)
        try:
            report = await run_chain_checks(chain, adapter, own_settlement=facilitator is None,
                                            warn_settlements=settings.relayer_warn_settlements,
                                            facilitator=facilitator, refund_wallet=refund_wallet)
        finally:
            await adapter.close()
            if refund_wallet is not None:
                await refund_wallet.close()
            if facilitator is not None:
                await facilitator.close()
        for check in report.checks:
            print(check.line())
        warnings = sum(check.status is CheckStatus.WARN for check in report.checks)
        if report.failed:
            print(f"chain check FAILED: {len(report.failed)} of {len(report.checks)} checks; serve would refuse to start")
            return 1
        print(f"chain check passed ({len(report.checks)} checks, {warnings} warnings)")
        return 0

    return asyncio.run(run())


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from agent_gateway.demo import DemoUnavailable, run_demo

    try:
        return run_demo()
    except DemoUnavailable as exc:
        print(f"agent-gateway: {exc}", file=sys.stderr)
        return 1


def _test_upstream(args: argparse.Namespace, settings: Settings) -> int:
    from agent_gateway.testing.upstream import UpstreamSettings, run_test_upstream

    run_test_upstream(
        args.host, args.port, UpstreamSettings(delay_s=args.delay_ms / 1000.0, chunks=args.chunks)
    )
    return 0


async def _ready_database(settings: Settings) -> Database:
    from agent_gateway.db.engine import Database  # noqa: F811
    from agent_gateway.db.migrate import upgrade_database

    if settings.auto_migrate:
        upgrade_database(settings.database_url)
    return Database(settings.database_url)


def _clock() -> Clock:
    from agent_gateway.clock import Clock  # noqa: F811

    return Clock()
