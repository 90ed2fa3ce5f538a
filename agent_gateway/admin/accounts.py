"""Accounts as the operator sees them: find, look into, credit or debit, disable and enable.

Every change is audited in its own transaction; disabling revokes the account's keys everywhere
through the key lifecycle once that transaction has committed."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, update
from sqlmodel import col, select

from agent_gateway.accounts.service import add_credit, take_back_credit
from agent_gateway.admin import audit
from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database
from agent_gateway.db.models import (
    Account,
    ApiKey,
    AuditRecord,
    BalanceEntry,
    DashboardSession,
    KeyStatus,
    ManagementKey,
    Payment,
    Subscription,
    SubscriptionStatus,
)
from agent_gateway.errors import Conflict, InvalidRequest, NotFound
from agent_gateway.keys.lifecycle import KeyLifecycle
from agent_gateway.keys.tokens import API_KEY_PREFIX, MANAGEMENT_KEY_PREFIX, DISPLAY_PREFIX, hash_token, looks_like
from agent_gateway.money import format_usdc, parse_usdc
from agent_gateway.subscriptions.service import SubscriptionView, list_subscriptions

log = logging.getLogger(__name__)

_WALLET = re.compile(r"^0x[0-9a-fA-F]{40}$")
_KEY_PREFIX = re.compile(r"^(sk|mk)_[A-Za-z0-9]{1,43}$")
SEARCH_LIMIT = 50
# A billion USDC: far above any real correction, far below the 64-bit balance column.
MAX_ADJUSTMENT_ATOMIC = 10**15


@dataclass(frozen=True)
class AccountDetail:
    account: Account
    subscriptions: list[SubscriptionView]
    management_keys: list[ManagementKey]
    balance_entries: list[BalanceEntry]
    payments: list[Payment]


_AMOUNT = re.compile(r"^[+-]?[0-9]{1,12}(\.[0-9]{1,6})?$")


def parse_adjustment(text: str) -> int:
    """A signed USDC decimal ("25.00" credits, "-25.00" debits) in atomic units, or 400. Plain
    decimals only: an exponent ("1e999999999") would make a billion-digit integer."""
    text = text.strip()
    if not _AMOUNT.match(text):
        raise InvalidRequest('amount is a decimal string in USDC with at most 6 decimals, "-" for a debit, '
                             'e.g. "25.00" or "-25.00".', code="invalid_amount")
    return (-1 if text.startswith("-") else 1) * parse_usdc(text.lstrip("+-"))


def _key_owners(query: str) -> Any:
    """The accounts owning a key written as a whole token, as shown (`sk_AbCd…wxyz`) or by prefix."""
    shown, _, last_four = query.partition("…")
    table: Any = ApiKey if shown.startswith(API_KEY_PREFIX) else ManagementKey
    kind = API_KEY_PREFIX if table is ApiKey else MANAGEMENT_KEY_PREFIX
    if looks_like(shown, kind):
        return select(table.account_id).where(table.key_hash == hash_token(shown))
    # Keys are stored with their first characters (prefix) and last four; a longer query is cut to it.
    conditions = [col(table.prefix).startswith(shown[:DISPLAY_PREFIX], autoescape=True)]
    if last_four:
        conditions.append(table.last_four == last_four)
    return select(table.account_id).where(*conditions)


class AccountAdmin:
    def __init__(self, db: Database, clock: Clock, keys: KeyLifecycle) -> None:
        self.db = db
        self.clock = clock
        self.keys = keys

    async def search(self, query: str) -> list[Account]:
        """By account id, wallet address, or key prefix (`sk_…`/`mk_…`, as keys are shown), else by name."""
        query = query.strip()
        if not query or len(query) > 200:
            raise InvalidRequest("Search for an account id, a wallet address, a key prefix or a name "
                                 "(1 to 200 characters).", code="invalid_query")
        async with self.db.transaction() as session:
            if _WALLET.match(query):
                where = col(Account.wallet_address) == query.lower()
            elif _KEY_PREFIX.match(query.partition("…")[0]):
                where = col(Account.id).in_(_key_owners(query))
            else:
                where = or_(col(Account.id) == query,
                            func.lower(col(Account.name)).contains(query.lower(), autoescape=True))
            rows = await session.scalars(select(Account).where(where).order_by(col(Account.created_at).desc())
                                         .limit(SEARCH_LIMIT))
            return list(rows)

    async def detail(self, account_id: str) -> AccountDetail:
        async with self.db.transaction() as session:
            account = await session.get(Account, account_id)
            if account is None:
                raise NotFound(f"No account {account_id!r}.", code="account_not_found")
            mkeys = list(await session.scalars(select(ManagementKey).where(col(ManagementKey.account_id) == account_id)
                                               .order_by(col(ManagementKey.created_at))))
            entries = list(await session.scalars(
                select(BalanceEntry).where(col(BalanceEntry.account_id) == account_id)
                .order_by(col(BalanceEntry.created_at).desc(), col(BalanceEntry.id).desc()).limit(100)))
            paid_by = [col(Payment.account_id) == account_id]
            if account.wallet_address:
                paid_by.append(col(Payment.payer) == account.wallet_address)
            payments = list(await session.scalars(select(Payment).where(or_(*paid_by))
                                                  .order_by(col(Payment.created_at).desc()).limit(100)))
        subscriptions = await list_subscriptions(self.db, account_id)
        return AccountDetail(account, subscriptions, mkeys, entries, payments)

    async def adjust_balance(self, account_id: str, amount_atomic: int, *, actor: str, reason: str) -> int:
        """Credit (amount > 0) or debit (amount < 0) the prepaid balance; a debit never takes it below
        zero. Returns the new balance."""
        if amount_atomic == 0 or abs(amount_atomic) > MAX_ADJUSTMENT_ATOMIC:
            raise InvalidRequest(f"The amount must not be zero (positive credits, negative debits) and at most "
                                 f"{format_usdc(MAX_ADJUSTMENT_ATOMIC)} USDC either way.", code="invalid_amount")
        now = self.clock.now()
        note = f"{'credited' if amount_atomic > 0 else 'debited'} by {actor}: {reason}"[:500]
        async with self.db.transaction() as session:
            account = await session.get(Account, account_id, with_for_update=True)
            if account is None:
                raise NotFound(f"No account {account_id!r}.", code="account_not_found")
            before = account.balance_atomic
            if amount_atomic > 0:
                balance = await add_credit(session, account_id, amount_atomic, note, now)
            else:
                if before + amount_atomic < 0:
                    raise Conflict(f"The balance is {format_usdc(before)} USDC; a debit of "
                                   f"{format_usdc(-amount_atomic)} USDC would take it below zero.",
                                   code="insufficient_balance")
                balance = await take_back_credit(session, account_id, -amount_atomic, note, now, kind="debit")
            audit.record(session, now, actor=actor, action="account.balance", target=f"account:{account_id}",
                         reason=reason, before={"balance": format_usdc(before)},
                         after={"balance": format_usdc(balance), "delta": format_usdc(amount_atomic)})
        log.info("account balance adjusted id=%s delta_atomic=%d by=%s", account_id, amount_atomic, actor)
        return balance

    async def disable(self, account_id: str, *, actor: str, reason: str) -> list[str]:
        """Disable the account and revoke its active keys at once, in every process; its dashboard
        sessions end. Returns the revoked keys' ids."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            account = await session.get(Account, account_id, with_for_update=True)
            if account is None:
                raise NotFound(f"No account {account_id!r}.", code="account_not_found")
            if account.disabled_at is not None:
                raise Conflict(f"Account {account_id} is already disabled.", code="account_disabled")
            # Key rows in id order, as every multi-key writer locks them (docs/decisions.md).
            key_ids = list((await session.execute(
                select(ApiKey.id).where(col(ApiKey.account_id) == account_id, col(ApiKey.status) == KeyStatus.ACTIVE,
                                        col(ApiKey.deleted_at).is_(None)).order_by(col(ApiKey.id)).with_for_update()
            )).scalars())
            if key_ids:
                await session.execute(update(ApiKey).where(col(ApiKey.id).in_(key_ids))
                                      .values(status=KeyStatus.DISABLED))
            await session.execute(update(DashboardSession).where(col(DashboardSession.account_id) == account_id,
                                                                 col(DashboardSession.ended_at).is_(None))
                                  .values(ended_at=now))
            account.disabled_at = now
            session.add(account)
            audit.record(session, now, actor=actor, action="account.disable", target=f"account:{account_id}",
                         reason=reason, before={"disabled": False},
                         after={"disabled": True, "keysDisabled": key_ids})
        await self.keys.end_revoked_keys(key_ids, "account_disabled")
        log.warning("account disabled id=%s by=%s keys=%s", account_id, actor, ",".join(key_ids) or "none")
        return key_ids

    async def enable(self, account_id: str, *, actor: str, reason: str) -> list[str]:
        """Enable the account again, and with it the keys its disabling switched off (those still
        disabled and on an active subscription or a pledge). Returns their ids."""
        now = self.clock.now()
        async with self.db.transaction() as session:
            account = await session.get(Account, account_id, with_for_update=True)
            if account is None:
                raise NotFound(f"No account {account_id!r}.", code="account_not_found")
            if account.disabled_at is None:
                raise Conflict(f"Account {account_id} is not disabled.", code="account_not_disabled")
            disabled = (await session.scalars(
                select(AuditRecord).where(col(AuditRecord.target) == f"account:{account_id}",
                                          col(AuditRecord.action) == "account.disable")
                .order_by(col(AuditRecord.created_at).desc(), col(AuditRecord.id).desc()).limit(1))).first()
            switched_off = list((disabled.after or {}).get("keysDisabled", [])) if disabled else []
            key_ids = list((await session.execute(
                select(ApiKey.id).join(Subscription, col(Subscription.id) == col(ApiKey.subscription_id))
                .where(col(ApiKey.id).in_(switched_off), col(ApiKey.status) == KeyStatus.DISABLED,
                       col(ApiKey.deleted_at).is_(None),
                       # A pledge's key is live too (its pool is still funding).
                       col(Subscription.status).in_((SubscriptionStatus.ACTIVE, SubscriptionStatus.PENDING)))
                .order_by(col(ApiKey.id)).with_for_update(of=ApiKey)
            )).scalars()) if switched_off else []
            if key_ids:
                await session.execute(update(ApiKey).where(col(ApiKey.id).in_(key_ids)).values(status=KeyStatus.ACTIVE))
            disabled_at = as_utc(account.disabled_at)
            account.disabled_at = None
            session.add(account)
            audit.record(session, now, actor=actor, action="account.enable", target=f"account:{account_id}",
                         reason=reason, before={"disabled": True, "disabledAt": disabled_at.isoformat()},
                         after={"disabled": False, "keysEnabled": key_ids})
        await self.keys.restore_keys(key_ids)
        log.info("account enabled id=%s by=%s keys=%s", account_id, actor, ",".join(key_ids) or "none")
        return key_ids
