"""Slow clients against a real `agent-gateway serve` process: trickled or missing headers, trickled
bodies and a flood of connections cannot hold the gateway. Only sockets and HTTP are used here, so
these hold whatever ASGI server runs underneath."""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from agent_gateway.testing.processes import start_gateway
from tests.conftest import write_pools_file

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
# How long past a deadline a close may take on a loaded machine before the test calls it a hang.
GRACE_S = 5.0


@contextmanager
def running_gateway(tmp_path: Path, sqlite_url: str, **env: str) -> Iterator[str]:
    settings = {"AGW_DATABASE_URL": sqlite_url, "AGW_POOLS_FILE": str(write_pools_file(tmp_path)),
                "AGW_AUTO_MIGRATE": "false", "AGW_LOG_LEVEL": "WARNING", **env}
    process, url = start_gateway(settings, log=tmp_path / "gateway.log")
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def gateway_url(tmp_path: Path, sqlite_url: str) -> Iterator[str]:
    with running_gateway(tmp_path, sqlite_url, AGW_HEADER_READ_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                         AGW_BODY_READ_TIMEOUT_S=str(BODY_TIMEOUT_S)) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    return socket.create_connection((host, port), timeout=10)


def trickle_until_closed(sock: socket.socket, chunks: Iterator[bytes], deadline_s: float) -> bytes:
    """Send one chunk at a time (a fifth of a second apart) until the server closes the
    connection; return everything it sent. Fails if it is still open after `deadline_s`."""
    received = b""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not data:
                return received
            received += data
            continue
        try:
            sock.sendall(next(chunks))
        except (BrokenPipeError, ConnectionResetError):
            return received
    pytest.fail(f"the connection was still open after {deadline_s:g} s; received {received!r}")


def endless(byte: bytes) -> Iterator[bytes]:
    while True:
        yield byte


def test_a_client_trickling_its_headers_is_cut_off(gateway_url):
    with connect(gateway_url) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        received = trickle_until_closed(sock, endless(b"a"), HEADER_TIMEOUT_S + GRACE_S)
        assert received == b""  # closed without an answer: the request was never complete
        assert time.monotonic() - started < HEADER_TIMEOUT_S + GRACE_S


def test_a_second_request_trickling_its_headers_on_a_kept_alive_connection_is_cut_off(gateway_url):
    with connect(gateway_url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(65536)
        assert response.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        started = time.monotonic()
        trickle_until_closed(sock, endless(b"a"), HEADER_TIMEOUT_S + GRACE_S)
        assert time.monotonic() - started < HEADER_TIMEOUT_S + GRACE_S


def test_a_connection_that_sends_nothing_is_closed(gateway_url):
    with connect(gateway_url) as sock:
        sock.settimeout(HEADER_TIMEOUT_S + GRACE_S)
        try:
            assert sock.recv(1) == b""
        except TimeoutError:
            pytest.fail("a silent connection was still open after the header timeout")
        except ConnectionResetError:
            pass


def test_a_trickled_body_gets_408_and_the_connection_closes(gateway_url):
    body = json.dumps({"address": "0x" + "ab" * 20}).encode()
    with connect(gateway_url) as sock:
        sock.sendall(b"POST /api/agent/auth/challenge HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        received = trickle_until_closed(sock, (bytes([b]) for b in body[:-1]), BODY_TIMEOUT_S + GRACE_S)
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error"]["code"] == "body_timeout"


def test_a_body_trickled_to_a_route_that_answers_without_reading_it_ends_with_the_answer(gateway_url):
    with connect(gateway_url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nContent-Length: 100000\r\n\r\n")
        received = trickle_until_closed(sock, endless(b"a"), HEADER_TIMEOUT_S + GRACE_S)
    assert received.startswith(b"HTTP/1.1 200"), received


def test_a_keep_alive_client_is_unaffected_by_the_deadlines(gateway_url):
    url = httpx.URL(gateway_url)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=10)
    try:
        statuses, sockets = [], set()
        for i in range(60):
            if i == 30:
                # Idle between two requests for longer than the header deadline: that is keep-alive,
                # not a slow request, and must not cost the connection.
                time.sleep(HEADER_TIMEOUT_S * 1.5)
            path = "/healthz" if i % 2 else "/api/pools"
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            sockets.add(id(conn.sock))
        body = json.dumps({"address": "0x" + "cd" * 20})
        conn.request("POST", "/api/agent/auth/challenge", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
        sockets.add(id(conn.sock))
    finally:
        conn.close()
    assert statuses == [200] * 60 + [201]
    assert len(sockets) == 1  # one connection carried every request


def test_past_the_connection_bound_new_connections_get_no_503_and_are_served_once_others_close(tmp_path, sqlite_url):
    bound = 16
    with running_gateway(tmp_path, sqlite_url, AGW_MAX_CONNECTIONS=str(bound)) as url:
        host, port = httpx.URL(url).host, httpx.URL(url).port
        held = []
        try:
            for _ in range(bound):
                conn = http.client.HTTPConnection(host, port, timeout=10)
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                assert response.status == 200
                held.append(conn)
            # One past the bound: closed unanswered (a client may retry it), never a 503.
            with connect(url) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                received = trickle_until_closed(sock, endless(b""), GRACE_S)
            assert received == b"", received
            # Room again once some close: a new connection is served.
            for conn in held[:4]:
                conn.close()
            deadline = time.monotonic() + GRACE_S
            while True:
                try:
                    status = httpx.get(url + "/healthz", timeout=5).status_code
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
            assert status == 200
        finally:
            for conn in held:
                conn.close()


def test_a_request_refused_before_its_large_body_is_read_gets_its_answer_not_a_reset(gateway_url):
    """The gateway refuses an unknown key from the headers alone, while the body is still on its
    way. It ends that connection, but gently: the client, which sends its whole body before
    reading (as HTTP clients do), must read the 401 every time, never a reset or a broken pipe
    (what closing a socket with unread bytes in it gives)."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 4_000_000 + b'"}]}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer sk_not_a_real_key\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    for _ in range(10):
        with connect(gateway_url) as sock:
            sock.sendall(head + body)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 401"), received[:200]
        assert b'"invalid_api_key"' in received or b"api_key" in received, received[:400]
