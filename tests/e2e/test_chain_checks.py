"""The start-up chain checks on real anvil: the dev chain passes them; a token, chain id, payTo or
relayer that does not match the settings stops `serve` and fails `agent-gateway chain check`, with
the field, the expected value and the value found."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from prometheus_client import REGISTRY

from agent_gateway.lifespan import build_services, run_services
from agent_gateway.networks import NETWORK_PRESETS
from agent_gateway.payments.chain import ChainAdapter
from agent_gateway.payments.checks import (
    ChainMisconfigured,
    CheckStatus,
    RelayerGasWatch,
    run_chain_checks,
)
from agent_gateway.settings import ChainSettings, Settings
from agent_gateway.testing.devchain import DevChain, deploy_test_token
from agent_gateway.testing.facilitator import TestFacilitator
from agent_gateway.testing.processes import free_port
from tests.fixtures.facilitator import AUTH_HEADER

pytestmark = pytest.mark.anyio


def chain_env(devchain: DevChain, **extra: str) -> dict[str, str]:
    """The anvil preset plus what no preset can know: the node's port, payTo and the relayer key."""
    return {"AGW_NETWORK": "anvil", "AGW_CHAIN_RPC_URL": devchain.rpc_url, "AGW_PAY_TO": devchain.pay_to,
            "AGW_RELAYER_KEY": devchain.relayer_key, **extra}


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGW_")}
    return subprocess.run([sys.executable, "-m", "agent_gateway", *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **env})


def terms(devchain: DevChain, **changes: object) -> ChainSettings:
    values: dict[str, object] = dict(rpc_url=devchain.rpc_url, chain_id=devchain.chain_id, usdc_address=devchain.token,
                                     usdc_name="USD Coin", usdc_version="2", pay_to=devchain.pay_to,
                                     relayer_key=devchain.relayer_key)
    return ChainSettings(**{**values, **changes})  # type: ignore[arg-type]


@pytest.fixture
async def adapter(devchain: DevChain) -> AsyncIterator[ChainAdapter]:
    chain = ChainAdapter(devchain.rpc_url, devchain.chain_id, devchain.token, devchain.relayer_key)
    try:
        yield chain
    finally:
        await chain.close()


@pytest.fixture(scope="module")
def wrong_coin(devchain: DevChain) -> str:
    """A TestUSDC named "Wrong Coin" (version "2") on the dev chain."""
    return deploy_test_token(devchain.rpc_url, devchain.deployer_key, name="Wrong Coin", version="2")


def test_the_anvil_preset_names_the_token_the_dev_chain_deploys(devchain):
    preset = NETWORK_PRESETS["anvil"]
    assert (devchain.token, devchain.chain_id) == (preset.usdc_address, preset.chain_id)
    assert (devchain.token_name, devchain.token_version) == (preset.usdc_name, preset.usdc_version)


def test_chain_check_passes_on_the_dev_chain_with_the_anvil_preset(devchain):
    result = cli(chain_env(devchain), "chain", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = [line for line in lines if line.startswith(("ok ", "warn", "FAIL"))]
    assert [line.split(":")[0] for line in checks] == [
        "ok    payTo", "ok    chain id", "ok    token name", "ok    token version", "ok    token domain",
        "ok    token decimals", "ok    relayer gas"]
    assert "ok    token name: 'USD Coin'" in lines and "ok    chain id: 31337" in lines
    assert lines[-1] == "chain check passed (7 checks, 0 warnings)"
    # The node's URL is shown without its path (a hosted RPC URL carries an API key there).
    assert f"RPC {devchain.rpc_url}, confirmations 1" in lines[0]


def test_chain_check_names_a_token_whose_name_differs_from_the_settings(devchain, wrong_coin):
    result = cli(chain_env(devchain, AGW_USDC_ADDRESS=wrong_coin), "chain", "check")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "FAIL  token name: expected 'USD Coin' (AGW_USDC_NAME), found 'Wrong Coin'" in lines
    assert any(line.startswith("FAIL  token domain: DOMAIN_SEPARATOR() is 0x") for line in lines)
    assert "ok    token version: '2'" in lines and "ok    chain id: 31337" in lines
    assert lines[-1] == "chain check FAILED: 2 of 7 checks; serve would refuse to start"
    # The explicit address differs from the preset's: said before the checks.
    assert f"note  AGW_NETWORK=anvil: AGW_USDC_ADDRESS='{wrong_coin}' overrides the preset's " \
           f"'{NETWORK_PRESETS['anvil'].usdc_address}'" in lines


def test_chain_check_with_payments_off_says_what_to_set():
    result = cli({}, "chain", "check")
    assert result.returncode == 2 and "payments are off: set AGW_NETWORK" in result.stderr


def test_serve_refuses_to_start_on_a_token_whose_name_differs(devchain, wrong_coin, tmp_path):
    env = chain_env(devchain, AGW_USDC_ADDRESS=wrong_coin, AGW_PORT=str(free_port()),
                    AGW_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}")
    result = cli(env, "serve", timeout=60)
    assert result.returncode != 0
    assert "chain check FAIL  token name: expected 'USD Coin' (AGW_USDC_NAME), found 'Wrong Coin'" in result.stderr
    assert "Application startup failed" in result.stderr
    assert not (tmp_path / "serve.db").exists()  # checked before anything else: not even a migration


async def test_the_start_stops_before_the_database_is_touched(devchain, wrong_coin, tmp_path):
    database = tmp_path / "gw.db"
    settings = Settings(_env_file=None, database_url=f"sqlite:///{database}",
                        **{k.removeprefix("AGW_").lower(): v for k, v in chain_env(devchain).items()},
                        usdc_address=wrong_coin)
    services = build_services(settings)
    with pytest.raises(ChainMisconfigured) as refused:
        async with run_services(services):
            pytest.fail("the gateway started on a misconfigured token")
    await services.payments.chain.close()
    assert "token name: expected 'USD Coin' (AGW_USDC_NAME), found 'Wrong Coin'" in str(refused.value)
    assert not database.exists()


async def test_a_wrong_chain_id_is_named_and_the_token_is_not_judged_on_the_wrong_chain(devchain, adapter):
    report = await run_chain_checks(terms(devchain, chain_id=84532), adapter)
    assert [c.line() for c in report.failed] == [
        "FAIL  chain id: expected 84532 (AGW_CHAIN_ID or AGW_NETWORK), found 31337"]
    assert not any(c.name.startswith("token") for c in report.checks)


async def test_a_token_with_another_version_fails_version_and_domain(devchain):
    other = deploy_test_token(devchain.rpc_url, devchain.deployer_key, name="USD Coin", version="1")
    adapter = ChainAdapter(devchain.rpc_url, devchain.chain_id, other, devchain.relayer_key)
    try:
        report = await run_chain_checks(terms(devchain, usdc_address=other), adapter)
    finally:
        await adapter.close()
    assert [c.name for c in report.failed] == ["token version", "token domain"]
    assert report.failed[0].detail == "expected '2' (AGW_USDC_VERSION), found '1'"


async def test_an_address_without_a_contract_is_not_a_token(devchain):
    nothing = Account.create().address
    adapter = ChainAdapter(devchain.rpc_url, devchain.chain_id, nothing, devchain.relayer_key)
    try:
        report = await run_chain_checks(terms(devchain, usdc_address=nothing), adapter)
    finally:
        await adapter.close()
    assert [c.line() for c in report.failed] == [
        f"FAIL  token: no contract at {nothing} (AGW_USDC_ADDRESS) on chain 31337"]


async def test_a_mistyped_pay_to_fails(devchain, adapter):
    typo = devchain.pay_to[:-1] + devchain.pay_to[-1].swapcase()
    report = await run_chain_checks(terms(devchain, pay_to=typo), adapter)
    assert [c.name for c in report.failed] == ["payTo"] and "EIP-55 checksum" in report.failed[0].detail


async def test_a_dead_node_is_a_failed_check_not_a_crash(devchain):
    dead = f"http://127.0.0.1:{free_port()}"
    adapter = ChainAdapter(dead, devchain.chain_id, devchain.token, devchain.relayer_key, request_timeout_s=2)
    try:
        report = await run_chain_checks(terms(devchain, rpc_url=dead), adapter)
    finally:
        await adapter.close()
    assert [c.name for c in report.failed] == ["RPC node"]
    assert "(AGW_CHAIN_RPC_URL)" in report.failed[0].detail


def gauge(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None
    return value


async def test_relayer_gas_refuses_below_one_settlement_and_warns_below_the_threshold(devchain, caplog):
    broke = Account.create()
    adapter = ChainAdapter(devchain.rpc_url, devchain.chain_id, devchain.token, broke.key.hex())
    try:
        report = await run_chain_checks(terms(devchain, relayer_key=broke.key.hex()), adapter)
        assert [c.name for c in report.failed] == ["relayer gas"]
        assert report.failed[0].detail.startswith(f"{broke.address} holds 0 ETH; one settlement may cost up to ")
        assert gauge("agw_relayer_balance_eth") == 0 and gauge("agw_relayer_settlements_left") == 0
        # A facilitator pays the gas: then the relayer's balance is not checked at all.
        facilitated = await run_chain_checks(terms(devchain, relayer_key=broke.key.hex()), adapter,
                                             own_settlement=False)
        assert facilitated.failed == () and "relayer gas" not in [c.name for c in facilitated.checks]

        watch = RelayerGasWatch(adapter, warn_settlements=100)
        with caplog.at_level(logging.INFO, logger="agent_gateway.payments.checks"):
            assert (await watch()).status is CheckStatus.FAIL
            assert (await watch()).status is CheckStatus.FAIL
            # Enough for a few settlements (fees only fall on an idle dev chain): a warning.
            devchain.fund(broke.address, 0, eth_wei=3 * await adapter.settlement_cost())
            low = await watch()
        assert low.status is CheckStatus.WARN and "fewer than AGW_RELAYER_WARN_SETTLEMENTS=100" in low.detail
        assert 3 <= gauge("agw_relayer_settlements_left") < 100 and gauge("agw_relayer_balance_eth") > 0
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relayer gas is now")]
        assert [line.split(":")[0] for line in said] == ["relayer gas is now FAIL", "relayer gas is now warn"]
    finally:
        await adapter.close()


async def test_a_live_gateway_on_the_anvil_preset_logs_its_overrides_and_reports_relayer_gas(
        devchain, tmp_path: Path, sqlite_url, upstream, caplog):
    from tests.fixtures.live import live_gateway

    with caplog.at_level(logging.INFO), live_gateway(tmp_path, sqlite_url, upstream, network="anvil",
                                                     chain_rpc_url=devchain.rpc_url, pay_to=devchain.pay_to,
                                                     relayer_key=devchain.relayer_key) as live:
        metrics = httpx.get(live.url + "/metrics").text
        quote = httpx.post(live.url + "/api/agent/subscribe-pool", json={"pool": "alpha", "blocks": ["day"]})
    assert "AGW_NETWORK=anvil: AGW_CHAIN_RPC_URL=" in caplog.text and "overrides the preset's" in caplog.text
    assert "chain check ok    token name: 'USD Coin'" in caplog.text
    left = [line for line in metrics.splitlines() if line.startswith("agw_relayer_settlements_left ")]
    assert left and float(left[0].split()[1]) > 1000  # the dev relayer holds 10,000 ETH
    assert quote.status_code == 402 and quote.json()["accepts"][0]["extra"] == {"name": "USD Coin", "version": "2"}


def test_chain_check_in_facilitator_mode_asks_the_facilitator_and_not_the_relayer(devchain):
    """With AGW_FACILITATOR_URL there is no relayer key: its gas is not checked, the facilitator's
    /supported is, and a facilitator for another network is a FAIL that names both."""
    for networks, code in (([devchain.network], 0), (["eip155:8453"], 1)):
        with TestFacilitator(devchain.rpc_url, devchain.facilitator_key, networks, auth_header=AUTH_HEADER) as running:
            env = {**chain_env(devchain), "AGW_RELAYER_KEY": "", "AGW_FACILITATOR_URL": running.url,
                   "AGW_FACILITATOR_AUTH_HEADER": f"{AUTH_HEADER[0]}: {AUTH_HEADER[1]}"}
            result = cli(env, "chain", "check")
            url = running.url
        assert result.returncode == code, result.stdout + result.stderr
        names = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith(("ok ", "warn", "FAIL"))]
        assert "ok    relayer gas" not in names and len(names) == 7
        if code == 0:
            assert f"ok    facilitator: {url} settles exact on {devchain.network}" in result.stdout
        else:
            assert (f"FAIL  facilitator: expected exact on {devchain.network} in {url}/supported, "
                    "found exact v2 on: eip155:8453 (AGW_FACILITATOR_URL)") in result.stdout
        assert AUTH_HEADER[1] not in result.stdout + result.stderr  # the secret is never printed
