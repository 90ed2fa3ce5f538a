"""The x402 `bazaar` extension the challenge builder writes is what the x402 SDK declares and
accepts, for HTTP routes (v2 extension and v1 outputSchema) and for MCP tools."""

from __future__ import annotations

from x402.extensions.bazaar import (
    DeclareMcpDiscoveryConfig,
    declare_discovery_extension,
    declare_mcp_discovery_extension,
    extract_discovery_info,
    validate_discovery_extension,
    validate_discovery_extension_spec,
)
from x402.extensions.bazaar.types import parse_discovery_extension
from x402.extensions.bazaar.v1 import extract_discovery_info_v1

from agent_gateway.api.agents import SubscribePoolBody
from agent_gateway.payments.wire import Offer, payment_required, payment_required_v1
from agent_gateway.web.x402 import HttpCall, McpToolCall, body_schema

ORDER = {"pool": "alpha", "blocks": ["day"], "quantity": 1, "billingCycle": "month"}
URL = "https://gateway.example.com/api/agent/subscribe-pool"
OFFER = Offer(scheme="exact", network="eip155:8453", amount_atomic=10_000_000,
              asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", pay_to="0x" + "ab" * 20, max_timeout_s=300,
              token_name="USD Coin", token_version="2", resource_url=URL, description="1 seat(s) on alpha")


def assert_sdk_accepts(extension: dict) -> None:
    assert validate_discovery_extension_spec(extension).valid, validate_discovery_extension_spec(extension).errors
    result = validate_discovery_extension(parse_discovery_extension(extension))
    assert result.valid, result.errors


def test_an_http_call_is_declared_as_the_sdk_declares_it_with_the_method_filled_in():
    ours = HttpCall(SubscribePoolBody, ORDER).bazaar()
    sdk = declare_discovery_extension(input=ORDER, input_schema=body_schema(SubscribePoolBody), body_type="json")
    sdk["bazaar"]["info"]["input"]["method"] = "POST"  # what the SDK's server extension adds per request
    assert ours == sdk["bazaar"]
    assert_sdk_accepts(ours)


def test_an_example_that_breaks_the_route_schema_is_caught_by_the_sdk():
    bad = HttpCall(SubscribePoolBody, {**ORDER, "quantity": 0, "colour": "red"}).bazaar()
    assert not validate_discovery_extension(parse_discovery_extension(bad)).valid


def test_the_v2_challenge_is_catalogued_and_the_v1_offer_carries_the_same_call():
    call = HttpCall(SubscribePoolBody, ORDER)
    required = payment_required([OFFER], extensions={"bazaar": call.bazaar()})
    payload = {"x402Version": 2, "resource": required["resource"], "accepted": required["accepts"][0],
               "payload": {}, "extensions": required["extensions"]}
    found = extract_discovery_info(payload, required["accepts"][0])
    assert found is not None and found.method == "POST" and found.resource_url == URL
    assert found.discovery_info.input.body == ORDER

    v1 = payment_required_v1([OFFER], output_schema=call.v1_output_schema())
    assert v1 is not None
    info = extract_discovery_info_v1(v1["accepts"][0])
    assert info is not None and info.input.method == "POST" and info.input.body == ORDER


def test_an_mcp_tool_call_is_declared_as_the_sdk_declares_it():
    schema = body_schema(SubscribePoolBody)
    ours = McpToolCall("buy_seat", schema, ORDER, description="Buy seats").bazaar()
    sdk = declare_mcp_discovery_extension(DeclareMcpDiscoveryConfig(
        tool_name="buy_seat", input_schema=schema, example=ORDER, description="Buy seats",
        transport="streamable-http"))
    assert ours == sdk["bazaar"]
    assert_sdk_accepts(ours)
