"""Accounts: create one with its first management key, credit its prepaid USDC balance."""

from __future__ import annotations

import logging

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Account, BalanceEntry, new_id
from agent_gateway.errors import InvalidRequest, NotFound, PermissionDenied
from agent_gateway.keys.management import new_management_key
from agent_gateway.keys.tokens import IssuedToken

log = logging.getLogger(__name__)


async def create_account(db: Database, clock: Clock, name: str) -> tuple[Account, IssuedToken]:
    """A new account and its first management key; the plaintext key is returned once."""
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidRequest("An account name must be 1 to 200 characters.", code="invalid_name")
    now = clock.now()
    account = Account(id=new_id("acct"), name=name, created_at=now)
    async with db.transaction() as session:
        session.add(account)
        await session.flush()
        key, token = new_management_key(account.id, "initial", now)
        session.add(key)
    log.info("account created id=%s", account.id)
    return account, token


async def credit_account(
    db: Database, clock: Clock, account_id: str, amount_atomic: int, note: str = ""
) -> int:
    """Add prepaid USDC; returns the new balance in atomic units."""
    if amount_atomic <= 0:
        raise InvalidRequest("The amount to credit must be above zero.", code="invalid_amount")
    async with db.transaction() as session:
        balance = await add_credit(session, account_id, amount_atomic, note, clock.now())
    log.info("account credited id=%s amount_atomic=%d", account_id, amount_atomic)
    return balance


async def add_credit(session: AsyncSession, account_id: str, amount_atomic: int, note: str, now: datetime,
                     kind: str = "credit") -> int:
    """Within the caller's transaction: raise the balance atomically (no read-modify-write that a
    concurrent credit or charge could overwrite) and journal it under `kind`; returns the new balance."""
    result = await session.execute(
        update(Account).where(col(Account.id) == account_id)
        .values(balance_atomic=Account.balance_atomic + amount_atomic).returning(col(Account.balance_atomic))
    )
    balance = result.scalar_one_or_none()
    if balance is None:
        raise NotFound(f"No account {account_id!r}.", code="account_not_found")
    session.add(BalanceEntry(id=new_id("bal"), account_id=account_id, delta_atomic=amount_atomic, kind=kind,
                             note=note, created_at=now))
    return balance


async def take_back_credit(session: AsyncSession, account_id: str, amount_atomic: int, note: str,
                           now: datetime, kind: str = "reversal") -> int:
    """Within the caller's transaction: reverse a credit whose money never stayed (a reorganised
    transfer). The balance may go below zero: that is what the account owes, on the record."""
    result = await session.execute(
        update(Account).where(col(Account.id) == account_id)
        .values(balance_atomic=Account.balance_atomic - amount_atomic).returning(col(Account.balance_atomic))
    )
    balance = result.scalar_one_or_none()
    if balance is None:
        raise NotFound(f"No account {account_id!r}.", code="account_not_found")
    session.add(BalanceEntry(id=new_id("bal"), account_id=account_id, delta_atomic=-amount_atomic, kind=kind,
                             note=note, created_at=now))
    return balance


async def get_account(db: Database, account_id: str) -> Account:
    async with db.transaction() as session:
        account = await session.get(Account, account_id)
    if account is None:
        raise NotFound(f"No account {account_id!r}.", code="account_not_found")
    return account


def account_disabled_error(account_id: str) -> PermissionDenied:
    return PermissionDenied(f"Account {account_id} is disabled by the operator; contact them.", code="account_disabled")


async def ensure_buyer_enabled(db: Database, *, account_id: str | None = None, wallet: str | None = None) -> None:
    """403 when the buying account, or the account bound to the paying wallet, is disabled: checked
    before a challenge and before any settlement, so no money is taken for seats it cannot have."""
    if account_id is None and wallet is None:
        return
    query = select(Account.id).where(col(Account.disabled_at).is_not(None))
    query = query.where(col(Account.id) == account_id) if account_id is not None else \
        query.where(col(Account.wallet_address) == (wallet or "").lower())
    async with db.transaction() as session:
        disabled = (await session.execute(query.limit(1))).scalar()
    if disabled is not None:
        raise account_disabled_error(disabled)
