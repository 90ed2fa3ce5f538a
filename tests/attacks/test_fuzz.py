"""Property-based fuzzing of every route: hostile bodies, headers, cookies, paths and queries never
get a 5xx, and a request answered 4xx writes nothing (every table compared before and after).

The only 5xx allowed are the documented ones: 502/504 from the upstream (none runs here) and
503 `payments_disabled` / `pool_not_active`. Examples are derandomized and bounded, so a run is
repeatable and short; the numbers are printed at the end of each run."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlmodel import SQLModel
from starlette.routing import Mount, Route

from agent_gateway.app import create_app
from agent_gateway.lifespan import build_services
from tests.conftest import Gateway, auth


EXAMPLES_PER_DATABASE = 1000
ALLOWED_5XX_CODES = {"payments_disabled", "pool_not_active"}

# --- what to send --------------------------------------------------------------------------

FIELDS = ["pool", "poolSlug", "blocks", "quantity", "billingCycle", "name", "txHash", "signature",
          "subscriptionId", "address", "challengeId", "model", "stream", "stream_options", "messages",
          "input", "prompt", "max_tokens", "include_usage", "x402Version", "accepted", "payload"]
HOSTILE_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\x00", "\ud800", "\udfff", "a\x00b", "europe", "alpha", "month", "year",
                     "alpha-1", "0x" + "0" * 40, "0x" + "f" * 64, "sub_x", "key_x", "é" * 300, "%00",
                     "../../etc", "' OR 1=1 --", "\u202e", "NaN"]),
)
NUMBERS = st.one_of(st.integers(), st.integers(min_value=10**30, max_value=10**300), st.floats(),
                    st.sampled_from([0, -1, 1, 2**63, -(2**63) - 1, 1e308, 0.5]))
VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | HOSTILE_TEXT, inner,
                                                                max_size=4),
    max_leaves=12,
)


def _dump(value: object) -> bytes:
    # ensure_ascii writes lone surrogates and NUL as \u escapes; NaN/Infinity come out as such.
    return json.dumps(value).encode()


# A body each route accepts; fuzzing changes one field of it (or none), to get past parsing.
VALID_BODIES = {
    "/api/pools/{slug}/subscribe": {"blocks": ["europe"], "quantity": 1, "billingCycle": "month"},
    "/api/keys/subscription": {"name": "k", "subscriptionId": "{subscription}"},
    "/api/management-keys": {"name": "ci"},
    "/api/agent/subscribe-pool": {"pool": "alpha", "blocks": ["europe"], "quantity": 1, "name": "agent"},
    "/api/agent/renew": {"subscriptionId": "{subscription}", "billingCycle": "year"},
    "/api/agent/auth/challenge": {"address": "0x" + "1" * 40},
    "/api/agent/auth/sign-in": {"challengeId": "chal_x", "signature": "0x" + "cd" * 65},
    "/v1/chat/completions": {"model": "alpha-1", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    "/v1/completions": {"model": "alpha-1", "prompt": "hi", "max_tokens": 5},
    "/v1/embeddings": {"model": "alpha-1", "input": "hi"},
}
TX_CLAIM = {"pool": "alpha", "blocks": ["europe"], "txHash": "0x" + "ab" * 32, "signature": "0x" + "cd" * 65}
MAX_DEPTH = 64  # the default AGW_MAX_JSON_DEPTH the fixtures run with
# 400s that a too-deep body may get: its own, a NUL in the URL (refused before routing), and the
# dashboard's HTML pages (no JSON code).
BEFORE_THE_BODY = {"json_too_deep", "invalid_path", None}


@st.composite
def json_bodies(draw, template: str, subscription_id: str) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    """(kind, body); kind "too_deep" marks bodies nested past the gateway's bound."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "fields", "fields", "any", "deep", "repeat", "broken",
                                 "bytes", "empty"]))
    if kind == "valid":
        base = VALID_BODIES.get(template) or draw(st.sampled_from([*VALID_BODIES.values(), TX_CLAIM]))
        body = json.loads(json.dumps(base).replace("{subscription}", subscription_id))
        change = draw(st.sampled_from(["none", "text", "value"]))
        if change != "none":
            body[draw(st.sampled_from([*body, *FIELDS]))] = draw(HOSTILE_TEXT if change == "text" else VALUES)
        return kind, _dump(body)
    if kind == "fields":
        return kind, _dump(draw(st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=6)))
    if kind == "any":
        return kind, _dump(draw(VALUES))
    if kind == "deep":
        repeats = draw(st.sampled_from([31, 32, 62, 63, 64, 200, 5000, 50_000]))
        opener, closer, levels = draw(st.sampled_from([("[", "]", 1), ('{"a":', "}", 1), ('[{"model":', "}]", 2)]))
        body = '{"model":"alpha-1","blocks":' + opener * repeats + "1" + closer * repeats + "}"
        return ("too_deep" if 1 + repeats * levels > MAX_DEPTH else kind), body.encode()
    if kind == "repeat":
        key = draw(st.sampled_from(FIELDS))
        first, second = _dump(draw(VALUES)).decode(), _dump(draw(VALUES)).decode()
        return kind, f'{{"{key}":{first},"{key}":{second}}}'.encode()
    if kind == "broken":
        whole = _dump(draw(st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=4)))
        return kind, whole[: draw(st.integers(min_value=0, max_value=max(0, len(whole) - 1)))]
    if kind == "bytes":
        return kind, draw(st.binary(max_size=64))
    return kind, b""


FORM_BODIES = st.dictionaries(st.sampled_from(["csrf", "name", "subscription_id", "management_key"]) | st.text(max_size=5),
                              HOSTILE_TEXT, max_size=4).map(
    lambda d: urlencode(d, encoding="utf-8", errors="surrogatepass").encode())
# Header values are bytes on the wire; latin-1 is what HTTP allows beyond ASCII.
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                      max_size=40).map(lambda text: text.encode("latin-1"))




@st.composite
def payment_headers(draw) -> bytes:  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["json", "deep", "garbage"]))
    if kind == "json":
        body = _dump(draw(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=5)))
    elif kind == "deep":
        body = b'{"x402Version":2,"accepted":' + b"[" * 3000 + b"]" * 3000 + b"}"
    else:
        return draw(HEADER_TEXT)
    return base64.b64encode(body)


# --- the app and its routes -----------------------------------------------------------------

@dataclass
class Known:
    """Real ids and keys, so some fuzzed requests get past authentication and lookups."""

    mk: str
    sk: str
    key_id: str
    subscription_id: str
    mkey_id: str


def route_table(app) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(method, path template) for every route in the app, the dashboard's included."""
    table = []
    for route in app.routes:
        if isinstance(route, Mount):
            for inner in route.routes:
                if isinstance(inner, Route):
                    table += [(m, route.path + inner.path) for m in sorted(inner.methods - {"HEAD"})]
                elif isinstance(inner, Mount):
                    table.append(("GET", route.path + inner.path + "/{path}"))
        elif isinstance(route, Route):
            table += [(m, route.path) for m in sorted(route.methods - {"HEAD"})]
    return table


@st.composite
def path_values(draw, known: Known) -> str:  # type: ignore[no-untyped-def]
    value = draw(st.one_of(st.sampled_from(["alpha", "tiny", "resting", "disable", "enable", "delete",
                                            known.key_id, known.subscription_id, known.mkey_id,
                                            "pay_x", "dashboard.css"]), HOSTILE_TEXT))
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


async def _tables(db) -> dict:  # type: ignore[no-untyped-def]
    """Every row of every table."""
    async with db.transaction() as session:
        return {table.name: sorted(map(repr, (await session.execute(select(table))).all()))
                for table in SQLModel.metadata.sorted_tables}


@dataclass
class Fuzzed:
    """The app in process, driven from a loop of its own so that hypothesis runs plain examples."""

    loop: asyncio.AbstractEventLoop
    gateway: Gateway
    known: Known
    routes: list[tuple[str, str]]
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    baseline: dict = field(default_factory=dict)

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)


async def _provision(gateway: Gateway) -> Known:
    _, mk = await gateway.new_account(credit="1000")
    sub = (await gateway.buy(mk))[0]
    key = await gateway.mint(mk, sub["id"])
    r = await gateway.client.get("/api/management-keys", headers=auth(mk))
    return Known(mk=mk, sk=key["apiKey"], key_id=key["id"], subscription_id=sub["id"],
                 mkey_id=r.json()["data"][0]["id"])


@pytest.fixture
def fuzzed(settings, clock, database_url) -> Iterator[Fuzzed]:  # type: ignore[no-untyped-def]
    loop = asyncio.new_event_loop()
    services = build_services(settings, clock)
    app = create_app(services=services)
    # The lifespan is entered and left by one task (the MCP session manager's task group insists).
    ready, stop = asyncio.Event(), asyncio.Event()

    async def hold_lifespan() -> None:
        async with app.router.lifespan_context(app):
            ready.set()
            await stop.wait()

    holder = loop.create_task(hold_lifespan())
    loop.run_until_complete(ready.wait())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test")
    gateway = Gateway(client=client, services=services)
    fuzzed = Fuzzed(loop, gateway, loop.run_until_complete(_provision(gateway)), route_table(app))
    fuzzed.baseline = fuzzed.run(_tables(services.db))
    started = time.perf_counter()
    try:
        yield fuzzed
    finally:
        if fuzzed.requests:
            print(f"\nfuzz[{database_url.split(':')[0]}]: {fuzzed.requests} requests in "
                  f"{time.perf_counter() - started:.1f} s; statuses {dict(sorted(fuzzed.by_status.items()))}")
        loop.run_until_complete(client.aclose())
        stop.set()
        loop.run_until_complete(holder)
        loop.close()


def test_every_route_is_fuzzed(fuzzed):
    assert any(path.startswith("/dashboard/") for _, path in fuzzed.routes)
    assert {("POST", "/v1/chat/completions"), ("POST", "/api/agent/subscribe-pool"),
            ("GET", "/healthz")} <= set(fuzzed.routes)


@settings(max_examples=EXAMPLES_PER_DATABASE, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_fuzzed_request_gets_a_5xx_or_writes_on_a_4xx(fuzzed, data):
    known = fuzzed.known
    method, template = data.draw(st.sampled_from(fuzzed.routes), label="route")
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + data.draw(path_values(known)) + path[end + 1:]
    query = data.draw(st.dictionaries(st.sampled_from(["window", "limit", "page", "x"]) | st.text(max_size=4),
                                      HOSTILE_TEXT, max_size=3))
    headers: dict[str, str | bytes] = {}
    who = data.draw(st.sampled_from(["mk", "mk", "sk", "sk", "none", "garbage", "bearer-garbage"]))
    if who == "mk":
        headers.update(auth(known.mk))
    elif who == "sk":
        headers.update(auth(known.sk))
    elif who == "garbage":
        headers["authorization"] = data.draw(HEADER_TEXT)
    elif who == "bearer-garbage":
        headers["authorization"] = b"Bearer " + data.draw(HEADER_TEXT)
    if data.draw(st.booleans()):
        headers[data.draw(st.sampled_from(["payment-signature", "x-payment"]))] = data.draw(payment_headers())
    if data.draw(st.booleans()):
        # Any bytes HTTP allows: a non-ASCII session cookie was a 500 (compare_digest on str).
        headers["cookie"] = data.draw(st.sampled_from([b"agw_dashboard=", b"x="])) + data.draw(HEADER_TEXT)
    if data.draw(st.booleans()):
        headers["origin"] = "http://gateway.test"  # past the dashboard's cross-site check, on to the form
    kind, body = "none", b""
    if method in ("POST", "PUT", "PATCH", "DELETE"):
        if template.startswith("/dashboard") and data.draw(st.booleans()):
            headers["content-type"] = "application/x-www-form-urlencoded"
            body = data.draw(FORM_BODIES)
        else:
            headers["content-type"] = data.draw(st.sampled_from(["application/json", "text/plain",
                                                                 "application/x-www-form-urlencoded"]))
            kind, body = data.draw(json_bodies(template, known.subscription_id))
    url = path + ("?" + urlencode(query, encoding="utf-8", errors="surrogatepass") if query else "")

    response = fuzzed.run(fuzzed.gateway.client.request(method, url, headers=headers, content=body))
    fuzzed.requests += 1
    status = response.status_code
    fuzzed.by_status[status] = fuzzed.by_status.get(status, 0) + 1
    if status >= 500 and status not in (502, 504):
        code = _error_code(response)
        assert status == 503 and code in ALLOWED_5XX_CODES, f"{status} {code} {method} {url} body={body[:300]!r}"
    if kind == "too_deep":
        # Never served: refused by routing or auth first, or else 400 json_too_deep.
        assert 300 <= status < 500 and (status != 400 or _error_code(response) in BEFORE_THE_BODY), \
            f"{status} {response.text[:200]} {method} {url}"
    db = fuzzed.gateway.services.db
    if 400 <= status < 500:
        assert fuzzed.run(_tables(db)) == fuzzed.baseline, f"{status} {method} {url} wrote to the database"
    else:
        fuzzed.run(fuzzed.gateway.services.usage.flush())
        fuzzed.baseline = fuzzed.run(_tables(db))


def _error_code(response) -> str | None:  # type: ignore[no-untyped-def]
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


# --- payment headers (the in-process app has payments off, so its parser is fuzzed directly) --

PAYMENT_FIELDS = ["x402Version", "accepted", "payload", "scheme", "network", "amount", "asset", "payTo",
                  "maxTimeoutSeconds", "extra", "signature", "authorization", "from", "to", "value",
                  "validAfter", "validBefore", "nonce", "resource"]
PAYMENT_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | HOSTILE_TEXT | st.sampled_from([2, 1, "exact", "eip155:31337", "base"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(PAYMENT_FIELDS), inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=1500, derandomize=True, deadline=None, database=None)
@given(st.one_of(PAYMENT_VALUES.map(lambda value: base64.b64encode(_dump(value))),
                 st.binary(max_size=80).map(base64.b64encode), payment_headers()),
       st.sampled_from([1, 2]))
def test_no_payment_header_breaks_the_parser(header, version):
    from agent_gateway.payments.wire import WireError, parse_payment

    try:
        parse_payment(header.decode("latin-1"), version, MAX_DEPTH)
    except WireError as refused:
        assert refused.code and refused.message
