"""The key lifecycle use cases: each commits its change, then revokes or restores the key everywhere.

The API and the dashboard both call these; neither composes "commit, then revoke" itself."""

from __future__ import annotations

from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.keys import api_keys
from agent_gateway.keys.api_keys import KeyView
from agent_gateway.keys.revocation import KeyRevoker


class KeyLifecycle:
    def __init__(self, db: Database, clock: Clock, revoker: KeyRevoker) -> None:
        self._db = db
        self._clock = clock
        self._revoker = revoker

    async def disable_key(self, account_id: str, key_id: str) -> KeyView:
        view = await api_keys.disable_key(self._db, account_id, key_id)
        await self._revoker.revoke([view.key.id], "disabled")
        return view

    async def enable_key(self, account_id: str, key_id: str) -> KeyView:
        view = await api_keys.enable_key(self._db, account_id, key_id)
        await self._revoker.restore(view.key.id)
        return view

    async def delete_key(self, account_id: str, key_id: str) -> None:
        await api_keys.delete_key(self._db, self._clock, account_id, key_id)
        await self._revoker.revoke([key_id], "deleted")

    async def end_revoked_keys(self, key_ids: list[str], reason: str) -> None:
        """Keys a domain transaction has just revoked (an expired subscription, a payment
        reorganised away): end them in every process at once, running streams included."""
        await self._revoker.revoke(key_ids, reason)

    async def restore_keys(self, key_ids: list[str]) -> None:
        """Keys a domain transaction has just made active again (an account enabled): lift their
        tombstones and tell every process."""
        for key_id in key_ids:
            await self._revoker.restore(key_id)
