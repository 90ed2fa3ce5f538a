"""A real x402 facilitator for tests and benchmarks: the x402 SDK's own facilitator (its sync
`x402FacilitatorSync`, the exact EVM scheme and the web3 signer `FacilitatorWeb3Signer`) served over
HTTP (`POST /verify`, `POST /settle`, `GET /supported`) from a thread, on a local chain.

The SDK (the `x402` package) is a test/demo extra, imported when a facilitator is built. Each call
is recorded (`calls`), and `fault` makes the facilitator misbehave the way a remote one can."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from agent_gateway.testing.server import ServerThread

# What `fault` can make the facilitator do:
#   down                 every call answers 503
#   nonsense             every call answers 200 with a body that is not the API's JSON
#   lose_settle_answer   /settle settles for real, then answers 502 (the answer is lost)
#   say_used             /settle settles for real, then answers "nonce already used", no hash
#   wrong_hash           /settle settles for real, then answers success naming a made-up hash
#   refuse_settle        /settle sends nothing and answers failure, no hash
FAULTS = ("down", "nonsense", "lose_settle_answer", "say_used", "wrong_hash", "refuse_settle")


class TestFacilitator:
    """`networks`: the CAIP-2 networks it settles `exact` on (v2). `auth_header`: (name, value)
    every request must carry, else 401. `before_settle` runs in the worker thread before the SDK
    settles a request body (an attacker's move, a pause)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, rpc_url: str, private_key: str, networks: list[str], *,
                 auth_header: tuple[str, str] | None = None, confirmation_timeout_s: float = 120) -> None:
        from x402 import x402FacilitatorSync
        from x402.mechanisms.evm import FacilitatorWeb3Signer
        from x402.mechanisms.evm.exact import register_exact_evm_facilitator

        self.signer = FacilitatorWeb3Signer(private_key=private_key, rpc_url=rpc_url,
                                            confirmation_timeout_seconds=confirmation_timeout_s)
        self.facilitator = register_exact_evm_facilitator(x402FacilitatorSync(), self.signer, networks=networks)
        self.auth_header = auth_header
        self.fault: str | None = None
        self.fault_paths: tuple[str, ...] = ("/supported", "/verify", "/settle")  # where `fault` applies
        self.before_settle: Callable[[dict[str, Any]], None] | None = None
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._server: ServerThread | None = None

    @property
    def address(self) -> str:
        return str(self.signer.address)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the facilitator is not running")
        return self._server.url

    def count(self, path: str) -> int:
        with self._lock:
            return self.calls.count(path)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/supported", self._supported, methods=["GET"]),
            Route("/verify", self._verify, methods=["POST"]),
            Route("/settle", self._settle, methods=["POST"]),
        ])

    def start(self) -> TestFacilitator:
        self._server = ServerThread(self.app()).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> TestFacilitator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the API ------------------------------------------------------------------------------

    def _refusal(self, request: Request) -> Response | None:
        with self._lock:
            self.calls.append(request.url.path)
        if self.auth_header is not None and request.headers.get(self.auth_header[0]) != self.auth_header[1]:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if request.url.path not in self.fault_paths:
            return None
        if self.fault == "down":
            return PlainTextResponse("facilitator down", status_code=503)
        if self.fault == "nonsense":
            return PlainTextResponse("<html>hello</html>", status_code=200)
        return None

    async def _supported(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        supported = self.facilitator.get_supported()
        return JSONResponse(supported.model_dump(by_alias=True, exclude_none=True))

    async def _verify(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        payload, requirements = await self._body(request)
        # The SDK's scheme blocks on web3 calls: a worker thread keeps this server answering.
        result = await anyio.to_thread.run_sync(self.facilitator.verify, payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    async def _settle(self, request: Request) -> Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = json.loads(await request.body())
        payload, requirements = await self._body(request)
        fault = self.fault if "/settle" in self.fault_paths else None
        if fault == "refuse_settle":
            return JSONResponse({"success": False, "errorReason": "unexpected_settle_error", "transaction": "",
                                 "network": requirements.network})

        def settle() -> Any:
            if self.before_settle is not None:
                self.before_settle(body)
            return self.facilitator.settle(payload, requirements)

        result = await anyio.to_thread.run_sync(settle)
        if fault == "lose_settle_answer":
            return PlainTextResponse("bad gateway", status_code=502)
        if fault == "say_used":
            return JSONResponse({"success": False, "errorReason": "invalid_exact_evm_nonce_already_used",
                                 "transaction": "", "network": result.network, "payer": result.payer})
        if fault == "wrong_hash":
            return JSONResponse({"success": True, "transaction": "0x" + "5a" * 32, "network": result.network,
                                 "payer": result.payer})
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    @staticmethod
    async def _body(request: Request) -> tuple[Any, Any]:
        from x402.schemas import PaymentPayload, PaymentRequirements

        body = json.loads(await request.body())
        return (PaymentPayload.model_validate(body["paymentPayload"]),
                PaymentRequirements.model_validate(body["paymentRequirements"]))
