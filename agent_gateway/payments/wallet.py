"""Wallet sign-in: a server-issued EIP-4361 (Sign-In with Ethereum) message bound to the gateway's
public URL, signed by the wallet (EIP-191), returns a new management key for the wallet's account,
so a buyer who lost a 201 never loses the purchase."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address
from sqlalchemy import delete, select

from sqlmodel import col

from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database, rows_changed
from agent_gateway.db.models import Account, WalletChallenge, new_id
from agent_gateway.accounts.service import account_disabled_error
from agent_gateway.errors import AuthenticationError, InvalidRequest, NotFound
from agent_gateway.keys.management import new_management_key
from agent_gateway.keys.tokens import IssuedToken

log = logging.getLogger(__name__)
CHALLENGE_TTL = timedelta(minutes=10)
SIGN_IN_STATEMENT = "Sign in to agent_gateway to get a new management key for this wallet's account."
# EIP-4361 needs a chain id; a deployment without payments has none of its own, so its messages
# name Ethereum mainnet (1), what wallets assume for an account bound to no particular chain.
CHAIN_ID_WITHOUT_PAYMENTS = 1


@dataclass(frozen=True)
class SiweMessage:
    """An EIP-4361 message. `text()` lays it out exactly as the spec's ABNF does, so any SIWE
    wallet or library shows and checks it; the gateway only ever renders its own messages."""

    domain: str  # RFC 3986 authority of the public URL: host[:port]
    address: str  # EIP-55 checksummed
    statement: str
    uri: str
    chain_id: int
    nonce: str  # alphanumeric, at least 8 characters
    issued_at: datetime
    expiration_time: datetime
    version: str = "1"

    def text(self) -> str:
        return (
            f"{self.domain} wants you to sign in with your Ethereum account:\n"
            f"{self.address}\n\n"
            f"{self.statement}\n\n"
            f"URI: {self.uri}\n"
            f"Version: {self.version}\n"
            f"Chain ID: {self.chain_id}\n"
            f"Nonce: {self.nonce}\n"
            f"Issued At: {rfc3339(self.issued_at)}\n"
            f"Expiration Time: {rfc3339(self.expiration_time)}"
        )


def sign_in_chain_id(chain_id: int | None, payments_enabled: bool) -> int:
    """The deployment's chain when it takes payments, else CHAIN_ID_WITHOUT_PAYMENTS."""
    return chain_id if payments_enabled and chain_id is not None else CHAIN_ID_WITHOUT_PAYMENTS


def rfc3339(moment: datetime) -> str:
    """UTC, milliseconds, "Z" — the form SIWE libraries write (JavaScript's toISOString)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sign_in_message(public_url: str, chain_id: int, address: str, nonce: str, issued_at: datetime) -> SiweMessage:
    """The message a wallet signs to sign in here: domain and URI come from AGW_PUBLIC_URL only."""
    return SiweMessage(
        domain=urlsplit(public_url).netloc, address=to_checksum_address(address), statement=SIGN_IN_STATEMENT,
        uri=public_url, chain_id=chain_id, nonce=nonce, issued_at=issued_at,
        expiration_time=issued_at + CHALLENGE_TTL,
    )


def normalize_address(address: object) -> str:
    if not isinstance(address, str) or not is_address(address):
        raise InvalidRequest("address must be a 0x-prefixed 20-byte hex address.", code="invalid_address")
    return address.lower()


async def issue_challenge(db: Database, clock: Clock, address: str, public_url: str,
                          chain_id: int) -> WalletChallenge:
    """Store a fresh SIWE message for `address`; the client's Host header has no part in it."""
    address = normalize_address(address)
    # Milliseconds, as in the message, so the stored expiry is exactly the one the wallet signed.
    now = clock.now()
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    message = sign_in_message(public_url, chain_id, address, secrets.token_hex(16), now)
    challenge = WalletChallenge(id=new_id("chal"), address=address, message=message.text(),
                                expires_at=message.expiration_time, created_at=now)
    async with db.transaction() as session:
        session.add(challenge)
    return challenge


async def sign_in(db: Database, clock: Clock, challenge_id: str, signature: str) -> tuple[Account, IssuedToken]:
    """Verify the signed challenge (once, before it expires) and mint a management key."""
    now = clock.now()
    async with db.transaction() as session:
        challenge = await session.get(WalletChallenge, challenge_id, with_for_update=True)
        if challenge is None:
            raise NotFound("No such sign-in challenge; ask for a new one.", code="challenge_not_found")
        if challenge.used_at is not None or as_utc(challenge.expires_at) <= now:
            raise AuthenticationError("This challenge was used or has expired; ask for a new one.",
                                      code="challenge_expired")
        signer = recover_personal_signer(challenge.message, signature)
        if signer != challenge.address:
            raise AuthenticationError("The signature does not come from this wallet.", code="invalid_signature")
        account = (await session.scalars(select(Account).where(col(Account.wallet_address) == challenge.address))).first()
        if account is None:
            raise NotFound("No account is bound to this wallet; buy a seat with it first.",
                           code="account_not_found")
        if account.disabled_at is not None:
            raise account_disabled_error(account.id)
        challenge.used_at = now  # the row is locked: no other sign-in can use it meanwhile
        session.add(challenge)
        key, token = new_management_key(account.id, "wallet sign-in", now)
        session.add(key)
    log.info("wallet sign-in account=%s", account.id)
    return account, token


def recover_personal_signer(message: str, signature: str) -> str | None:
    """The lowercase address that signed `message` (EIP-191), or None for a malformed signature."""
    try:
        return EthAccount.recover_message(encode_defunct(text=message), signature=signature).lower()
    except Exception:  # malformed signatures raise assorted errors from eth_keys and eth_utils
        return None


async def delete_stale_challenges(db: Database, before: datetime) -> int:
    """Forget sign-in challenges that expired before `before` (used or not): one can no longer
    sign anyone in, and anyone may ask for them, so kept for ever they would only grow the table."""
    async with db.transaction() as session:
        result = await session.execute(delete(WalletChallenge).where(col(WalletChallenge.expires_at) < before))
    return rows_changed(result)
