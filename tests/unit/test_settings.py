"""Settings: .env.example documents every setting and is itself a valid configuration."""

import re
from pathlib import Path

from agent_gateway.settings import EXAMPLE_POOLS_FILE, Settings

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def test_every_setting_is_documented_in_env_example():
    documented = set(re.findall(r"^(AGW_[A-Z0-9_]+)=", EXAMPLE.read_text(), re.MULTILINE))
    expected = {f"AGW_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from .env.example"
    assert documented - expected == set(), ".env.example names settings that do not exist"


def test_env_example_as_is_gives_the_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(EXAMPLE.read_text())
    settings = Settings()
    assert settings.database_url == "sqlite:///./agent_gateway.db"
    assert settings.pools_file == EXAMPLE_POOLS_FILE and settings.redis_url is None
    assert settings.chain_id is None and settings.port == 8080


def test_trusted_proxies_must_be_addresses_or_networks():
    import pytest
    from pydantic import ValidationError

    assert Settings(_env_file=None, trusted_proxies=" 10.0.0.0/8, ::1 ,").trusted_proxies == "10.0.0.0/8,::1"
    with pytest.raises(ValidationError, match="'proxy.internal' is not an IP address or CIDR network"):
        Settings(_env_file=None, trusted_proxies="10.0.0.1,proxy.internal")


CHAIN = {"chain_rpc_url": "http://127.0.0.1:8545", "chain_id": 31337,
         "usdc_address": "0x" + "11" * 20, "pay_to": "0x" + "22" * 20}


def test_a_facilitator_replaces_the_relayer_key_and_not_both():
    import pytest
    from pydantic import ValidationError

    settings = Settings(_env_file=None, **CHAIN, facilitator_url="https://facilitator.example/x402/",
                        facilitator_auth_header="Authorization: Bearer s3cret-token")
    assert settings.chain is not None and settings.chain.relayer_key is None
    assert settings.chain.facilitator_url == "https://facilitator.example/x402"
    assert settings.chain.facilitator_auth_header == ("Authorization", "Bearer s3cret-token")
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(settings.chain)
    with pytest.raises(ValidationError, match="AGW_RELAYER_KEY or AGW_FACILITATOR_URL"):
        Settings(_env_file=None, **CHAIN)
    with pytest.raises(ValidationError, match="not both"):
        Settings(_env_file=None, **CHAIN, relayer_key="0x" + "33" * 32, facilitator_url="https://f.example")


def test_a_malformed_facilitator_setting_is_named_and_its_secret_never_echoed():
    import pytest
    from pydantic import ValidationError

    for line in ("Bearer s3cret-token", "Bad Name: s3cret-token", "Authorization:", "X-Key: s3cret\r\nX-Evil: 1"):
        with pytest.raises(ValidationError) as refused:
            Settings(_env_file=None, **CHAIN, facilitator_url="https://f.example", facilitator_auth_header=line)
        assert "AGW_FACILITATOR_AUTH_HEADER" in str(refused.value) and "s3cret" not in str(refused.value)
    with pytest.raises(ValidationError, match="http:// or https://"):
        Settings(_env_file=None, **CHAIN, facilitator_url="facilitator.example")
    with pytest.raises(ValidationError, match="AGW_FACILITATOR_URL is not"):
        Settings(_env_file=None, **CHAIN, relayer_key="0x" + "33" * 32, facilitator_auth_header="X-Key: s3cret")
