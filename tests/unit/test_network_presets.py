"""AGW_NETWORK presets: the x402 SDK's network table, the per-chain confirmations, and overrides."""

import pytest
from pydantic import ValidationError
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS

from agent_gateway.networks import NETWORK_PRESETS, chain_defaults
from agent_gateway.payments.checks import CheckStatus, check_pay_to
from agent_gateway.settings import Settings

REST = {"pay_to": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "relayer_key": "0x" + "11" * 32}


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize("name,chain_id", [("base", 8453), ("base-sepolia", 84532)])
def test_a_public_preset_is_the_x402_sdk_default_usdc_of_its_chain(name, chain_id):
    preset = NETWORK_PRESETS[name]
    sdk = DEFAULT_ASSETS[f"eip155:{chain_id}"][0]
    assert preset.chain_id == chain_id
    assert (preset.usdc_address, preset.usdc_name, preset.usdc_version) == (sdk["asset"], sdk["name"], sdk["version"])
    assert sdk["decimals"] == 6 and sdk["symbol"] == "USDC"


def test_base_and_base_sepolia_usdc_have_different_domain_names():
    assert NETWORK_PRESETS["base"].usdc_name == "USD Coin"
    assert NETWORK_PRESETS["base-sepolia"].usdc_name == "USDC"


@pytest.mark.parametrize("name", sorted(NETWORK_PRESETS))
def test_a_preset_confirms_as_its_chain_id_table_says(name):
    preset = NETWORK_PRESETS[name]
    assert preset.confirmations == chain_defaults(preset.chain_id).confirmations
    made = settings(network=name, chain_rpc_url="http://127.0.0.1:8545", **REST)
    assert made.confirmations == preset.confirmations and made.preset_overrides == ()


def test_a_preset_fills_every_chain_setting_left_unset():
    made = settings(network="base-sepolia", chain_rpc_url="http://node.internal:8545", **REST)
    chain = made.chain
    assert chain is not None and chain.network == "eip155:84532"
    assert (chain.usdc_address, chain.usdc_name, chain.usdc_version) == (
        "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2")
    assert made.confirmations == 2


def test_the_anvil_preset_needs_no_rpc_url():
    chain = settings(network="anvil", **REST).chain
    assert chain is not None and chain.rpc_url == "http://127.0.0.1:8545" and chain.chain_id == 31337


def test_an_explicit_value_overrides_the_preset_and_says_so():
    made = settings(network="base", chain_rpc_url="http://n:1", usdc_name="USDC", confirmations=10,
                    usdc_address="0x833589fcd6edb6e08f4c7c32d4f71b54bda02913", **REST)  # same address, lower case
    assert made.chain is not None and made.chain.usdc_name == "USDC" and made.confirmations == 10
    assert made.preset_overrides == (
        "AGW_NETWORK=base: AGW_USDC_NAME='USDC' overrides the preset's 'USD Coin'",
        "AGW_NETWORK=base: AGW_CONFIRMATIONS=10 overrides the preset's 3",
    )


def test_a_chain_id_that_contradicts_the_preset_is_refused():
    with pytest.raises(ValidationError, match="AGW_CHAIN_ID=84532 contradicts AGW_NETWORK=base"):
        settings(network="base", chain_id=84532, chain_rpc_url="http://n:1", **REST)
    assert settings(network="base", chain_id=8453, chain_rpc_url="http://n:1", **REST).chain_id == 8453


def test_an_unknown_network_names_the_presets():
    with pytest.raises(ValidationError, match="must be one of base, base-sepolia, anvil"):
        settings(network="ethereum")


def test_a_preset_without_the_rest_of_the_chain_settings_names_what_is_missing():
    with pytest.raises(ValidationError, match="missing AGW_CHAIN_RPC_URL, AGW_PAY_TO, AGW_RELAYER_KEY"):
        settings(network="base")


def test_without_a_preset_the_domain_defaults_to_usd_coin_2():
    chain = settings(chain_rpc_url="http://n:1", chain_id=8453, usdc_address="0x" + "ab" * 20, **REST).chain
    assert chain is not None and (chain.usdc_name, chain.usdc_version) == ("USD Coin", "2")


@pytest.mark.parametrize("pay_to,found", [
    ("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "ok"),
    ("0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc", "ok"),  # no checksum to check
    ("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293Bc", "fails its EIP-55 checksum"),  # one letter's case
    ("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293", "is not an address"),
    ("0x" + "00" * 20, "the zero address"),
])
def test_pay_to_must_be_an_address_a_transfer_reaches(pay_to, found):
    check = check_pay_to(pay_to)
    assert (check.status is CheckStatus.OK) == (found == "ok")
    assert found == "ok" or found in check.detail
