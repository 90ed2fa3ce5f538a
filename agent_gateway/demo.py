"""`agent-gateway demo`: the whole story on embedded defaults, against real servers on loopback.

A local anvil chain with an EIP-3009 test USDC, the test upstream and a gateway come up; an agent
wallet buys a seat with the official x402 client; its key streams a chat completion with the
official openai SDK while a second call is refused with 429; the usage is printed, then what to try
next. From a terminal the servers stay up until Enter is pressed, so the printed keys can be tried."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from agent_gateway.app import create_app
from agent_gateway.catalog.pools import load_catalog
from agent_gateway.clock import Clock
from agent_gateway.money import format_usdc
from agent_gateway.testing.devchain import AnvilNotFoundError, DevChain, find_anvil, start_devchain
from agent_gateway.settings import EXAMPLE_POOLS_FILE, Settings
from agent_gateway.testing.processes import free_port
from agent_gateway.testing.server import ServerThread
from agent_gateway.testing.upstream import UpstreamSettings, create_upstream_app

DEMO_POOL = "kimi26"
# The demo's clients: the `demo` extra, not the gateway's own dependencies.
DEMO_PACKAGES = ("openai", "x402")


class DemoUnavailable(RuntimeError):
    """Something the demo needs beyond the gateway itself is missing: anvil, or the demo extra."""


def check_demo_prerequisites() -> None:
    """Name everything missing in one line, before any server starts."""
    problems = []
    try:
        find_anvil()
    except AnvilNotFoundError as exc:
        problems.append(str(exc))
    missing = [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        problems.append(f"the Python packages {', '.join(missing)} are missing: pip install 'agent-gateway[demo]'")
    if problems:
        raise DemoUnavailable("the demo cannot run: " + "; ".join(problems))


def say(step: str, detail: str = "") -> None:
    print(f"\n== {step}")
    if detail:
        print(detail)


@contextmanager
def demo_stack(workdir: Path) -> Iterator[tuple[str, Settings, DevChain]]:
    """anvil + test USDC, the test upstream and a gateway on free loopback ports, a fresh SQLite file."""
    with ExitStack() as stack:
        chain = stack.enter_context(start_devchain(agents=1))
        upstream = stack.enter_context(ServerThread(create_upstream_app(UpstreamSettings(delay_s=0.02, chunks=12))))
        pools_file = workdir / "pools.toml"
        pools_file.write_text(EXAMPLE_POOLS_FILE.read_text().replace("http://127.0.0.1:9000/v1", f"{upstream.url}/v1"))
        port = free_port()  # chosen first: the sign-in message names the gateway's public URL
        settings = Settings(
            _env_file=None, database_url=f"sqlite:///{workdir / 'demo.db'}", pools_file=pools_file,
            public_url=f"http://127.0.0.1:{port}",
            job_interval_s=5, chain_rpc_url=chain.rpc_url, chain_id=chain.chain_id, usdc_address=chain.token,
            usdc_name=chain.token_name, usdc_version=chain.token_version, pay_to=chain.pay_to,
            relayer_key=chain.relayer_key, confirmations=1,
        )
        gateway = stack.enter_context(ServerThread(create_app(settings), port=port))
        yield gateway.url, settings, chain


def run_demo() -> int:
    check_demo_prerequisites()
    # The demo narrates; keep the servers' own INFO lines out of its way.
    for noisy in ("httpx", "httpx2", "uvicorn.error", "agent_gateway", "alembic", "x402", "web3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="agw-demo-") as tmp, demo_stack(Path(tmp)) as (url, settings, chain):
        say("Up: anvil chain, test USDC, test upstream, gateway",
            f"  chain {chain.network} at {chain.rpc_url}, USDC {chain.token}\n  gateway {url}")
        http = httpx.Client(base_url=url, timeout=60)
        pools = http.get("/api/pools").json()["data"]
        say("Catalog: GET /api/pools", "\n".join(
            f"  {p['slug']:8} {p['name']:36} "
            + "  ".join(f"{b['block']} {b['pricePerMonth']} ({b['availableSeats']} left)" for b in p["blocks"])
            for p in pools))

        catalog = load_catalog(settings.pools_file)
        now = Clock().now()
        block = next(b.name for b in catalog.blocks.values() if b.contains(now))
        order = {"pool": DEMO_POOL, "blocks": [block], "quantity": 1, "name": "demo-agent"}
        challenge = http.post("/api/agent/subscribe-pool", json=order)
        accept = json.loads(base64.b64decode(challenge.headers["PAYMENT-REQUIRED"]))["accepts"][0]
        say(f"Agent: POST /api/agent/subscribe-pool (pool {DEMO_POOL}, block {block}, the one open now)",
            f"  HTTP {challenge.status_code}: pay {format_usdc(int(accept['amount']))} USDC "
            f"({accept['scheme']}, {accept['network']}) to {accept['payTo']}")

        agent_key = chain.agent_keys[0]
        balance_before = _usdc(chain, chain.agent_addresses[0])
        started = time.perf_counter()
        response = asyncio.run(_buy_with_x402(url, chain, agent_key, order))
        elapsed = (time.perf_counter() - started) * 1000
        bought = response.json()["data"]
        receipt = json.loads(base64.b64decode(response.headers["PAYMENT-RESPONSE"]))
        say("Agent: the official x402 client signs a USDC authorization and retries",
            f"  HTTP {response.status_code} in {elapsed:.0f} ms; settled on-chain in {receipt['transaction']}\n"
            f"  wallet {chain.agent_addresses[0]}: {format_usdc(balance_before)} -> "
            f"{format_usdc(_usdc(chain, chain.agent_addresses[0]))} USDC\n"
            f"  subscription {bought['subscriptions'][0]['id']} active until "
            f"{bought['subscriptions'][0]['currentPeriodEnd']}\n"
            f"  API key {bought['subscriptions'][0]['apiKey'][:7]}… and management key "
            f"{bought['managementKey'][:7]}… (shown once)")

        run_inference(url, bought["subscriptions"][0]["apiKey"])

        management_key = sign_in_with_wallet(http, agent_key, chain.agent_addresses[0])
        auth = {"Authorization": f"Bearer {management_key}"}
        usage = _wait_for_usage(http, auth)
        say("Usage: GET /api/usage", "\n".join(f"  {window:>3}: {json.dumps(totals)}" for window, totals in usage.items()))
        say_what_next(url, management_key, bought["subscriptions"][0]["apiKey"])
        if sys.stdin.isatty():
            input(f"\nThe gateway stays up at {url} while you try; press Enter to stop it. ")
        else:
            print("\n(Not a terminal: the demo's servers stop now. Run it from a terminal to keep them up.)")
        print("\nDemo finished.")
    return 0


def say_what_next(url: str, management_key: str, api_key: str) -> None:
    """The keys above belong to this demo's temporary database: usable while its servers run."""
    say("What to try next", "\n".join([
        f"  Dashboard: open {url}/dashboard/ and sign in with the management key",
        f"    {management_key}",
        "  Inference: call /v1 with the API key (its seat is in the block that is open now)",
        f"    curl {url}/v1/chat/completions -H 'Authorization: Bearer {api_key}' \\",
        "         -H 'content-type: application/json' "
        + "-d '{\"model\": \"kimi-k2.6\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}'",
        "  Your own gateway (README.md, \"Running it\"):",
        "    agent-gateway test-upstream --port 9000    # the same fake model, on the port the example pools use",
        "    agent-gateway serve --port 8080",
        "    agent-gateway accounts create \"Acme\"      # then: accounts credit acct_… 100.00",
    ]))


async def _buy_with_x402(url: str, chain: DevChain, agent_key: str, order: dict) -> httpx.Response:
    from x402.http.clients import x402HttpxClient

    async with x402HttpxClient(chain.x402_client(agent_key, 500 * 10**6), base_url=url, timeout=60) as http:
        response = await http.post("/api/agent/subscribe-pool", json=order)
    response.raise_for_status()
    return response


def sign_in_with_wallet(http: httpx.Client, wallet_key: str, address: str) -> str:
    """A lost 201 loses nothing: the wallet signs the gateway's Sign-In with Ethereum message."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    challenge = http.post("/api/agent/auth/challenge", json={"address": address}).json()["data"]
    signature = Account.sign_message(encode_defunct(text=challenge["message"]), wallet_key).signature.hex()
    response = http.post("/api/agent/auth/sign-in", json={"challengeId": challenge["challengeId"],
                                                          "signature": "0x" + signature.removeprefix("0x")})
    management_key = response.json()["data"]["managementKey"]
    say("Agent: signs in with its wallet (EIP-4361, Sign-In with Ethereum) for a new management key",
        "\n".join(f"  | {line}".rstrip() for line in challenge["message"].splitlines())
        + f"\n  HTTP {response.status_code}: management key {management_key[:7]}… (the usage below is read with it)")
    return management_key


def _usdc(chain: DevChain, address: str) -> int:
    from agent_gateway.testing.devchain import token_contract

    return token_contract(chain.web3(), chain.token).functions.balanceOf(address).call()


def run_inference(url: str, api_key: str) -> None:
    """Stream a chat completion with the openai SDK; a second call meanwhile is refused with 429."""
    import openai

    with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0) as client:
        model = client.models.list().data[0].id
        say(f"Agent: openai SDK, streaming chat completion on {model!r}")
        second = None
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello to the demo."}], stream=True)
        with stream:
            print("  ", end="")
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    print(chunk.choices[0].delta.content, end="", flush=True)
                    if second is None:
                        # One request in flight per key: a second call while this one streams is refused.
                        try:
                            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "me too"}])
                            second = "admitted (unexpected)"
                        except openai.RateLimitError as exc:
                            body = exc.body if isinstance(exc.body, dict) else {}
                            second = f"HTTP {exc.status_code} {body.get('code')}: {body.get('message')}"
        print()
    print("  (These tokens come from the test upstream, a deterministic fake model on loopback, not a real LLM.)")
    say("Agent: a second call while the stream ran", f"  {second}")


def _wait_for_usage(http: httpx.Client, auth: dict[str, str]) -> dict:
    """Usage is written in batches off the request path; wait (bounded) until the call shows up."""
    deadline = time.monotonic() + 10
    while True:
        usage = http.get("/api/usage", headers=auth).json()["data"][0]["usage"]
        if usage["1h"]["requests"] or time.monotonic() > deadline:
            return usage
        time.sleep(0.1)  # polling for the batched write, bounded by the deadline
