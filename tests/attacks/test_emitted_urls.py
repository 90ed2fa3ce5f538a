"""Attacks on the URLs the gateway emits: a client's Host header never becomes a URL in an x402
challenge or on a dashboard page; they come from AGW_PUBLIC_URL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.live import LiveGateway, live_gateway
from tests.fixtures.x402 import X402_POOLS, chain_settings

PUBLIC_URL = "https://gateway.example.com/agw"
HOSTS = ["evil.example", "gateway.example.com.evil.example:8443", "[::1", "x" * 300]
ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1}


@pytest.fixture
def gateway(tmp_path: Path, sqlite_url: str, upstream, devchain) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    with live_gateway(tmp_path, sqlite_url, upstream, pools=X402_POOLS, public_url=PUBLIC_URL,
                      **chain_settings(devchain)) as live:
        yield live


def challenge_resource(response: httpx.Response) -> str:
    assert response.status_code == 402, response.text
    header = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    assert response.json()["resource"] == header["resource"]  # the body carries the same object
    return header["resource"]["url"]


@pytest.mark.parametrize("host", HOSTS)
def test_the_x402_resource_is_the_public_url_whatever_host_is_sent(gateway, host):
    mk = gateway.new_account(credit_usdc=0)  # no balance: the management subscribe answers with x402 too
    with httpx.Client(base_url=gateway.url, headers={"host": host}, timeout=30) as http:
        agent = http.post("/api/agent/subscribe-pool", json=ORDER)
        assert challenge_resource(agent) == PUBLIC_URL + "/api/agent/subscribe-pool"
        managed = http.post("/api/pools/alpha/subscribe", json={"blocks": ["day"], "quantity": 1},
                            headers={"Authorization": f"Bearer {mk}"})
        assert challenge_resource(managed) == PUBLIC_URL + "/api/pools/alpha/subscribe"


@pytest.mark.parametrize("host", HOSTS[:2])
def test_dashboard_examples_name_the_public_url_whatever_host_is_sent(gateway, host):
    page = httpx.get(gateway.url + "/dashboard/pools", headers={"host": host}, timeout=30)
    assert page.status_code == 200
    assert f"POST {PUBLIC_URL}/api/agent/subscribe-pool" in page.text
    assert "evil.example" not in page.text
