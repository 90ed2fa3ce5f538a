"""The MCP server at /mcp: the official SDK's low-level server over Streamable HTTP, stateless with
JSON responses (any gateway process can answer any request), behind the web floor's body bounds.

Errors become tool errors (`isError`) whose structured content is the /api error envelope, or, for
an x402 challenge, the v2 PaymentRequired itself, as the x402 MCP transport says. A paid call that
carries `_meta["x402/payment"]` runs under the same attempt limits as a paid HTTP request."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import mcp
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from starlette.requests import Request
from starlette.responses import JSONResponse

from agent_gateway.web.bodies import BoundedBody, Receive, Scope, Send
from agent_gateway.web.rendering import error_body
from agent_gateway.web.throttle import client_address, payment_attempt
from agent_gateway.web.x402 import X402Challenge
from agent_gateway.errors import GatewayError, NotFound
from agent_gateway.mcp_face.schemas import tool_definitions
from agent_gateway.mcp_face.tools import FREE_TOOLS, PAID_TOOLS, Answer, parse_arguments
from agent_gateway.services import Services

log = logging.getLogger(__name__)

PAYMENT_META_KEY = "x402/payment"
PAYMENT_RESPONSE_META_KEY = "x402/payment-response"

# Tool arguments hold sk_ keys and payments; none may reach the gateway's logs. The SDK logs every
# received message at DEBUG and unknown tool names at WARNING (its loggers are capped at ERROR), and a
# malformed request, with its input, through the root logger (withheld by this filter).
_SDK_DIR = os.path.dirname(mcp.__file__) + os.sep


class _WithholdSdkDetails(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.pathname.startswith(_SDK_DIR):
            record.msg, record.args, record.exc_info = (
                "The MCP SDK refused a malformed request (details withheld: they may hold tool arguments).", (), None)
        return True


logging.getLogger("mcp").setLevel(logging.ERROR)
logging.getLogger().addFilter(_WithholdSdkDetails())

INSTRUCTIONS = (
    "agent_gateway sells seats on LLM inference pools. Call list_pools, then quote an order, then subscribe_pool "
    "(paid with x402 in USDC) to get an sk_ key for the OpenAI-compatible /v1 API; connection_snippets shows how "
    "to use it and key_status what it can do now."
)


class McpFace:
    """The /mcp ASGI app and the task group its SDK session manager needs (entered by the app's lifespan)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.server: Server[Any, Request] = Server("agent_gateway", instructions=INSTRUCTIONS)
        self._tools = tool_definitions()
        self._names = {tool.name for tool in self._tools}
        self.server.list_tools()(self._list_tools)
        self.server.call_tool(validate_input=False)(self._call_tool)
        self._manager: StreamableHTTPSessionManager | None = None
        settings = services.settings
        self.app = BoundedBody(self._handle, max_bytes=settings.max_body_bytes, max_depth=settings.max_json_depth)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        # A manager runs once; a new one per lifespan lets an app be started again (tests do).
        manager = StreamableHTTPSessionManager(self.server, json_response=True, stateless=True,
                                               max_request_body_size=self.services.settings.max_body_bytes)
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._manager is None:
            body = error_body("service_unavailable", "mcp_not_running", "The MCP server is not running.")
            await JSONResponse(body, status_code=503)(scope, receive, send)
            return
        await self._manager.handle_request(scope, receive, send)

    async def _list_tools(self) -> list[types.Tool]:
        return self._tools

    async def _call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        try:
            answer = await self._run(name, arguments)
        except X402Challenge as exc:
            required = {**exc.required, "error": exc.code}
            return _error_result(required, exc.message)
        except GatewayError as exc:
            return _error_result(error_body(exc.type, exc.code, exc.message), exc.message)
        except Exception:
            # Logged with the tool's name only (never its arguments); the caller gets no internals.
            log.exception("MCP tool %s failed", name if name in self._names else "(unknown)")
            message = "The gateway hit an internal error; it was logged."
            return _error_result(error_body("api_error", "internal_error", message), message)
        meta = {PAYMENT_RESPONSE_META_KEY: answer.payment_response} if answer.payment_response else None
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=json.dumps(answer.data))],
            structuredContent=answer.data, isError=False, _meta=meta)

    async def _run(self, name: str, arguments: dict[str, Any]) -> Answer:
        services = self.services
        if name in FREE_TOOLS:
            return await FREE_TOOLS[name](services, parse_arguments(name, arguments))
        if name not in PAID_TOOLS:
            raise NotFound(f"No tool named {name[:64]!r}. List the tools with tools/list.", code="unknown_tool")
        context = self.server.request_context
        payment = (context.meta.model_extra or {}).get(PAYMENT_META_KEY) if context.meta else None
        if payment is None:  # answered with the challenge: writes nothing, neither counted nor refused
            return await PAID_TOOLS[name](services, parse_arguments(name, arguments), None)
        request = context.request
        address = client_address(request.scope if request is not None else {})
        async with payment_attempt(services, address):
            return await PAID_TOOLS[name](services, parse_arguments(name, arguments), payment)


def _error_result(structured: dict[str, Any], message: str) -> types.CallToolResult:
    # The JSON in content[0] too, for clients that read only text (the x402 MCP transport asks for both).
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=json.dumps(structured)),
                 types.TextContent(type="text", text=message)],
        structuredContent=structured, isError=True)
