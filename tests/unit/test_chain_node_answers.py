"""Whatever a chain node answers, a chain call fails as `chain_unavailable`, never as an unexpected
exception (which a request would turn into a 500): here, bodies that are JSON but not a JSON-RPC
response object."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from agent_gateway.errors import ServiceUnavailable
from agent_gateway.payments.chain import ChainAdapter

pytestmark = pytest.mark.anyio


async def node_answering(body: bytes) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                json.loads(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.fixture(params=[b"null", b"[]", b'"0x10"', b"16", b"true"])
async def adapter(request: pytest.FixtureRequest) -> AsyncIterator[ChainAdapter]:
    server = await node_answering(request.param)
    port = server.sockets[0].getsockname()[1]
    chain = ChainAdapter(f"http://127.0.0.1:{port}", 1, "0x" + "11" * 20, None, request_timeout_s=5)
    try:
        yield chain
    finally:
        await chain.close()
        server.close()
        await server.wait_closed()


async def test_a_body_that_is_not_a_response_object_is_chain_unavailable(adapter: ChainAdapter) -> None:
    calls = (adapter.block_number, adapter.chain_now, lambda: adapter.receipt("0x" + "ab" * 32),
             lambda: adapter.transaction("0x" + "ab" * 32), lambda: adapter.balance_of("0x" + "22" * 20))
    for call in calls:
        with pytest.raises(ServiceUnavailable) as err:
            await call()
        assert err.value.code == "chain_unavailable"
