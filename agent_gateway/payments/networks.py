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
# a sequencer fault or an L1 reorg, and are final once the L1 block holding their batch is final:
# the batcher posts every few minutes and L1 finality takes another ~13 min, so ~25 min in the
# worst common case; the horizon is 30 min (900 blocks). 3 confirmations (~6 s; 2 on the testnet)
# keep delivery fast while the re-check job covers the rest.
# Ethereum mainnet: 12 s slots; a block is finalized two epochs after its own epoch is justified,
# i.e. 64 to 95 slots later: 96 blocks.
# anvil: reorganised only on request (anvil_reorg); a small horizon keeps the re-check cheap.
CHAIN_DEFAULTS: dict[int, ChainDefaults] = {
    1: ChainDefaults("ethereum", confirmations=3, reorg_horizon_blocks=96),
    8453: ChainDefaults("base", confirmations=3, reorg_horizon_blocks=900),
    84532: ChainDefaults("base-sepolia", confirmations=2, reorg_horizon_blocks=900),
    31337: ChainDefaults("anvil", confirmations=1, reorg_horizon_blocks=10),
}
# Any other chain: the cautious end.
UNKNOWN_CHAIN = ChainDefaults("unknown", confirmations=3, reorg_horizon_blocks=900)


def chain_defaults(chain_id: int | None) -> ChainDefaults:
    return CHAIN_DEFAULTS.get(chain_id, UNKNOWN_CHAIN) if chain_id is not None else UNKNOWN_CHAIN
