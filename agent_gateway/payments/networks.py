"""Per-chain defaults, keyed by chain id: confirmations before delivery, and the reorg horizon
past which a delivered payment is final. The network presets reuse this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChainDefaults:
    name: str
    confirmations: int  # blocks, counting the including one, before seats are delivered
    reorg_horizon_blocks: int  # depth after which a delivered payment is no longer re-checked


# Base and Base Sepolia are OP-stack rollups: the sequencer's blocks (2 s) are reorganised only by
# a sequencer fault or an L1 reorg, and are final once their batch is final on L1 (~15 min, 450
# blocks); 3 confirmations (~6 s) keeps delivery fast while the re-check job covers the rest.
# Ethereum mainnet: 12 s slots, finality after two epochs (64 blocks).
CHAIN_DEFAULTS: dict[int, ChainDefaults] = {
    1: ChainDefaults("ethereum", confirmations=3, reorg_horizon_blocks=64),
    8453: ChainDefaults("base", confirmations=3, reorg_horizon_blocks=450),
    84532: ChainDefaults("base-sepolia", confirmations=2, reorg_horizon_blocks=450),
    31337: ChainDefaults("anvil", confirmations=1, reorg_horizon_blocks=10),
}
# Any other chain: the cautious end.
UNKNOWN_CHAIN = ChainDefaults("unknown", confirmations=3, reorg_horizon_blocks=450)


def chain_defaults(chain_id: int | None) -> ChainDefaults:
    return CHAIN_DEFAULTS.get(chain_id, UNKNOWN_CHAIN) if chain_id is not None else UNKNOWN_CHAIN
