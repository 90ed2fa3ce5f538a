"""The pools file (TOML): blocks and pools, validated into a Catalog; errors name the field."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent_gateway.catalog.blocks import DEFAULT_BLOCKS, Block, parse_block
from agent_gateway.money import parse_usdc

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class PoolStatus(StrEnum):
    """A pool's status; the file seeds it, admin transitions change it (catalog.states)."""

    FUNDING = "funding"  # sells (pledges), serves no inference
    ACTIVATING = "activating"  # the round is funded; neither sells nor serves until it is active
    ACTIVE = "active"  # sells and serves
    PAUSED = "paused"  # neither sells nor serves
    CLOSED = "closed"  # the funding round failed; final

    @property
    def sells(self) -> bool:
        return self in (PoolStatus.FUNDING, PoolStatus.ACTIVE)


class CatalogError(ValueError):
    """The pools file cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Pool:
    slug: str
    name: str
    description: str
    models: tuple[str, ...]
    upstreams: tuple[str, ...]
    upstream_api_key_env: str | None
    seats: int
    status: PoolStatus
    annual_discount: Decimal
    prices_atomic: dict[str, int]  # block name -> USDC atomic units per seat per 30 days
    # What the upstream speaks for Anthropic Messages requests: "anthropic" relays /v1/messages
    # as it is; "openai" (the default) translates to chat completions. OpenAI routes ignore it.
    upstream_api: str = "openai"
    # The funding round (docs/decisions.md "Funding pools"): seats to pledge in total (a seat is one
    # subscription, whatever its blocks) before the pool goes to `activating`; the pools file's
    # `funding_goal`, or `seats` when it gives none. A pool still funding at `funding_deadline`
    # is closed and its pledges refunded (payments.refunds); so is one left `activating` for
    # `activation_days` (counted from when it entered activating; fractions allowed).
    funding_goal: int = 1
    funding_deadline: datetime | None = None
    activation_days: float = 14.0


@dataclass
class Catalog:
    """The pools and blocks on sale. Every service holds the one running instance, which a reload
    or a pool state change updates in place (`adopt`), so nobody keeps a stale copy."""

    blocks: dict[str, Block]
    pools: dict[str, Pool]

    def adopt(self, other: Catalog) -> None:
        # Two plain assignments with no await between them: no request sees half of a change.
        self.blocks, self.pools = other.blocks, other.pools

    def pool(self, slug: str) -> Pool | None:
        return self.pools.get(slug)

    def with_statuses(self, statuses: dict[str, PoolStatus]) -> Catalog:
        """This catalog with the pools' live statuses (from the database) in place of the file's."""
        return Catalog(blocks=self.blocks, pools={slug: dataclasses.replace(pool, status=statuses.get(slug, pool.status))
                                                  for slug, pool in self.pools.items()})


class _PoolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    models: list[str] = Field(min_length=1)
    upstreams: list[str] = Field(min_length=1)
    upstream_api_key_env: str | None = None
    seats: int = Field(ge=1, le=1_000_000)
    # The file's grammar (a strict model takes strings here); Pool carries the PoolStatus.
    status: Literal["funding", "active", "paused"] = "active"
    annual_discount: str = "0"
    prices: dict[str, str] = Field(min_length=1)
    upstream_api: Literal["openai", "anthropic"] = "openai"
    funding_goal: int | None = Field(default=None, ge=1, le=1_000_000)
    # A TOML offset date-time (`2027-01-31T00:00:00Z`); one without an offset is read as UTC.
    funding_deadline: datetime | None = None
    # Days an `activating` pool waits for the operator's activation before the round closes.
    activation_days: float = Field(default=14.0, gt=0, le=365)

    @field_validator("funding_deadline")
    @classmethod
    def _utc(cls, when: datetime | None) -> datetime | None:
        if when is None:
            return None
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[str]) -> list[str]:
        if any(not m.strip() for m in models):
            raise ValueError("model ids must not be empty")
        if len(set(models)) != len(models):
            raise ValueError("model ids must be distinct")
        return models

    @field_validator("upstreams")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [u.rstrip("/") for u in urls]

    @field_validator("annual_discount")
    @classmethod
    def _fraction(cls, text: str) -> str:
        value = Decimal(parse_usdc(text)) / 10**6
        if value >= 1:
            raise ValueError("must be a fraction below 1, such as \"0.15\"")
        return text

    @field_validator("prices")
    @classmethod
    def _positive_prices(cls, prices: dict[str, str]) -> dict[str, str]:
        for block, text in prices.items():
            try:
                atomic = parse_usdc(text)
            except ValueError as exc:
                raise ValueError(f"{block}: {exc}") from None
            if atomic <= 0:
                raise ValueError(f"{block}: price must be above zero")
        return prices


class _PoolsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    blocks: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_BLOCKS))
    pools: dict[str, _PoolEntry] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> _PoolsFile:
        if not self.blocks:
            raise ValueError("[blocks] must name at least one block")
        for name, span in self.blocks.items():
            if not _SLUG.match(name):
                raise ValueError(f"blocks.{name}: block names are lowercase letters, digits, - and _")
            try:
                parse_block(name, span)
            except ValueError as exc:
                raise ValueError(f"blocks.{name}: {exc}") from None
        for slug, pool in self.pools.items():
            if not _SLUG.match(slug):
                raise ValueError(f"pools.{slug}: slugs are lowercase letters, digits, - and _")
            if pool.funding_goal is not None and pool.funding_goal > pool.seats * len(pool.prices):
                raise ValueError(f"pools.{slug}.funding_goal: {pool.funding_goal} seats is more than the pool "
                                 f"offers ({pool.seats} seats in each of {len(pool.prices)} block(s))")
            for block in pool.prices:
                if block not in self.blocks:
                    raise ValueError(
                        f"pools.{slug}.prices.{block}: unknown block (known: {', '.join(self.blocks)})"
                    )
        return self


def load_catalog(path: Path) -> Catalog:
    """Read and validate a pools file; raise CatalogError naming the file and the field."""
    return parse_catalog(read_pools_file(path), str(path))


def read_pools_file(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"{path}: pools file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot be read: {exc}") from None


def parse_catalog(text: str, source: str) -> Catalog:
    """Validate a pools file's text; `source` names it in the error."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None
    try:
        parsed = _PoolsFile.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(f"{source}: {_describe(exc)}") from None
    blocks = {name: parse_block(name, span) for name, span in parsed.blocks.items()}
    pools = {
        slug: Pool(
            slug=slug,
            name=entry.name,
            description=entry.description,
            models=tuple(entry.models),
            upstreams=tuple(entry.upstreams),
            upstream_api_key_env=entry.upstream_api_key_env,
            seats=entry.seats,
            status=PoolStatus(entry.status),
            annual_discount=Decimal(entry.annual_discount),
            # Keep the blocks' file order so quotes and listings are stable.
            prices_atomic={b: parse_usdc(entry.prices[b]) for b in blocks if b in entry.prices},
            upstream_api=entry.upstream_api,
            funding_goal=entry.funding_goal if entry.funding_goal is not None else entry.seats,
            funding_deadline=entry.funding_deadline,
            activation_days=float(entry.activation_days),
        )
        for slug, entry in parsed.pools.items()
    }
    return Catalog(blocks=blocks, pools=pools)


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)
