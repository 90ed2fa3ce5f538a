"""The one Settings object: every AGW_* variable, parsed and validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EXAMPLE_POOLS_FILE = Path(__file__).parent / "catalog" / "example_pools.toml"


class Settings(BaseSettings):
    """Read from `AGW_*` environment variables and, when present, a `.env` file."""

    model_config = SettingsConfigDict(
        env_prefix="AGW_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Storage and coordination.
    database_url: str = "sqlite:///./agent_gateway.db"
    redis_url: str | None = None
    auto_migrate: bool = True

    # Catalog.
    pools_file: Path = EXAMPLE_POOLS_FILE

    # HTTP server.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    log_level: str = "INFO"

    # Proxy.
    max_proxy_body_bytes: int = Field(default=10_485_760, ge=1024)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_first_byte_timeout_s: float = Field(default=120.0, gt=0)
    upstream_total_timeout_s: float = Field(default=900.0, gt=0)
    upstream_max_connections: int = Field(default=1000, ge=1)
    upstream_client: Literal["aiohttp", "httpx"] = "aiohttp"
    key_cache_ttl_s: float = Field(default=60.0, ge=0)
    lease_ttl_s: float = Field(default=30.0, ge=1)

    # Dashboard: signs session cookies; unset means a random secret per process (sessions end on restart).
    session_secret: str | None = None

    # Background job.
    job_interval_s: float = Field(default=30.0, gt=0)

    # Chain (used by the x402 payment path).
    chain_rpc_url: str | None = None
    chain_id: int | None = None
    usdc_address: str | None = None
    usdc_name: str = "USD Coin"
    usdc_version: str = "2"
    pay_to: str | None = None
    relayer_key: str | None = None
    confirmations: int = Field(default=1, ge=1)
    # How long a paying request waits for its settlement's receipt before answering 202.
    settle_wait_s: float = Field(default=30.0, gt=0)
    # The x402 authorization window offered to payers (maxTimeoutSeconds); it must cover settlement.
    payment_timeout_s: int = Field(default=300, ge=30)
    # The reconciler takes over payments left unfinished this long (a crash, a lost receipt).
    reconcile_after_s: float = Field(default=60.0, ge=0)

    @field_validator("redis_url", "chain_rpc_url", "chain_id", "usdc_address", "pay_to", "relayer_key",
                     "session_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _chain_all_or_nothing(self) -> Settings:
        chain = {"chain_rpc_url": self.chain_rpc_url, "chain_id": self.chain_id, "usdc_address": self.usdc_address,
                 "pay_to": self.pay_to, "relayer_key": self.relayer_key}
        missing = [f"AGW_{name.upper()}" for name, value in chain.items() if value is None]
        if missing and len(missing) < len(chain):
            raise ValueError(f"x402 payments need every chain setting; missing {', '.join(missing)}")
        return self

    @field_validator("pools_file", mode="before")
    @classmethod
    def _default_pools(cls, value: object) -> object:
        return EXAMPLE_POOLS_FILE if value in ("", None) else value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return value
