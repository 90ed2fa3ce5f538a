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
