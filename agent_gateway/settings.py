"""The one Settings object: every AGW_* variable, parsed and validated once at start."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent_gateway.networks import NETWORK_PRESETS
from agent_gateway.strict_json import DEFAULT_MAX_DEPTH

EXAMPLE_POOLS_FILE = Path(__file__).parent / "catalog" / "example_pools.toml"


class ChainSettings(BaseModel):
    """The chain x402 payments settle on, present as a whole or absent (then payments are off).

    Built once from the flat AGW_* chain variables, after AGW_NETWORK's preset filled the ones left
    unset. Settlement is by our own relayer key or through an x402 facilitator (exactly one of the
    two)."""

    model_config = ConfigDict(frozen=True)

    rpc_url: str
    chain_id: int
    usdc_address: str
    usdc_name: str
    usdc_version: str
    pay_to: str
    relayer_key: str | None = Field(default=None, repr=False)  # a private key: never in a repr or a log
    facilitator_url: str | None = None
    # (name, value) of the header sent with every facilitator request; a secret, like the key.
    facilitator_auth_header: tuple[str, str] | None = Field(default=None, repr=False)
    facilitator_timeout_s: float = 30.0

    @property
    def network(self) -> str:
        """The CAIP-2 network id x402 speaks (`eip155:<chain id>`)."""
        return f"eip155:{self.chain_id}"


class Settings(BaseSettings):
    """Read from `AGW_*` environment variables and, when present, a `.env` file."""

    model_config = SettingsConfigDict(
        env_prefix="AGW_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        # A refused value is named, never echoed: the relayer key and the facilitator's auth header are secrets.
        hide_input_in_errors=True,
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
    # Worker processes of `serve` on that one port; more than 1 needs PostgreSQL, AGW_REDIS_URL and
    # AGW_SESSION_SECRET (checked at start).
    workers: int = Field(default=1, ge=1, le=256)
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
    # The operator's token for /api/admin/ and `agent-gateway admin` (never an mk_ key). Unset: the
    # admin API refuses everything. Processes follow each other's pool changes within catalog_poll_s.
    admin_token: str | None = Field(default=None, min_length=32, repr=False)
    catalog_poll_s: float = Field(default=5.0, gt=0)

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

    # Chain (used by the x402 payment path). A network preset (base, base-sepolia, anvil) fills the
    # chain id, token address and EIP-712 domain (and anvil's RPC URL); explicit values override it.
    network: str | None = None
    chain_rpc_url: str | None = None
    chain_id: int | None = None
    usdc_address: str | None = None
    usdc_name: str | None = None  # unset and no preset: "USD Coin"
    usdc_version: str | None = None  # unset and no preset: "2"
    pay_to: str | None = None
    relayer_key: str | None = None
    # Verify and settle through an x402 facilitator (POST /verify, /settle; GET /supported) instead
    # of the own relayer, which then needs no key. The auth header is sent as is with every
    # facilitator request: "Name: value", e.g. "Authorization: Bearer <token>".
    facilitator_url: str | None = None
    facilitator_auth_header: str | None = Field(default=None, repr=False)
    facilitator_timeout_s: float = Field(default=30.0, gt=0)
    # Confirmations before delivery, and the depth after which a delivered payment is final (no
    # more reorg checks). Unset: the defaults for the chain id (networks.py).
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
    # Start-up check and /metrics: warn when the relayer's gas covers fewer settlements than this.
    relayer_warn_settlements: int = Field(default=100, ge=0)
    # Refunds (a closed funding round's pledges; the operator's single-payment refunds): where the
    # money goes by default, "balance" (the account's prepaid balance) or "chain" (a USDC transfer
    # back to the paying wallet, sent from AGW_REFUND_PRIVATE_KEY's wallet, which needs USDC and gas).
    # Pledges paid from the prepaid balance always go back to it. The refund key must not be the
    # relayer's (they would share nonces); unset, on-chain refunds are off.
    refund_to: Literal["balance", "chain"] = "balance"
    refund_private_key: str | None = Field(default=None, repr=False)
    _chain: ChainSettings | None = PrivateAttr(default=None)
    _preset_overrides: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("redis_url", "chain_rpc_url", "chain_id", "usdc_address", "pay_to", "relayer_key",
                     "facilitator_url", "facilitator_auth_header", "session_secret", "public_url",
                     "metrics_token", "admin_token", "confirmations", "reorg_horizon_blocks", "network",
                     "usdc_name", "usdc_version", "refund_private_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("network")
    @classmethod
    def _known_network(cls, value: str | None) -> str | None:
        if value is not None and value not in NETWORK_PRESETS:
            raise ValueError(f"must be one of {', '.join(NETWORK_PRESETS)}")
        return value

    def _apply_network_preset(self) -> None:
        """Fill the chain settings left unset from AGW_NETWORK's preset; note each one set otherwise."""
        if self.network is None:
            return
        preset = NETWORK_PRESETS[self.network]
        if self.chain_id is not None and self.chain_id != preset.chain_id:
            raise ValueError(f"AGW_CHAIN_ID={self.chain_id} contradicts AGW_NETWORK={self.network} "
                             f"(chain id {preset.chain_id}): set only one of them")
        self.chain_id = preset.chain_id
        overrides = []
        for name, value in (("chain_rpc_url", preset.rpc_url), ("usdc_address", preset.usdc_address),
                            ("usdc_name", preset.usdc_name), ("usdc_version", preset.usdc_version),
                            ("confirmations", preset.confirmations)):
            given = getattr(self, name)
            if given is None:
                setattr(self, name, value)
            elif value is not None and str(given).lower() != str(value).lower():
                overrides.append(f"AGW_{name.upper()}={given!r} overrides the preset's {value!r}")
        self._preset_overrides = tuple(f"AGW_NETWORK={self.network}: {line}" for line in overrides)

    @property
    def preset_overrides(self) -> tuple[str, ...]:
        """One sentence per explicit AGW_* value that differs from AGW_NETWORK's preset (logged at start)."""
        return self._preset_overrides

    @model_validator(mode="after")
    def _chain_all_or_nothing(self) -> Settings:
        self._apply_network_preset()
        chain = {"AGW_CHAIN_RPC_URL": self.chain_rpc_url, "AGW_CHAIN_ID": self.chain_id,
                 "AGW_USDC_ADDRESS": self.usdc_address, "AGW_PAY_TO": self.pay_to,
                 "AGW_RELAYER_KEY or AGW_FACILITATOR_URL": self.relayer_key or self.facilitator_url}
        missing = [name for name, value in chain.items() if value is None]
        if missing and len(missing) < len(chain):
            raise ValueError(f"x402 payments need every chain setting; missing {', '.join(missing)}")
        if self.facilitator_auth_header is not None and self.facilitator_url is None:
            raise ValueError("AGW_FACILITATOR_AUTH_HEADER is set but AGW_FACILITATOR_URL is not")
        if self.relayer_key is not None and self.facilitator_url is not None:
            raise ValueError("set either AGW_RELAYER_KEY (settle with the own relayer) or AGW_FACILITATOR_URL "
                             "(settle through an x402 facilitator), not both")
        if self.refund_private_key is not None:
            if missing:
                raise ValueError("AGW_REFUND_PRIVATE_KEY is set but x402 payments are off (the chain settings)")
            if not _PRIVATE_KEY.match(self.refund_private_key):
                raise ValueError("AGW_REFUND_PRIVATE_KEY must be a private key: 0x and 64 hex digits")
            if self.relayer_key is not None and \
                    self.refund_private_key.lower().removeprefix("0x") == self.relayer_key.lower().removeprefix("0x"):
                raise ValueError("AGW_REFUND_PRIVATE_KEY must not be AGW_RELAYER_KEY: refunds and settlements "
                                 "would take each other's nonces; give refunds a wallet of their own")
        if self.refund_to == "chain" and self.refund_private_key is None:
            raise ValueError("AGW_REFUND_TO=chain needs AGW_REFUND_PRIVATE_KEY (the wallet refunds are sent from)")
        if (self.chain_rpc_url is not None and self.chain_id is not None and self.usdc_address is not None
                and self.pay_to is not None):  # all set (checked above)
            self._chain = ChainSettings(rpc_url=self.chain_rpc_url, chain_id=self.chain_id,
                                        usdc_address=self.usdc_address, usdc_name=self.usdc_name or "USD Coin",
                                        usdc_version=self.usdc_version or "2", pay_to=self.pay_to,
                                        relayer_key=self.relayer_key, facilitator_url=self.facilitator_url,
                                        facilitator_auth_header=_auth_header(self.facilitator_auth_header),
                                        facilitator_timeout_s=self.facilitator_timeout_s)
        return self

    @field_validator("facilitator_url")
    @classmethod
    def _facilitator_base_url(cls, value: str | None) -> str | None:
        return _base_url(value, "https://facilitator.example.com (its /verify, /settle and /supported are called)")

    @field_validator("facilitator_auth_header")
    @classmethod
    def _header_line(cls, value: str | None) -> str | None:
        _auth_header(value)
        return value

    @property
    def chain(self) -> ChainSettings | None:
        """The chain settings as one value, or None when payments are off."""
        return self._chain

    @field_validator("public_url")
    @classmethod
    def _absolute_base_url(cls, value: str | None) -> str | None:
        return _base_url(value, "https://gateway.example.com")

    @field_validator("admin_token")
    @classmethod
    def _not_a_customer_key(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith(("mk_", "sk_")) or any(c.isspace() for c in value)):
            raise ValueError("must be a random secret of its own (e.g. `openssl rand -hex 32`), "
                             "not an mk_/sk_ key, without spaces")
        return value

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


_PRIVATE_KEY = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _auth_header(line: str | None) -> tuple[str, str] | None:
    """Parse the header line `Name: value` into (name, value); a ValueError names the setting, never
    its value (a secret)."""
    if line is None:
        return None
    name, sep, value = line.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _HEADER_NAME_RE.match(name) or not value or any(c in value for c in "\r\n\0"):
        raise ValueError("AGW_FACILITATOR_AUTH_HEADER must be one header line \"Name: value\", "
                         "e.g. \"Authorization: Bearer <token>\"")
    return name, value


def _base_url(value: str | None, example: str) -> str | None:
    """An absolute http(s) base URL without query or fragment, its trailing slash dropped."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"must be an absolute http:// or https:// URL without query or fragment, e.g. {example}")
    return value.rstrip("/")
