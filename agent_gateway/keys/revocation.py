"""Revoking keys everywhere at once: a lease tombstone refuses new requests in every process,
and the revocation bus ends running streams and drops cached key records."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from agent_gateway.proxy.leases import Leases
from agent_gateway.proxy.revocations import RevocationBus

log = logging.getLogger(__name__)

RESTORED = "restored"


class KeyRevoker:
    def __init__(self, leases: Leases, bus: RevocationBus) -> None:
        self._leases = leases
        self._bus = bus

    async def revoke(self, key_ids: Iterable[str], reason: str) -> None:
        # Called after the database change committed: the tombstone covers the window in which
        # another process may still hold the key in its cache.
        for key_id in key_ids:
            await self._leases.revoke(key_id)
            await self._bus.publish(key_id, reason)
            log.info("api key revoked everywhere id=%s reason=%s", key_id, reason)

    async def restore(self, key_id: str) -> None:
        await self._leases.restore(key_id)
        await self._bus.publish(key_id, RESTORED)
