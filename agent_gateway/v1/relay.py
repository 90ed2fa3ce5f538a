"""The relay: an ASGI response that owns the key's lease for the whole upstream exchange.

The lease is released in one shielded `finally` around the entire send cycle, never in a body
generator (which never runs if the client left before the first chunk). Two helpers run beside
the pump: a watcher that notices the client leaving (and renews a Redis lease meanwhile), and the
stream registry's callback that ends the exchange when the key is revoked in any process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from agent_gateway.catalog.pools import Pool
from agent_gateway.errors import (
    GatewayError,
    PermissionDenied,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from agent_gateway.metrics import PROXY_IN_FLIGHT, PROXY_OVERHEAD, STREAMS_REVOKED, proxy_requests
from agent_gateway.messages.wire import TranslatedStream, Translation
from agent_gateway.proxy.directory import KeyRecord
from agent_gateway.proxy.leases import Lease, Leases
from agent_gateway.proxy.metering import DIALECTS, StreamMeter, find_usage
from agent_gateway.proxy.streams import Registration
from agent_gateway.proxy.upstream import UpstreamClient, UpstreamResponse
from agent_gateway.usage.recorder import UsageEvent, UsageRecorder
from agent_gateway.web.rendering import anthropic_error_of, render_error

log = logging.getLogger(__name__)

# How long an error may wait for a client that does not read before we give up telling it.
_ERROR_SEND_TIMEOUT_S = 2.0
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


@dataclass
class ProxyCall:
    """An admitted request: who, where to, what to send; built by the routes after every check."""

    key: KeyRecord
    lease: Lease
    pool: Pool
    path: str
    endpoint: str
    model: str
    body: bytes
    headers: Mapping[str, str]  # the client's (case-insensitive); upstream.py picks what to forward
    stream: bool
    strip_usage: bool
    request_id: str
    started: float  # perf_counter when the request arrived
    created_at: datetime  # from the clock
    registration: Registration  # in the stream registry since before the lease was taken
    unregister: Callable[[], None]
    api: str = "openai"  # the client's API: "anthropic" for the Messages routes (errors, stream end)
    # Set when a Messages request goes to a chat-completions upstream: the body is translated back.
    translation: Translation | None = None

    @property
    def upstream_api(self) -> str:
        return "openai" if self.translation is not None else self.api


@dataclass
class _Exchange:
    """What happened, filled in by the pump and read once in the finally."""

    status: int = 0
    headers_sent: bool = False
    finished: bool = False
    end_reason: str | None = None  # client_disconnected | revoked:<why>
    usage: tuple[int, int] | None = None
    events: int = 0
    upstream_started: float = 0.0
    upstream_done: float = 0.0
    upstream: UpstreamResponse | None = None
    upstream_closed: bool = False
    released: bool = False
    outcome: str = "ok"


@dataclass
class RelayDeps:
    upstream: UpstreamClient
    leases: Leases
    usage: UsageRecorder


class RelayResponse(Response):
    """A Response that writes itself: like Starlette's StreamingResponse, whose `__call__` runs
    `listen_for_disconnect` beside the body, it runs the watcher beside the pump."""

    def __init__(self, call: ProxyCall, deps: RelayDeps) -> None:
        # Status and headers come from the upstream (or the error) when the exchange runs.
        self.status_code = 200
        self.background = None
        self.raw_headers = []
        self.call = call
        self.deps = deps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, exchange = self.call, _Exchange()
        PROXY_IN_FLIGHT.inc()
        if call.registration.reason is not None:
            # Revoked between admission and now: refuse without calling the upstream.
            try:
                await self._fail(send, exchange, _revoked_error(call.registration.reason))
            finally:
                call.unregister()
                await self._settle_shielded(exchange)
            return
        pump = asyncio.create_task(self._pump(send, exchange))
        call.registration.bind(lambda reason: _stop(pump, exchange, f"revoked:{reason}"))
        watcher = asyncio.create_task(self._watch(receive, pump, exchange))
        try:
            await asyncio.shield(pump)
        except asyncio.CancelledError:
            # The server itself is cancelling us (shutdown): end the exchange, then clean up.
            _stop(pump, exchange, "server_shutdown")
            await asyncio.gather(pump, return_exceptions=True)
            raise
        finally:
            watcher.cancel()
            call.unregister()
            await self._settle_shielded(exchange)

    async def _watch(self, receive: Receive, pump: asyncio.Task[None], exchange: _Exchange) -> None:
        interval = self.deps.leases.renew_interval_s
        # Renewals run from a timer beside the wait for a disconnect (a wait_for around each
        # receive cost a task and a timer per request, though most end long before a renewal).
        renewals = None if interval is None else _Renewals(self, pump, exchange, interval)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    _stop(pump, exchange, "client_disconnected")
                    return
        finally:
            if renewals is not None:
                renewals.stop()

    async def _renew(self, pump: asyncio.Task[None], exchange: _Exchange) -> bool:
        """Renew the lease once; False when the watch is over (released, or lost and stopped)."""
        if exchange.released:
            return False  # the upstream is done and the slot already given back
        try:
            held = await self.deps.leases.renew(self.call.lease)
        except GatewayError:
            # A blip in the lease store: the TTL leaves room for the next attempt.
            log.warning("lease renewal failed key=%s; retrying", self.call.key.key_id)
            return True
        if exchange.released:
            # The pump released the slot while this renewal was on its way, so the lease is
            # gone by our own hand: the response goes on to its end.
            return False
        if not held:
            # Someone else may hold the slot now; going on would make two in flight.
            log.warning("lease lost while relaying key=%s; ending the request", self.call.key.key_id)
            _stop(pump, exchange, "lease_lost")
            return False
        return True

    async def _pump(self, send: Send, exchange: _Exchange) -> None:
        call, upstream_client = self.call, self.deps.upstream
        try:
            async with asyncio.timeout(upstream_client.timeouts.total_s):
                exchange.upstream_started = time.perf_counter()
                response = await upstream_client.send(
                    call.pool, call.path, call.body, call.headers,
                    {"x-agent-gateway-key-id": call.key.key_id, "x-request-id": call.request_id},
                    api=call.upstream_api,
                )
                exchange.upstream = response
                if call.stream and response.status == 200 and response.content_type.startswith("text/event-stream"):
                    await self._relay_stream(send, response, exchange)
                else:
                    await self._relay_whole(send, response, exchange)
                exchange.finished = True
        except TimeoutError:
            await self._fail(send, exchange, UpstreamTimeout(
                f"The upstream did not finish within {upstream_client.timeouts.total_s:g} s.", code="upstream_timeout"))
        except GatewayError as exc:
            await self._fail(send, exchange, exc)
        except asyncio.CancelledError:
            reason = exchange.end_reason or ""
            if reason.startswith("revoked:"):
                STREAMS_REVOKED.inc()
                await self._fail(send, exchange, _revoked_error(reason.split(":", 1)[1]))
            elif reason == "lease_lost":
                await self._fail(send, exchange, ServiceUnavailable(
                    "The gateway lost this key's concurrency slot; retry the request.", code="lease_lost"))
            # A client that left gets nothing; a shutdown ends the body as it is.
        finally:
            if not exchange.finished:
                _close_upstream(exchange)

    async def _relay_whole(self, send: Send, response: UpstreamResponse, exchange: _Exchange) -> None:
        body = await response.read()
        response.release()
        if response.status >= 500 or response.status == 429:
            log.warning("upstream answered %d for key=%s request=%s: %.200r",
                        response.status, self.call.key.key_id, self.call.request_id, body)
            raise UpstreamError(f"The upstream answered HTTP {response.status}.", code="upstream_error")
        exchange.status = response.status
        content_type, translation = response.content_type, self.call.translation
        if response.status < 400:
            exchange.usage = find_usage(body, DIALECTS[self.call.upstream_api])
            if translation is not None:
                body, content_type = translation.whole(body), "application/json"
        else:
            exchange.outcome = "upstream_refused"
            if translation is not None:
                body, content_type = _anthropic_refusal(response.status, body), "application/json"
        exchange.upstream_done = time.perf_counter()
        # Free the slot before the client can see the end of the response: a client that sends its
        # next request the moment this one completes must be admitted.
        await self._release(exchange)
        await send({"type": "http.response.start", "status": response.status, "headers": [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", self.call.request_id.encode()),
        ]})
        exchange.headers_sent = True
        await send({"type": "http.response.body", "body": body})

    async def _relay_stream(self, send: Send, response: UpstreamResponse, exchange: _Exchange) -> None:
        translation = self.call.translation
        meter: StreamMeter | TranslatedStream = (
            translation.stream() if translation is not None
            else StreamMeter(self.call.strip_usage, DIALECTS[self.call.api]))
        exchange.status = 200
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_SSE_HEADERS, (b"x-request-id", self.call.request_id.encode())]})
        exchange.headers_sent = True
        # One send per upstream read: a read carries whatever has arrived, often many events,
        # and the meter passes on every whole event in it.
        read, feed, last = response.read_some, meter.feed, b""
        try:
            while chunk := await read():
                out = feed(chunk)
                if not out:
                    continue
                if meter.done:
                    # The upstream has finished generating; free the slot before the client
                    # reads the end of the stream (see _relay_whole).
                    await self._release(exchange)
                    if response.at_eof():
                        last = out  # the upstream's body is complete: sent with the end of ours
                        break
                await send({"type": "http.response.body", "body": out, "more_body": True})
            exchange.upstream_done = time.perf_counter()
            tail = meter.finish()
            await self._release(exchange)
            await send({"type": "http.response.body", "body": last + tail if tail else last, "more_body": False})
        finally:
            exchange.usage, exchange.events = meter.usage, meter.events

    async def _fail(self, send: Send, exchange: _Exchange, exc: GatewayError) -> None:
        """Tell the client what went wrong: a JSON error before the headers, one SSE event after.

        The upstream is stopped and the slot freed first: a client that does not read (its
        socket is full) must not keep the upstream generating, or the key locked, while we
        wait to hand it the error — and that wait is bounded."""
        exchange.outcome = exc.code
        _close_upstream(exchange)
        await self._release(exchange)
        # The shared renderer: the same envelope, headers and extra fields as every other error.
        rendered = render_error(exc, envelope=self.call.api)
        try:
            async with asyncio.timeout(_ERROR_SEND_TIMEOUT_S):
                if not exchange.headers_sent:
                    exchange.status = rendered.status_code
                    await send({"type": "http.response.start", "status": exchange.status,
                                "headers": [*rendered.raw_headers, (b"x-request-id", self.call.request_id.encode())]})
                    exchange.headers_sent = True
                    await send({"type": "http.response.body", "body": rendered.body})
                else:
                    # Anthropic clients read a named `error` event; OpenAI clients a bare data line.
                    name = b"event: error\n" if self.call.api == "anthropic" else b""
                    event = name + b"data: " + bytes(rendered.body) + b"\n\n"
                    await send({"type": "http.response.body", "body": event, "more_body": False})
        except Exception:  # the client may be gone or not reading; nothing left to tell it
            log.debug("could not deliver the error to the client", exc_info=True)

    async def _release(self, exchange: _Exchange) -> None:
        if exchange.released:
            return
        exchange.released = True
        leases = self.deps.leases
        try:
            if leases.in_process:
                # Completes without suspending, so no cancellation can come between: no shield
                # (which costs a task per request).
                await leases.release(self.call.lease)
            else:
                await asyncio.shield(leases.release(self.call.lease))
        except Exception:
            log.exception("lease release failed key=%s; it expires on its own", self.call.key.key_id)

    async def _settle_shielded(self, exchange: _Exchange) -> None:
        """Run `_settle` shielded from cancellation; once the slot is freed (every answer that
        reached its end) nothing in it waits, so it runs in place instead of in a task of its own."""
        if exchange.released:
            self._record(exchange)
        else:
            await asyncio.shield(self._settle(exchange))

    async def _settle(self, exchange: _Exchange) -> None:
        """Release the lease once and record what happened; runs shielded from cancellation."""
        await self._release(exchange)
        self._record(exchange)

    def _record(self, exchange: _Exchange) -> None:
        call = self.call
        PROXY_IN_FLIGHT.dec()
        outcome = exchange.end_reason.split(":")[0] if exchange.end_reason else exchange.outcome
        proxy_requests(call.endpoint, outcome).inc()
        done = time.perf_counter()
        if exchange.upstream_started:
            tail = done - exchange.upstream_done if exchange.upstream_done else 0.0
            PROXY_OVERHEAD.observe((exchange.upstream_started - call.started) + tail)
        if exchange.usage is not None:
            prompt, completion, source = *exchange.usage, "upstream"
        else:
            # No usage from upstream (cut off, client gone, or a server that does not send it):
            # estimate from the bytes, and say so.
            prompt, completion, source = len(call.body) // 4, max(0, exchange.events - 1), "estimated"
        self.deps.usage.record(UsageEvent(
            api_key_id=call.key.key_id, account_id=call.key.account_id,
            subscription_id=call.key.subscription_id, endpoint=call.endpoint, model=call.model,
            status_code=exchange.status or 499, prompt_tokens=prompt, completion_tokens=completion,
            latency_ms=(done - call.started) * 1000, usage_source=source, created_at=call.created_at,
        ))
        if outcome != "ok":
            log.info("request %s key=%s endpoint=%s ended: %s", call.request_id, call.key.key_id,
                     call.endpoint, outcome)


class _Renewals:
    """Renews a running request's lease every `interval` seconds until stopped: one timer at a
    time, and a task only while a renewal is on its way."""

    def __init__(self, relay: RelayResponse, pump: asyncio.Task[None], exchange: _Exchange, interval: float) -> None:
        self._relay, self._pump, self._exchange, self._interval = relay, pump, exchange, interval
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(interval, self._due)
        self._running: asyncio.Task[None] | None = None

    def _due(self) -> None:
        self._timer = None
        self._running = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        if await self._relay._renew(self._pump, self._exchange) and self._running is not None:
            self._timer = self._loop.call_later(self._interval, self._due)
        self._running = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        running, self._running = self._running, None
        if running is not None:
            running.cancel()


def _revoked_error(reason: str) -> PermissionDenied:
    if reason == "subscription_expired":
        return PermissionDenied("This key's subscription ended while the request was running.",
                                code="subscription_expired")
    return PermissionDenied(f"This API key was {reason} while the request was running.", code="key_revoked")


def _anthropic_refusal(status: int, body: bytes) -> bytes:
    """An OpenAI-shaped refusal from a chat-completions upstream, told in Anthropic's shape."""
    message = f"The upstream refused the request (HTTP {status})."
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
            message = error["message"]
    except (ValueError, AttributeError):
        pass
    return json.dumps(anthropic_error_of(status, message)).encode()


def _close_upstream(exchange: _Exchange) -> None:
    """Stop the upstream request (once): closing its connection cancels the generation."""
    if exchange.upstream is not None and not exchange.upstream_closed:
        exchange.upstream_closed = True
        exchange.upstream.close()


def _stop(pump: asyncio.Task[None], exchange: _Exchange, reason: str) -> None:
    if not pump.done() and exchange.end_reason is None:
        exchange.end_reason = reason
        pump.cancel()
