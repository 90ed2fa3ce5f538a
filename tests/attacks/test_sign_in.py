"""Attacks on wallet sign-in: a phishing site that asks for the challenge with its own Host header,
Host headers built to break the database, and signatures over messages for another domain."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_checksum_address
from x402.http.clients import x402HttpxClient

from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import X402_POOLS, Wallet, chain_settings

pytestmark = pytest.mark.anyio

PUBLIC_URL = "https://gateway.example.com"
PUBLIC_DOMAIN = "gateway.example.com"
PHISHING_DOMAIN = "login.evil.example"
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}

# EIP-4361's ABNF as a pattern, written from the spec (not from the gateway) so the test checks it.
RFC3339 = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})"
SIWE = re.compile(
    r"\A(?P<domain>[^\s/]+) wants you to sign in with your Ethereum account:\n"
    r"(?P<address>0x[0-9a-fA-F]{40})\n\n"
    r"(?:(?P<statement>[^\n]+)\n)?\n"
    r"URI: (?P<uri>[^\n]+)\n"
    r"Version: (?P<version>1)\n"
    r"Chain ID: (?P<chain_id>[0-9]+)\n"
    r"Nonce: (?P<nonce>[a-zA-Z0-9]{8,})\n"
    rf"Issued At: (?P<issued_at>{RFC3339})"
    rf"(?:\nExpiration Time: (?P<expiration_time>{RFC3339}))?"
    rf"(?:\nNot Before: (?P<not_before>{RFC3339}))?"
    r"(?:\nRequest ID: (?P<request_id>[^\n]*))?"
    r"(?:\nResources:(?P<resources>(?:\n- [^\n]+)+))?\Z"
)


def parse_siwe(message: str) -> dict[str, str]:
    match = SIWE.match(message)
    assert match is not None, f"not an EIP-4361 message:\n{message}"
    return match.groupdict()


@pytest.fixture
def gateway(tmp_path: Path, database_url: str, upstream, devchain) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    """A real gateway taking payments on anvil, on SQLite and PostgreSQL, published at PUBLIC_URL."""
    with live_gateway(tmp_path, database_url, upstream, pools=X402_POOLS, public_url=PUBLIC_URL,
                      **chain_settings(devchain)) as live:
        yield live


async def wallet_account(live: LiveGateway, devchain, chain_view) -> Wallet:  # type: ignore[no-untyped-def]
    """A wallet that bought a seat with the official x402 client, so it has an account to sign in to."""
    wallet = chain_view.new_wallet()
    async with x402HttpxClient(devchain.x402_client(wallet.key), base_url=live.url, timeout=60) as http:
        r = await http.post("/api/agent/subscribe-pool", json=ORDER)
    assert r.status_code == 201, r.text
    return wallet


def ask_challenge(live: LiveGateway, address: str, host: str | bytes | None = None) -> dict:
    headers = {"host": host} if host is not None else {}
    r = httpx.post(live.url + "/api/agent/auth/challenge", json={"address": address}, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["data"]


def sign(message: str, key: str) -> str:
    return "0x" + Account.sign_message(encode_defunct(text=message), key).signature.hex().removeprefix("0x")


def submit(live: LiveGateway, challenge_id: str, signature: str) -> httpx.Response:
    return httpx.post(live.url + "/api/agent/auth/sign-in", json={"challengeId": challenge_id, "signature": signature},
                      timeout=30)


HOSTILE_HOSTS = {
    "phishing site": PHISHING_DOMAIN,
    "300 characters": "a" * 290 + ".example",
    "8000 characters": "h" * 8000,
    "broken IPv6": "[::1",
    "with a path": "evil.example/x?y#z",
    "non-ASCII": "\u00e9vil.example".encode("utf-8"),
}


@pytest.mark.parametrize("host", list(HOSTILE_HOSTS), ids=list(HOSTILE_HOSTS))
def test_the_sign_in_message_names_the_public_url_whatever_host_the_client_sends(gateway, host):
    wallet = Account.create()
    challenge = ask_challenge(gateway, wallet.address, HOSTILE_HOSTS[host])  # 201: never a 500
    fields = parse_siwe(challenge["message"])
    assert fields["domain"] == PUBLIC_DOMAIN and fields["uri"] == PUBLIC_URL
    assert "evil" not in challenge["message"] and "aaaa" not in challenge["message"]


def test_the_sign_in_message_is_eip_4361_bound_to_the_chain_with_a_fresh_nonce_and_an_expiry(gateway, devchain):
    wallet = Account.create()
    first, second = (ask_challenge(gateway, wallet.address.lower()) for _ in range(2))
    fields = parse_siwe(first["message"])
    assert fields["address"] == wallet.address and is_checksum_address(fields["address"])  # EIP-55
    assert fields["statement"] and fields["version"] == "1"
    assert int(fields["chain_id"]) == devchain.chain_id
    assert parse_siwe(second["message"])["nonce"] != fields["nonce"]
    issued_at = datetime.fromisoformat(fields["issued_at"])
    expires_at = datetime.fromisoformat(fields["expiration_time"])
    assert issued_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(issued_at.tzinfo) - issued_at) < timedelta(minutes=5)
    assert expires_at - issued_at == timedelta(minutes=10)
    assert datetime.fromisoformat(first["expiresAt"].replace("Z", "+00:00")) == expires_at


async def test_signing_the_siwe_message_gives_a_management_key_that_works(gateway, devchain, chain_view):
    wallet = await wallet_account(gateway, devchain, chain_view)
    challenge = ask_challenge(gateway, wallet.address)
    assert parse_siwe(challenge["message"])["domain"] == PUBLIC_DOMAIN
    r = submit(gateway, challenge["challengeId"], sign(challenge["message"], wallet.key))
    assert r.status_code == 201, r.text
    mk = r.json()["data"]["managementKey"]
    subs = httpx.get(gateway.url + "/api/subscriptions", headers={"Authorization": f"Bearer {mk}"}, timeout=30)
    assert subs.status_code == 200 and [s["pool"] for s in subs.json()["data"]] == ["alpha"]


async def test_a_phishing_site_cannot_turn_a_victims_signature_into_a_management_key(gateway, devchain, chain_view):
    victim = await wallet_account(gateway, devchain, chain_view)
    # The phishing site asks for the victim's challenge under its own name...
    challenge = ask_challenge(gateway, victim.address, PHISHING_DOMAIN)
    message = challenge["message"]
    # ...but a SIWE wallet on login.evil.example signs only a message for login.evil.example.
    phished = PHISHING_DOMAIN + message[message.index(" wants you to sign in"):]
    assert parse_siwe(phished)["domain"] == PHISHING_DOMAIN
    r = submit(gateway, challenge["challengeId"], sign(phished, victim.key))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_signature"
    # Nor does a message naming another chain, or another URI, count.
    for field, value in (("Chain ID: ", "Chain ID: 1\n"), ("URI: ", f"URI: https://{PHISHING_DOMAIN}\n")):
        start = message.index(field)
        other = message[:start] + value + message[message.index("\n", start) + 1:]
        r = submit(gateway, challenge["challengeId"], sign(other, victim.key))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_signature"
    # The real message still works once: the refusals spent nothing.
    assert submit(gateway, challenge["challengeId"], sign(message, victim.key)).status_code == 201
