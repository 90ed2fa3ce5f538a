"""Discovery documents with payments off (the default), in-process on SQLite and PostgreSQL: a
valid OpenAPI 3.1 document covering every route, an A2A 1.0 agent card, no x402 path advertised,
and every URL absolute from AGW_PUBLIC_URL whatever Host is sent."""

from __future__ import annotations

import json

import httpx
import pytest
from a2a.types import AgentCard
from google.api import field_behavior_pb2
from google.protobuf.json_format import ParseDict
from openapi_spec_validator import validate
from starlette.routing import Route

from agent_gateway.app import create_app
from agent_gateway.lifespan import build_services
from agent_gateway.settings import Settings

pytestmark = pytest.mark.anyio
PUBLIC_URL = "https://gateway.example.com/agw"
HOSTS = ["evil.example", "gateway.example.com.evil.example:8443"]
DOCUMENTS = ["/.well-known/x402", "/openapi.json", "/.well-known/agent-card.json", "/.well-known/agent.json",
             "/llms.txt"]


@pytest.fixture
async def public(settings: Settings, clock):  # type: ignore[no-untyped-def]
    services = build_services(settings.model_copy(update={"public_url": PUBLIC_URL}), clock)
    app = create_app(services=services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield app, client


def urls_in(text: str) -> list[str]:
    import re

    return re.findall(r"https?://[^\s\"'<>)\]]+", text)


async def test_the_openapi_document_is_valid_and_covers_every_route(public):
    app, client = public
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    document = r.json()
    validate(document)  # OpenAPI 3.1, checked by openapi-spec-validator
    assert document["servers"] == [{"url": PUBLIC_URL}]
    served = {(route.path, method.lower()) for route in app.routes if isinstance(route, Route)
              for method in (route.methods or ()) if method != "HEAD"}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    discovery = {(path, "get") for path in DOCUMENTS}
    # /mcp speaks JSON-RPC, not REST: the manifest, the agent card and llms.txt name it instead.
    mcp = {("/mcp", "post")}
    # The operator's admin API is not described to customers and agents (docs/decisions.md).
    admin = {(path, method) for path, method in served if path.startswith("/api/admin/")}
    assert admin and not any(path.startswith("/api/admin") for path, _ in documented)
    assert served - discovery - mcp - admin == documented, "every API route is documented, and nothing else"
    # Request bodies are the routes' own models: unknown fields refused, required fields required.
    schemas = document["components"]["schemas"]
    assert schemas["SubscribePoolBody"]["required"] == ["pool", "blocks"]
    assert schemas["SubscribePoolBody"]["additionalProperties"] is False
    assert set(document["components"]["securitySchemes"]) >= {"managementKey", "apiKey"}
    # Payments off: no operation is offered as x402-paid.
    assert "x-payment-info" not in json.dumps(document)


async def test_the_agent_card_has_every_field_a2a_1_0_requires(public):
    _, client = public
    for path in ["/.well-known/agent-card.json", "/.well-known/agent.json"]:
        r = await client.get(path)
        assert r.status_code == 200
        raw = r.json()
        card = ParseDict(raw, AgentCard(), ignore_unknown_fields=True)
        assert_required_fields_set(card)
        for interface in card.supported_interfaces:
            assert_required_fields_set(interface)
        for skill in card.skills:
            assert_required_fields_set(skill)
        assert raw["url"] == PUBLIC_URL + "/mcp"  # for 0.x readers
        assert card.supported_interfaces[0].url == PUBLIC_URL + "/mcp"
    assert (await client.get("/.well-known/agent.json")).json() == raw


def assert_required_fields_set(message) -> None:  # type: ignore[no-untyped-def]
    """Each field the A2A proto marks REQUIRED (google.api.field_behavior) is present and not empty."""
    for field in message.DESCRIPTOR.fields:
        if field_behavior_pb2.REQUIRED not in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]:
            continue
        if field.is_repeated:
            assert len(getattr(message, field.name)) > 0, field.name
        elif field.message_type is not None:
            assert message.HasField(field.name), field.name
        else:
            assert getattr(message, field.name), field.name


async def test_with_payments_off_no_x402_path_is_advertised(public):
    _, client = public
    manifest = (await client.get("/.well-known/x402")).json()
    assert manifest["version"] == 1 and manifest["resources"] == []
    assert manifest["mcp"] == PUBLIC_URL + "/mcp"
    for path in ["/llms.txt", "/.well-known/agent-card.json", "/"]:
        text = (await client.get(path, headers={"accept": "application/json"})).text
        assert "x402" not in text.lower() and "/api/agent/subscribe-pool" not in text, path
    assert "/api/pools/<slug>/subscribe" in (await client.get("/llms.txt")).text  # the management-key path
    assert f"{PUBLIC_URL}/mcp" in (await client.get("/llms.txt")).text


@pytest.mark.parametrize("host", HOSTS)
async def test_every_url_in_the_documents_is_absolute_from_the_public_url(public, host):
    _, client = public
    for path in DOCUMENTS + ["/"]:
        r = await client.get(path, headers={"host": host, "accept": "application/json"})
        assert r.status_code == 200, path
        assert "evil.example" not in r.text, path
        found = urls_in(r.text)
        assert found, path
        for url in found:
            if "json-schema.org" not in url:
                assert url.startswith(PUBLIC_URL + "/") or url == PUBLIC_URL, (path, url)


async def test_every_document_is_linked_from_the_front_door(public):
    _, client = public
    links = (await client.get("/", headers={"accept": "application/json"})).json()
    for name, path in [("openapi", "/openapi.json"), ("agentCard", "/.well-known/agent-card.json"),
                       ("llms", "/llms.txt"), ("mcp", "/mcp")]:
        assert links[name] == PUBLIC_URL + path
    for name in ["openapi", "agentCard", "llms"]:
        r = await client.get(links[name].removeprefix(PUBLIC_URL))
        assert r.status_code == 200, name
