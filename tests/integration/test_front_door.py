"""`GET /`: a person's browser is sent to the dashboard, an agent or a script gets where to go."""

import pytest

pytestmark = pytest.mark.anyio

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


async def test_a_browser_at_the_root_is_sent_to_the_dashboard(gateway):
    base = gateway.services.settings.external_url
    r = await gateway.client.get("/", headers={"accept": BROWSER_ACCEPT, "host": "evil.example"})
    assert r.status_code == 303 and r.headers["location"] == f"{base}/dashboard/"
    signin = await gateway.client.get(r.headers["location"].removeprefix(base), follow_redirects=True)
    assert signin.status_code == 200 and "Sign in" in signin.text


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, text/html;q=0.5"])
async def test_anything_else_at_the_root_gets_a_json_map_of_the_gateway(gateway, accept):
    base = gateway.services.settings.external_url
    headers = {"host": "evil.example", **({"accept": accept} if accept else {})}
    r = await gateway.client.get("/", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    # Absolute URLs from AGW_PUBLIC_URL (or host:port), never from the Host header.
    assert doc["plans"] == f"{base}/api/agent/plans" and doc["pools"] == f"{base}/api/pools"
    assert doc["dashboard"] == f"{base}/dashboard/" and doc["inference"] == f"{base}/v1"
    assert "evil.example" not in r.text
    for url in (doc["plans"], doc["pools"]):
        assert (await gateway.client.get(url.removeprefix(base))).status_code == 200
