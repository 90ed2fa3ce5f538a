"""Hostile request bodies: deep nesting, repeated keys, wrong types. The gateway answers 400 with a
clear code, writes nothing, and keeps running for everyone else."""

from __future__ import annotations

import base64
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent_gateway.web.bodies import BoundedBody
from agent_gateway.app import RECURSION_LIMIT, create_app
from agent_gateway.payments.wire import WireError, decode_header
from agent_gateway.settings import Settings
from agent_gateway.testing.processes import start_gateway
from tests.conftest import auth, write_pools_file
from tests.fixtures.live import buy_key, provision_account
from tests.fixtures.state import snapshot

# The repro, as stated: 40 KB that used to kill the process.
NESTED_ADDRESS = ('{"address":' + "[" * 20000 + "]" * 20000 + "}").encode()
# 200 KB of open brackets: the same crash through every JSON route.
OPEN_BRACKETS = b"[" * 100000
JSON = {"content-type": "application/json"}

pytestmark = pytest.mark.anyio


@dataclass
class Process:
    process: object
    url: str
    mk: str
    sk: str

    def alive(self) -> bool:
        return self.process.poll() is None and httpx.get(self.url + "/healthz", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def gateway_process(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[Process]:
    """`agent-gateway serve` as its own process (the crash took the whole process down)."""
    directory = tmp_path_factory.mktemp("hostile")
    database = directory / "gateway.db"
    shutil.copyfile(sqlite_template, database)
    url = f"sqlite:///{database}"
    env = {"AGW_DATABASE_URL": url, "AGW_POOLS_FILE": str(write_pools_file(directory)),
           "AGW_AUTO_MIGRATE": "false", "AGW_JOB_INTERVAL_S": "3600"}
    process, base = start_gateway(env, log=directory / "gateway.log")
    try:
        mk = provision_account(url)
        sk, _ = buy_key(base, mk, "alpha", ["europe"])
        yield Process(process, base, mk, sk)
    finally:
        process.kill()
        process.wait()


def _json_routes(p: Process) -> list[tuple[str, dict[str, str]]]:
    return [
        ("/api/agent/auth/challenge", {}),
        ("/api/agent/auth/sign-in", {}),
        ("/api/agent/subscribe-pool", {}),
        ("/api/agent/renew", {}),
        ("/api/pools/alpha/subscribe", auth(p.mk)),
        ("/api/keys/subscription", auth(p.mk)),
        ("/api/management-keys", auth(p.mk)),
        ("/v1/chat/completions", auth(p.sk)),
        ("/v1/completions", auth(p.sk)),
        ("/v1/embeddings", auth(p.sk)),
    ]


def test_the_nested_address_repro_is_a_400_and_the_gateway_lives(gateway_process):
    r = httpx.post(gateway_process.url + "/api/agent/auth/challenge", content=NESTED_ADDRESS, headers=JSON,
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "json_too_deep"
    assert "64" in r.json()["error"]["message"]
    assert gateway_process.alive()


@pytest.mark.parametrize("body", [NESTED_ADDRESS, OPEN_BRACKETS], ids=["nested-40KB", "open-200KB"])
def test_deep_json_on_every_json_route_is_a_400_and_the_gateway_lives(gateway_process, body):
    for path, headers in _json_routes(gateway_process):
        r = httpx.post(gateway_process.url + path, content=body, headers={**JSON, **headers}, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "json_too_deep", (path, r.text)
        assert gateway_process.alive(), path


def test_hostile_dashboard_form_posts_are_refused_and_the_gateway_lives(gateway_process):
    posts = ["/dashboard/signin", "/dashboard/signout", "/dashboard/keys", "/dashboard/keys/key_x/disable",
             "/dashboard/management-keys", "/dashboard/management-keys/mkey_x/revoke"]
    form = {"content-type": "application/x-www-form-urlencoded"}
    bodies = [(NESTED_ADDRESS, JSON), (OPEN_BRACKETS, form), (b"address=" + NESTED_ADDRESS, form),
              (b"&".join(b"f%d=1" % i for i in range(5000)), form), (b"csrf=a&csrf=b", form)]
    for path in posts:
        for body, headers in bodies:
            r = httpx.post(gateway_process.url + path, content=body, headers=headers, timeout=30)
            assert r.status_code in (400, 403), (path, r.status_code)
            assert gateway_process.alive(), path


def test_a_repeated_dashboard_form_field_is_an_unreadable_form(gateway_process):
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = httpx.post(gateway_process.url + "/dashboard/signin", content=b"management_key=mk_a&management_key=mk_b",
                   headers=form, timeout=30)
    assert r.status_code == 400
    assert "could not be read" in r.text


def test_creating_the_app_puts_the_recursion_limit_back_to_the_default(tmp_path):
    sys.setrecursionlimit(100_000)  # what importing py_ecc (through eth-account) does
    create_app(Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'unused.db'}", auto_migrate=False))
    assert sys.getrecursionlimit() == RECURSION_LIMIT == 1000


# --- PAYMENT-SIGNATURE --------------------------------------------------------------------

def _deep_payment_header(depth: int) -> str:
    return base64.b64encode(('{"x402Version":2,"accepted":' + "[" * depth + "]" * depth + "}").encode()).decode()


def test_a_deeply_nested_payment_header_is_refused_before_it_is_parsed():
    with pytest.raises(WireError) as refused:
        decode_header(_deep_payment_header(5000), 64)
    assert refused.value.code == "invalid_payment_header"
    assert "deeper than 64" in refused.value.message


def test_a_deeply_nested_payment_signature_gets_a_fresh_challenge_and_charges_nothing(x402_gateway):
    body = {"pool": "alpha", "blocks": ["day"], "quantity": 1}
    with httpx.Client(base_url=x402_gateway.url, timeout=30) as http:
        r = http.post("/api/agent/subscribe-pool", json=body,
                      headers={"PAYMENT-SIGNATURE": _deep_payment_header(6000)})
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "invalid_payment_header"
        assert "deeper than 64" in r.json()["error"]["message"]
        assert "PAYMENT-REQUIRED" in r.headers
        assert http.get("/healthz").status_code == 200
    payments = x402_gateway.server.call(_count_payments(x402_gateway))
    assert payments == 0


async def _count_payments(live) -> int:  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from agent_gateway.db.models import Payment

    async with live.services.db.transaction() as session:
        return await session.scalar(select(func.count()).select_from(Payment))


# --- repeated keys and wrong types (in process, both databases) ---------------------------

API_BODIES = [
    ("/api/pools/alpha/subscribe", '{"blocks":["europe"],"quantity":1,"quantity":2}', "quantity"),
    ("/api/pools/alpha/subscribe", '{"blocks":["europe"],"quantity":1,"billingCycle":"month","billingCycle":"year"}',
     "billingCycle"),
    ("/api/keys/subscription", '{"name":"a","subscriptionId":"{sub}","name":"b"}', "name"),
    ("/api/keys/subscription", '{"name":"a","subscriptionId":"{sub}","meta":{"x":1,"x":2}}', "x"),
    ("/api/keys/subscription", '{"name":"a","subscriptionId":"{sub}","tags":[{"t":1,"t":2}]}', "t"),
    ("/api/keys/subscription", '{"name":"a","subscr\\u0069ptionId":"{sub}","subscriptionId":"{sub}"}',
     "subscriptionId"),
    ("/api/management-keys", '{"name":"a","name":"b"}', "name"),
    ("/api/agent/subscribe-pool", '{"pool":"alpha","blocks":["europe"],"pool":"tiny"}', "pool"),
    ("/api/agent/renew", '{"subscriptionId":"{sub}","subscriptionId":"{sub}"}', "subscriptionId"),
    ("/api/agent/auth/challenge", '{"address":"0x1","address":"0x2"}', "address"),
    ("/api/agent/auth/sign-in", '{"challengeId":"a","signature":"b","signature":"c"}', "signature"),
]


async def test_a_repeated_key_at_any_level_of_an_api_body_is_a_400_naming_it_and_writes_nothing(gateway):
    _, mk = await gateway.new_account(credit="1000")
    sub = (await gateway.buy(mk))[0]
    before = await snapshot(gateway.services.db)
    for path, body, key in API_BODIES:
        r = await gateway.client.post(path, content=body.replace("{sub}", sub["id"]).encode(),
                                      headers={**JSON, **auth(mk)})
        assert r.status_code == 400, (path, body, r.text)
        error = r.json()["error"]
        assert error["code"] == "duplicate_key", (path, body, error)
        assert repr(key) in error["message"], (key, error)
    assert await snapshot(gateway.services.db) == before


@pytest.fixture
async def sk(gateway) -> str:
    _, mk = await gateway.new_account(credit="1000")
    sub = (await gateway.buy(mk, blocks=["europe"]))[0]
    return (await gateway.mint(mk, sub["id"]))["apiKey"]


V1_REPEATS = [
    '{"model":"alpha-1","model":"rest-1","messages":[]}',
    '{"model":"rest-1","messages":[],"mod\\u0065l":"alpha-1"}',
    '{"model":"alpha-1","stream":false,"stream":true,"messages":[]}',
    '{"model":"alpha-1","stream":true,"stream_options":{"include_usage":true},'
    '"stream_options":{"include_usage":false},"messages":[]}',
    '{"model":"alpha-1","messages":[],"stre\\u0061m":true,"stream":false}',
    '{"model":"alpha-1","stream":true,"stream_options":{"include_usage":true,"include_usage":false},'
    '"messages":[]}',
]


@pytest.mark.parametrize("body", V1_REPEATS)
async def test_a_repeated_model_or_stream_key_on_v1_is_a_400_and_never_reaches_upstream(gateway, sk, body):
    before = await snapshot(gateway.services.db)
    r = await gateway.client.post("/v1/chat/completions", content=body.encode(), headers={**JSON, **auth(sk)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "duplicate_key"
    assert await snapshot(gateway.services.db) == before


@pytest.mark.parametrize("body", [
    '{"model":"alpha-1","Model":"rest-1","messages":[]}',
    '{"MODEL":"rest-1","model":"alpha-1","messages":[]}',
    '{"model":"alpha-1","stream":false,"Stream":true,"messages":[]}',
    '{"model":"alpha-1","stream":false,"\\u017ftream":true,"messages":[]}',  # long s: Go folds it to "s"
    '{"model":"alpha-1","stream":true,"stream_options":{"include_usage":true,"Include_Usage":false},'
    '"messages":[]}',
])
async def test_a_read_key_spelled_in_another_case_is_a_400_for_case_blind_upstreams(gateway, sk, body):
    r = await gateway.client.post("/v1/chat/completions", content=body.encode(), headers={**JSON, **auth(sk)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "ambiguous_key"


@pytest.mark.parametrize("field", ['"stream":"true"', '"stream":1', '"stream":[true]', '"stream":{}',
                                   '"stream":true,"stream_options":"yes"',
                                   '"stream":true,"stream_options":{"include_usage":"true"}'])
async def test_a_stream_flag_that_is_not_a_boolean_is_a_400_not_an_unmetered_stream(gateway, sk, field):
    body = '{"model":"alpha-1","messages":[{"role":"user","content":"hi"}],' + field + "}"
    r = await gateway.client.post("/v1/chat/completions", content=body.encode(), headers={**JSON, **auth(sk)})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_stream"


async def test_a_null_stream_means_no_stream(gateway, sk):
    # null is "absent", as OpenAI reads it: the request goes on (to an upstream that is not there).
    body = b'{"model":"alpha-1","messages":[],"stream":null,"stream_options":null}'
    r = await gateway.client.post("/v1/chat/completions", content=body, headers={**JSON, **auth(sk)})
    assert r.status_code == 502, r.text


async def test_a_quoted_model_inside_a_message_is_not_a_repeated_key(gateway, sk):
    body = json.dumps({"model": "alpha-1", "messages": [{"role": "user", "content": '"model" "model"'},
                                                       {"role": "user", "content": {"model": 1}}]}).encode()
    r = await gateway.client.post("/v1/chat/completions", content=body, headers={**JSON, **auth(sk)})
    assert r.status_code == 502, r.text  # admitted; the test upstream is not running


# --- the wrapper for apps that read their own bodies (MCP) --------------------------------

async def _echo(scope, receive, send):  # type: ignore[no-untyped-def]
    """A small inner app that reads its body without bounds, as the MCP SDK does."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"inner:" + body})


@pytest.fixture
async def bounded() -> Iterator[httpx.AsyncClient]:
    app = BoundedBody(_echo, max_bytes=4096, max_depth=8)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mcp.test") as client:
        yield client


async def test_the_body_wrapper_passes_a_good_body_through_unchanged(bounded):
    body = json.dumps({"jsonrpc": "2.0", "method": "tools/list", "params": {"a": [[["]]]]]]"]]]}}).encode()
    r = await bounded.post("/mcp", content=body)
    assert r.status_code == 200 and r.content == b"inner:" + body


async def test_the_body_wrapper_replays_a_body_sent_in_chunks(bounded):
    async def chunks():  # type: ignore[no-untyped-def]
        for part in (b'{"a":', b"[1,2", b"]}"):
            yield part

    r = await bounded.post("/mcp", content=chunks())
    assert r.status_code == 200 and r.content == b'inner:{"a":[1,2]}'


async def test_the_body_wrapper_refuses_deep_json_before_the_inner_app_reads_it(bounded):
    r = await bounded.post("/mcp", content=b'{"a":' + b"[" * 9 + b"]" * 9 + b"}")
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_deep"


async def test_the_body_wrapper_refuses_a_body_over_its_size(bounded):
    r = await bounded.post("/mcp", content=b" " * 5000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    async def endless():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 1000

    r = await bounded.post("/mcp", content=endless())
    assert r.status_code == 413
