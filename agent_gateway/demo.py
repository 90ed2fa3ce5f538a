"""`agent-gateway demo`: the whole story on embedded defaults, against real servers on loopback."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from agent_gateway.app import create_app
from agent_gateway.catalog.pools import load_catalog
from agent_gateway.clock import Clock
from agent_gateway.settings import EXAMPLE_POOLS_FILE, Settings
from agent_gateway.testing.server import ServerThread
from agent_gateway.testing.upstream import UpstreamSettings, create_upstream_app

DEMO_POOL = "kimi26"


def say(step: str, detail: str = "") -> None:
    print(f"\n== {step}")
    if detail:
        print(detail)


@contextmanager
def demo_stack(workdir: Path) -> Iterator[tuple[str, Settings]]:
    """Test upstream + gateway on free loopback ports, with a fresh SQLite file in `workdir`."""
    with ExitStack() as stack:
        upstream = stack.enter_context(
            ServerThread(create_upstream_app(UpstreamSettings(delay_s=0.02, chunks=12)))
        )
        pools_file = workdir / "pools.toml"
        pools_file.write_text(
            EXAMPLE_POOLS_FILE.read_text().replace("http://127.0.0.1:9000/v1", f"{upstream.url}/v1")
        )
        settings = Settings(
            _env_file=None,
            database_url=f"sqlite:///{workdir / 'demo.db'}",
            pools_file=pools_file,
            job_interval_s=5,
        )
        gateway = stack.enter_context(ServerThread(create_app(settings)))
        yield gateway.url, settings


def run_demo() -> int:
    import logging

    # The demo narrates; keep the servers' own INFO lines out of its way.
    for noisy in ("httpx", "httpx2", "uvicorn.error", "agent_gateway", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="agw-demo-") as tmp, demo_stack(Path(tmp)) as (url, settings):
        say("Gateway up", f"gateway {url}, database {settings.database_url}")
        http = httpx.Client(base_url=url, timeout=30)
        pools = http.get("/api/pools").json()["data"]
        lines = [
            f"  {p['slug']:8} {p['name']:40} "
            + "  ".join(f"{b['block']} {b['pricePerMonth']} ({b['availableSeats']} left)" for b in p["blocks"])
            for p in pools
        ]
        say("Catalog: GET /api/pools", "\n".join(lines))

        account_id, mk = asyncio.run(_new_account(settings))
        say("Operator: agent-gateway accounts create + credit 200.00", f"  account {account_id}\n  management key {mk[:7]}…")
        auth = {"Authorization": f"Bearer {mk}"}

        catalog = load_catalog(settings.pools_file)
        now = Clock().now()
        current = next(b.name for b in catalog.blocks.values() if b.contains(now))
        response = http.post(
            f"/api/pools/{DEMO_POOL}/subscribe",
            json={"blocks": [current], "quantity": 1, "billingCycle": "month"},
            headers=auth,
        )
        response.raise_for_status()
        sub = response.json()["data"]["subscriptions"][0]
        say(
            f"Customer: POST /api/pools/{DEMO_POOL}/subscribe (block {current}, the one open now)",
            f"  subscription {sub['id']} {sub['status']} until {sub['currentPeriodEnd']}, paid {sub['price']} USDC",
        )

        response = http.post("/api/keys/subscription", json={"name": "demo", "subscriptionId": sub["id"]}, headers=auth)
        response.raise_for_status()
        key = response.json()["data"]
        say("Customer: POST /api/keys/subscription", f"  API key {key['apiKey'][:7]}… (shown once), listed as {key['key']}")

        run_inference(url, key["apiKey"])

        usage = _wait_for_usage(http, auth)
        say("Usage: GET /api/usage", "\n".join(f"  {window:>3}: {json.dumps(totals)}" for window, totals in usage.items()))
        print("\nDemo finished.")
    return 0


def run_inference(url: str, api_key: str) -> None:
    """Stream a chat completion with the openai SDK; a second call meanwhile is refused with 429."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    model = client.models.list().data[0].id
    say(f"Agent: openai SDK, streaming chat completion on {model!r}")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello to the demo."}], stream=True
    )
    pieces = []
    second = None
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
                if second is None:
                    # One request in flight per key: a second call while this stream runs is refused.
                    try:
                        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "me too"}])
                        second = "admitted (unexpected)"
                    except openai.RateLimitError as exc:
                        second = f"HTTP {exc.status_code}: {exc.body['message'] if isinstance(exc.body, dict) else exc}"
    print()
    say("Agent: a second call while the stream ran", f"  {second}")
    client.close()


def _wait_for_usage(http: httpx.Client, auth: dict[str, str]) -> dict:
    """Usage is written in batches off the request path; wait (bounded) until the call shows up."""
    import time

    deadline = time.monotonic() + 10
    while True:
        usage = http.get("/api/usage", headers=auth).json()["data"][0]["usage"]
        if usage["1h"]["requests"] or time.monotonic() > deadline:
            return usage
        time.sleep(0.1)


async def _new_account(settings: Settings) -> tuple[str, str]:
    from agent_gateway.accounts.service import create_account, credit_account
    from agent_gateway.db.engine import Database

    db = Database(settings.database_url)
    try:
        account, token = await create_account(db, Clock(), "Demo customer")
        await credit_account(db, Clock(), account.id, 200_000_000, note="demo credit")
    finally:
        await db.dispose()
    return account.id, token.plaintext
