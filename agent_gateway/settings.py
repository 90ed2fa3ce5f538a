"""The one Settings object: every AGW_* variable, parsed and validated once at start."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent_gateway.strict_json import DEFAULT_MAX_DEPTH

EXAMPLE_POOLS_FILE = Path(__file__).parent / "catalog" / "example_pools.toml"


class ChainSettings(BaseModel):
    """The chain x402 payments settle on, present as a whole or absent (then payments are off).

    Built once from the flat AGW_* chain variables. Settlement is by our own relayer key today; a
    facilitator URL would be its alternative (exactly one of the two), and a network preset would
    fill chain_id and the token fields."""

    model_config = ConfigDict(frozen=True)

    rpc_url: str
    chain_id: int
    usdc_address: str
    usdc_name: str
    usdc_version: str
    pay_to: str
    relayer_key: str = Field(repr=False)  # a private key: never in a repr or a log

    @property
    def network(self) -> str:
        """The CAIP-2 network id x402 speaks (`eip155:<chain id>`)."""
        return f"eip155:{self.chain_id}"


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
    # The gateway's canonical external URL (scheme://host[:port]); every absolute URL it emits and
    # the wallet sign-in domain come from it, never from a request's Host header.
    # Unset: http://HOST:PORT of `serve`. Required when serving on a non-loopback address.
    public_url: str | None = None
    # Addresses (IPs or CIDRs, comma-separated) of reverse proxies whose X-Forwarded-For and
    # X-Forwarded-Proto headers are trusted. Empty: forwarded headers are ignored.
    trusted_proxies: str = ""
    # Deepest JSON nesting accepted in any parsed body or header (objects and arrays).
    max_json_depth: int = Field(default=DEFAULT_MAX_DEPTH, ge=4, le=512)
    # Slow clients: a connection must finish sending its request headers, and a request its body,
    # within these (seconds); at most this many connections are open at once per process.
    header_read_timeout_s: float = Field(default=10.0, gt=0)
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=20_000, ge=16)
    # Unauthenticated writes that did not end in a delivery (failed x402 attempts, sign-in
    # challenges) allowed per client address per minute; shared through Redis when set.
    unauth_writes_per_minute: int = Field(default=30, ge=1)
    # Payment attempts one client address may have in flight at once per process (they are judged
    # when they end, so this bounds a burst); paying agents behind one address share it.
    unauth_attempts_in_flight: int = Field(default=64, ge=1)
    # A bearer token that /metrics requires when set. Unset: /metrics is public.
    metrics_token: str | None = None

    # Proxy.
    max_proxy_body_bytes: int = Field(default=10_485_760, ge=1024)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_first_byte_timeout_s: float = Field(default=120.0, gt=0)
    upstream_total_timeout_s: float = Field(default=900.0, gt=0)
    upstream_max_connections: int = Field(default=10_000, ge=1)
    upstream_client: Literal["aiohttp", "httpx"] = "aiohttp"
    key_cache_ttl_s: float = Field(default=60.0, ge=0)
    # Redis leases expire this long after their last renewal (renewed every third of it while a
    # request runs), so a crashed process's keys are free again within this many seconds; a
    # process stalled for two thirds of it loses its leases (docs/decisions.md, "Several processes").
    lease_ttl_s: float = Field(default=9.0, ge=1)

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
    # Confirmations before delivery, and the depth after which a delivered payment is final (no
    # more reorg checks). Unset: the defaults for the chain id (payments.networks).
    confirmations: int | None = Field(default=None, ge=1)
    reorg_horizon_blocks: int | None = Field(default=None, ge=1)
    # The oldest transfer a tx-hash claim may name (seconds, by block time).
    tx_claim_max_age_s: int = Field(default=3600, ge=60)
    # How long a paying request waits for its settlement's receipt before answering 202.
    settle_wait_s: float = Field(default=30.0, gt=0)
    # The x402 authorization window offered to payers (maxTimeoutSeconds); it must cover settlement.
    payment_timeout_s: int = Field(default=300, ge=30)
    # The reconciler takes over payments left unfinished this long (a crash, a lost receipt).
    reconcile_after_s: float = Field(default=60.0, ge=0)
    _chain: ChainSettings | None = PrivateAttr(default=None)

    @field_validator("redis_url", "chain_rpc_url", "chain_id", "usdc_address", "pay_to", "relayer_key",
                     "session_secret", "public_url", "metrics_token", "confirmations",
                     "reorg_horizon_blocks", mode="before")
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
        if (self.chain_rpc_url is not None and self.chain_id is not None and self.usdc_address is not None
                and self.pay_to is not None and self.relayer_key is not None):  # all set (checked above)
            self._chain = ChainSettings(rpc_url=self.chain_rpc_url, chain_id=self.chain_id,
                                        usdc_address=self.usdc_address, usdc_name=self.usdc_name,
                                        usdc_version=self.usdc_version, pay_to=self.pay_to,
                                        relayer_key=self.relayer_key)
        return self

    @property
    def chain(self) -> ChainSettings | None:
        """The chain settings as one value, or None when payments are off."""
        return self._chain

    @field_validator("public_url")
    @classmethod
    def _absolute_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an absolute http:// or https:// URL without query or fragment, "
                             "e.g. https://gateway.example.com")
        return value.rstrip("/")

    @field_validator("trusted_proxies")
    @classmethod
    def _ip_networks(cls, value: str) -> str:
        items = [item.strip() for item in value.split(",") if item.strip()]
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)") from None
        return ",".join(items)

    @property
    def external_url(self) -> str:
        """The base of every absolute URL the gateway emits (no trailing slash)."""
        return self.public_url or f"http://{self.host}:{self.port}"

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
