"""Wallet sign-in: a server-issued challenge, signed by the wallet (EIP-191), returns a new
management key for the wallet's account, so a buyer who lost a 201 never loses the purchase."""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from eth_account import Account as EthAccount
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address
from sqlalchemy import select

from agent_gateway.clock import Clock, as_utc
from agent_gateway.db.engine import Database
from agent_gateway.db.models import Account, WalletChallenge, new_id
from agent_gateway.errors import AuthenticationError, InvalidRequest, NotFound
from agent_gateway.keys.management import new_management_key
from agent_gateway.keys.tokens import IssuedToken

log = logging.getLogger(__name__)
CHALLENGE_TTL = timedelta(minutes=10)


def normalize_address(address: object) -> str:
    if not isinstance(address, str) or not is_address(address):
        raise InvalidRequest("address must be a 0x-prefixed 20-byte hex address.", code="invalid_address")
    return address.lower()


async def issue_challenge(db: Database, clock: Clock, address: str, host: str) -> WalletChallenge:
    address = normalize_address(address)
    now = clock.now()
    nonce = secrets.token_hex(16)
    message = (
        f"{host} wants you to sign in with your wallet to agent_gateway.\n\n"
        f"Address: {to_checksum_address(address)}\nNonce: {nonce}\n"
        f"Issued At: {now.isoformat()}\nExpires At: {(now + CHALLENGE_TTL).isoformat()}"
    )
    challenge = WalletChallenge(id=new_id("chal"), address=address, message=message,
                                expires_at=now + CHALLENGE_TTL, created_at=now)
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
        account = (await session.scalars(select(Account).where(Account.wallet_address == challenge.address))).first()
        if account is None:
            raise NotFound("No account is bound to this wallet; buy a seat with it first.",
                           code="account_not_found")
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
