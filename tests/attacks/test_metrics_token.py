"""/metrics: public by default, and behind a bearer token when the operator sets AGW_METRICS_TOKEN."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from agent_gateway.app import create_app
from agent_gateway.settings import Settings
from tests.conftest import write_pools_file

pytestmark = pytest.mark.anyio
TOKEN = "metrics-secret-4f1c"


def client_for(tmp_path: Path, sqlite_url: str, **settings) -> httpx.AsyncClient:
    app = create_app(Settings(_env_file=None, database_url=sqlite_url, pools_file=write_pools_file(tmp_path),
                              auto_migrate=False, **settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x",
                                           "Bearer m\u00e9trics"])
async def test_with_a_token_metrics_refuse_a_missing_or_wrong_one(tmp_path, sqlite_url, authorization):
    headers = {"Authorization": authorization.encode("latin-1")} if authorization else {}
    async with client_for(tmp_path, sqlite_url, metrics_token=TOKEN) as http:
        r = await http.get("/metrics", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_metrics_token"
    assert "agw_" not in r.text and r.headers["www-authenticate"] == "Bearer"


async def test_with_a_token_metrics_answer_the_right_one(tmp_path, sqlite_url):
    async with client_for(tmp_path, sqlite_url, metrics_token=TOKEN) as http:
        r = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain") and "agw_proxy_requests_total" in r.text


async def test_without_a_token_metrics_stay_public(tmp_path, sqlite_url):
    async with client_for(tmp_path, sqlite_url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200 and "agw_proxy_requests_total" in r.text
