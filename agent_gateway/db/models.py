"""Table models and their states. Secret material is stored only as hashes; responses are rendered
field by field on the web floor."""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Index, Integer, String, Text, false, text
from sqlmodel import Field, SQLModel


class SubscriptionStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    EXPIRED = "expired"
    CANCELED = "canceled"


class KeyStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    REVOKED = "revoked"


class PaymentState(StrEnum):
    """The payment state machine (drawn in payments.ledger)."""

    RECEIVED = "received"
    VERIFIED = "verified"
    RESERVED = "reserved"
    SUBMITTED = "submitted"  # handed to the x402 facilitator's /settle; no transaction hash yet
    BROADCAST = "broadcast"
    CONFIRMED = "confirmed"
    DELIVERED = "delivered"
    FAILED = "failed"
    CREDITED = "credited"
    REVOKED = "revoked"
    REFUNDED = "refunded"  # the money is being (or was) returned: a refund (payments.refunds) owns it


class RefundState(StrEnum):
    """The refund state machine (drawn in payments.refunds)."""

    PLANNED = "planned"  # decided; waits for the payment's finality or the refund wallet, if it must
    BROADCAST = "broadcast"  # on-chain: the signed transfer is stored (hash, bytes, nonce) before it is sent
    REFUNDED = "refunded"  # final: the balance credited, or the transfer confirmed
    CANCELED = "canceled"  # final: nothing to return (the payment was revoked: its money never stayed)


class RefundDestination(StrEnum):
    BALANCE = "balance"  # the account's prepaid balance
    CHAIN = "chain"  # a USDC transfer back to the paying wallet, from the refund wallet


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _ts(nullable: bool = False, index: bool = False) -> Column:
    return Column(DateTime(timezone=True), nullable=nullable, index=index)


class Account(SQLModel, table=True):
    __tablename__ = "accounts"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(max_length=200)
    # The wallet that paid for this account over x402, lowercase hex; lets it sign in again.
    wallet_address: str | None = Field(default=None, max_length=42, unique=True)
    balance_atomic: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=_ts())
    # Set by an operator (admin API): its keys are revoked, sign-in and purchases refused.
    disabled_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class BalanceEntry(SQLModel, table=True):
    """Every movement of an account's prepaid USDC balance, so the balance can be audited."""

    __tablename__ = "balance_entries"

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=40)
    delta_atomic: int = Field(sa_column=Column(BigInteger, nullable=False))
    kind: str = Field(max_length=20)  # credit | charge | reversal | debit (by an operator) | refund
    note: str = Field(default="", max_length=500)
    created_at: datetime = Field(sa_column=_ts())


class ManagementKey(SQLModel, table=True):
    __tablename__ = "management_keys"

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=40)
    name: str = Field(max_length=200)
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)
    last_four: str = Field(max_length=4)
    created_at: datetime = Field(sa_column=_ts())
    last_used_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class SeatInventory(SQLModel, table=True):
    """Seats held per pool and block; the conditional UPDATE on this row is what makes selling atomic."""

    __tablename__ = "seat_inventory"

    pool_slug: str = Field(primary_key=True, max_length=64)
    block: str = Field(primary_key=True, max_length=64)
    seats_held: int = Field(default=0)


class Subscription(SQLModel, table=True):
    __tablename__ = "subscriptions"
    __table_args__ = (Index("ix_subscriptions_status_period_end", "status", "period_end"),)

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=40)
    pool_slug: str = Field(max_length=64)
    blocks: list[str] = Field(sa_column=Column(JSON, nullable=False))
    billing_cycle: str = Field(max_length=10)  # month | year
    # Stored as its plain string value (String, not a database enum), so the schema is unchanged.
    status: SubscriptionStatus = Field(sa_type=String(10))
    price_atomic: int = Field(sa_column=Column(BigInteger, nullable=False))  # what this seat cost
    period_start: datetime = Field(sa_column=_ts())
    period_end: datetime = Field(sa_column=_ts())
    charge_id: str | None = Field(default=None, foreign_key="balance_entries.id", max_length=40)
    payment_id: str | None = Field(default=None, max_length=40)
    created_at: datetime = Field(sa_column=_ts())


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    # One live (not deleted) key per subscription, enforced by the database itself.
    __table_args__ = (
        Index(
            "ux_api_keys_live_subscription",
            "subscription_id",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=40)
    subscription_id: str = Field(foreign_key="subscriptions.id", max_length=40)
    name: str = Field(max_length=200)
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)
    last_four: str = Field(max_length=4)
    status: KeyStatus = Field(sa_type=String(10))
    created_at: datetime = Field(sa_column=_ts())
    last_used_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    deleted_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class UsageRecord(SQLModel, table=True):
    """One proxied request; written in batches by the usage recorder, never per chunk."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_key_time", "api_key_id", "created_at"),
        Index("ix_usage_account_time", "account_id", "created_at"),
    )

    # An integer key: ids are made by the database, so batches insert without generating any here.
    id: int | None = Field(default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"),
                                                          primary_key=True, autoincrement=True))
    api_key_id: str = Field(max_length=40)
    account_id: str = Field(max_length=40)
    subscription_id: str = Field(max_length=40)
    endpoint: str = Field(max_length=40)
    model: str = Field(default="", max_length=200)
    status_code: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    usage_source: str = Field(max_length=12)  # upstream | estimated | missing
    created_at: datetime = Field(sa_column=_ts())


# The rows of ux_payments_tx_hash: tx-hash claims that have not failed.
TX_HASH_CLAIMED = "method = 'tx-hash' AND state <> 'failed' AND tx_hash IS NOT NULL"
# The rows of ux_payments_identifier: payments with a client's idempotency key that have not failed.
IDENTIFIER_HELD = "state <> 'failed' AND payment_identifier IS NOT NULL"


class Payment(SQLModel, table=True):
    """One USDC payment and the order it buys; its `state` is the payment state machine (payments.ledger).

    An x402 payment is its authorization (payer, nonce), a tx-hash claim its transaction: each is
    redeemed at most once, by partial unique indexes over the payments that have not failed. The
    transaction that carried an x402 payment is not unique: one transaction can execute several
    authorizations (anyone can bundle pending ones), and each of them is a payment of its own."""

    __tablename__ = "payments"
    __table_args__ = (
        Index("ux_payments_authorization", "payer", "auth_nonce", unique=True,
              sqlite_where=text("state <> 'failed' AND auth_nonce IS NOT NULL"),
              postgresql_where=text("state <> 'failed' AND auth_nonce IS NOT NULL")),
        Index("ux_payments_tx_hash", "tx_hash", unique=True,
              sqlite_where=text(TX_HASH_CLAIMED), postgresql_where=text(TX_HASH_CLAIMED)),
        Index("ux_payments_identifier", "payer", "payment_identifier", unique=True,
              sqlite_where=text(IDENTIFIER_HELD), postgresql_where=text(IDENTIFIER_HELD)),
        Index("ix_payments_state_updated", "state", "updated_at"),
        Index("ix_payments_recheck", "chain_final", "state"),
    )

    id: str = Field(primary_key=True, max_length=40)
    method: str = Field(max_length=12)  # x402-exact | tx-hash
    network: str = Field(max_length=40)  # CAIP-2, e.g. eip155:8453
    payer: str = Field(max_length=42)  # lowercase hex address
    amount_atomic: int = Field(sa_column=Column(BigInteger, nullable=False))
    auth_nonce: str | None = Field(default=None, max_length=66)
    valid_before: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    tx_hash: str | None = Field(default=None, max_length=66)
    raw_tx: str | None = None  # the signed settlement, kept so a restart rebroadcasts the same bytes
    # The EIP-3009 authorization and its signature (x402-exact), to rebuild a settlement whose
    # relayer nonce was taken before it reached the chain.
    authorization: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    state: PaymentState = Field(sa_type=String(12))
    failure_reason: str | None = Field(default=None, max_length=60)
    seats_held: bool = False  # seats reserved in the inventory for this payment, not yet delivered
    # The order.
    account_id: str | None = Field(default=None, max_length=40)  # the buyer, when known up front
    pool_slug: str = Field(max_length=64)
    blocks: list[str] = Field(sa_column=Column(JSON, nullable=False))
    quantity: int
    billing_cycle: str = Field(max_length=10)
    unit_price_atomic: int = Field(sa_column=Column(BigInteger, nullable=False))
    key_name: str = Field(default="agent", max_length=200)
    renew_subscription_id: str | None = Field(default=None, max_length=40)
    # Chain facts for the checks after delivery (payments.ledger, "Reorgs").
    # The chain head when the authorization was checked unused: its use can only be in a later block.
    watch_from_block: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # The block of the transaction that carried the Transfer (`tx_hash`), once confirmed.
    block_number: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # tx-hash flow: the sender's account nonce of the claimed transaction (another transaction
    # with that nonce means the claimed one can never be mined again).
    sender_nonce: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    # What of amount_atomic went to the prepaid balance at delivery (an overpaid tx-hash transfer).
    credit_atomic: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # x402 `payment-identifier`: the payer's idempotency key (unique per payer over the payments
    # that have not failed), and the SHA-256 of the request it was first sent with
    # (payments.idempotency), so a retry is told apart from another request under the same key.
    payment_identifier: str | None = Field(default=None, max_length=128)
    request_fingerprint: str | None = Field(default=None, max_length=64)
    # Past the reorg horizon (or ended without money): no longer re-checked.
    chain_final: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=false()))
    # When the reorg re-check last took it up: the pass takes the longest unchecked first.
    rechecked_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())


class WalletChallenge(SQLModel, table=True):
    """A server-issued sign-in message; a wallet that signs it gets a new management key, once."""

    __tablename__ = "wallet_challenges"

    id: str = Field(primary_key=True, max_length=40)
    address: str = Field(max_length=42, index=True)
    # The EIP-4361 message; its length follows AGW_PUBLIC_URL's, so the column has no bound.
    message: str = Field(sa_column=Column(Text, nullable=False))
    expires_at: datetime = Field(sa_column=_ts())
    used_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    created_at: datetime = Field(sa_column=_ts())


class DashboardSession(SQLModel, table=True):
    """A dashboard sign-in. The cookie carries only this id; sign-out or revoking the management key
    sets `ended_at`, and every process checks the row on every request, so an ended session is
    refused everywhere at once."""

    __tablename__ = "dashboard_sessions"

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="accounts.id", max_length=40)
    management_key_id: str = Field(foreign_key="management_keys.id", index=True, max_length=40)
    created_at: datetime = Field(sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
    ended_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class AdminSession(SQLModel, table=True):
    """An operator's sign-in to the console pages. The cookie carries only this id; sign-out sets
    `ended_at`, and every admin page checks the row, so a copy of the cookie is worthless once its
    session ended, in every process. `token_mark` fingerprints the admin token it was opened with
    (an HMAC under the session key, never the token): a changed AGW_ADMIN_TOKEN ends them all."""

    __tablename__ = "admin_sessions"

    id: str = Field(primary_key=True, max_length=40)
    actor: str = Field(max_length=64)
    token_mark: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=_ts())
    expires_at: datetime = Field(sa_column=_ts())
    ended_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class AuditRecord(SQLModel, table=True):
    """One admin action: who (the actor the operator named), when, what, on what, and the values
    before and after. Written in the same transaction as the change it records."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_target", "target", "created_at"),)

    id: str = Field(primary_key=True, max_length=40)
    actor: str = Field(max_length=64, index=True)
    action: str = Field(max_length=60)  # e.g. pool.state, pools.reload, account.balance, account.disable
    target: str = Field(max_length=120)  # what it acted on: a pool slug, an account id, the pools file
    reason: str = Field(default="", max_length=500)
    before: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    after: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(sa_column=_ts(index=True))


class PoolState(SQLModel, table=True):
    """A pool's live status. The pools file seeds it (`file_status`, what the file said); after
    that it changes only through audited admin transitions (catalog.states)."""

    __tablename__ = "pool_states"

    pool_slug: str = Field(primary_key=True, max_length=64)
    status: str = Field(max_length=12)
    file_status: str = Field(max_length=12)
    updated_at: datetime = Field(sa_column=_ts())


class CatalogVersion(SQLModel, table=True):
    """A pools file the gateway applied (at start or by a reload), kept whole so that every process
    serves the same text, whatever file it has on its own disk."""

    __tablename__ = "catalog_versions"

    id: int | None = Field(default=None, sa_column=Column(BigInteger().with_variant(Integer, "sqlite"),
                                                          primary_key=True, autoincrement=True))
    sha256: str = Field(max_length=64)
    pools_toml: str = Field(sa_column=Column(Text, nullable=False))
    source: str = Field(max_length=500)
    actor: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=_ts())


# The rows of ux_refunds_nonce: on-chain refunds holding a nonce of the refund wallet.
REFUND_NONCE_HELD = "nonce IS NOT NULL"


class Refund(SQLModel, table=True):
    """Money given back: a pledge of a closed pool, or one payment an operator refunds. Its `state`
    is the refund state machine (payments.refunds); each transition is a conditional UPDATE.

    One refund per payment and one per balance-paid pledge (partial unique indexes); an on-chain
    refund's nonce is held under a unique index too, so two processes never sign one nonce twice."""

    __tablename__ = "refunds"
    __table_args__ = (
        Index("ux_refunds_payment", "payment_id", unique=True,
              sqlite_where=text("payment_id IS NOT NULL"), postgresql_where=text("payment_id IS NOT NULL")),
        Index("ux_refunds_subscription", "subscription_id", unique=True,
              sqlite_where=text("subscription_id IS NOT NULL"), postgresql_where=text("subscription_id IS NOT NULL")),
        Index("ux_refunds_nonce", "from_address", "nonce", unique=True,
              sqlite_where=text(REFUND_NONCE_HELD), postgresql_where=text(REFUND_NONCE_HELD)),
        Index("ix_refunds_state_updated", "state", "updated_at"),
    )

    id: str = Field(primary_key=True, max_length=40)
    # What is refunded: a payment (x402 or tx-hash), or a pledge paid from the prepaid balance.
    payment_id: str | None = Field(default=None, max_length=40)
    subscription_id: str | None = Field(default=None, max_length=40)
    account_id: str | None = Field(default=None, max_length=40)
    pool_slug: str = Field(max_length=64)
    amount_atomic: int = Field(sa_column=Column(BigInteger, nullable=False))
    destination: RefundDestination = Field(sa_type=String(10))
    to_address: str | None = Field(default=None, max_length=42)  # on-chain: the paying wallet, lowercase
    state: RefundState = Field(sa_type=String(12))
    reason: str = Field(max_length=40)  # funding_deadline | activation_deadline | pool_closed | operator
    note: str = Field(default="", max_length=500)  # the operator's reason
    actor: str = Field(max_length=64)
    # Why a planned refund waits (awaiting_finality, refund_wallet_short_usdc, ...); None when it does not.
    waiting: str | None = Field(default=None, max_length=40)
    # On-chain: the refund wallet, the nonce and the signed transfer, stored before it is sent.
    from_address: str | None = Field(default=None, max_length=42)
    nonce: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    tx_hash: str | None = Field(default=None, max_length=66)
    raw_tx: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    block_number: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    finished_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
