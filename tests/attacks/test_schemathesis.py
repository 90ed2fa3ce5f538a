"""Schemathesis against the gateway's own /openapi.json: requests generated from the document
(valid and invalid: schemathesis's positive and negative modes; bodies, parameters and headers, with a real mk_ and sk_ key as auth) never get
an undocumented 5xx, on SQLite and PostgreSQL. A real gateway process answers (uvicorn on a port),
in front of the fake upstream, so /v1 calls with the sk_ key reach an upstream that answers.

The only 5xx allowed is the documented 503 `payments_disabled` (payments are off here). Examples
are derandomized and bounded per operation; the numbers are printed at the end of each run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.fixtures.live import LiveGateway, live_gateway

EXAMPLES_PER_OPERATION = 60
ALLOWED_5XX_CODES = {"payments_disabled"}


@pytest.fixture
def target(tmp_path: Path, database_url: str, upstream) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    with live_gateway(tmp_path, database_url, upstream) as live:
        yield live


def error_code(response: requests.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def test_requests_generated_from_the_openapi_document_never_get_a_5xx(target: LiveGateway):
    mk = target.new_account()
    sk, _ = target.new_key(mk)
    tokens = {"managementKey": mk, "apiKey": sk}
    document = httpx.get(target.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=target.url)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    session = requests.Session()

    for result in schema.get_all_operations():
        operation = result.ok()
        security = operation.definition.raw.get("security", [])
        token = next((tokens[name] for requirement in security for name in requirement if name in tokens), None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}

        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(session=session, headers={**(case.headers or {}), **headers}, timeout=30)
            statuses[response.status_code] += 1
            if response.status_code >= 500 and error_code(response) not in ALLOWED_5XX_CODES:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")

        call()

    calls = sum(statuses.values())
    fives = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nschemathesis: {calls} calls, {fives} 5xx ({len(failures)} undocumented), statuses {dict(statuses)}")
    assert calls >= 100
    assert not failures, "\n".join(failures[:20])
