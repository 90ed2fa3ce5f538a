"""What the gateway knows about each network: per-chain defaults keyed by chain id (confirmations,
reorg horizon) and the AGW_NETWORK presets (chain id, USDC address and EIP-712 domain)."""

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


@dataclass(frozen=True)
class NetworkPreset:
    """The chain settings one `AGW_NETWORK` name stands for. The token address and EIP-712 domain
    are the x402 SDK's (`x402.mechanisms.evm.default_assets`; a unit test holds them equal), so a
    payer using the SDK's defaults signs for exactly the domain we verify against."""

    chain_id: int
    usdc_address: str
    usdc_name: str
    usdc_version: str
    rpc_url: str | None = None  # only a local chain has an address everyone shares

    @property
    def confirmations(self) -> int:
        return chain_defaults(self.chain_id).confirmations


# Base and Base Sepolia USDC differ in their EIP-712 name ("USD Coin" vs "USDC"): a payment signed
# with the other one recovers to a stranger and is refused, so the name is part of the preset.
# anvil: TestUSDC as the dev chain deploys it (contracts_abi/TestUSDC.sol; the first contract of
# anvil's first account, so its address is the same on every fresh anvil), on anvil's default port.
NETWORK_PRESETS: dict[str, NetworkPreset] = {
    "base": NetworkPreset(8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2"),
    "base-sepolia": NetworkPreset(84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
    "anvil": NetworkPreset(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", "USD Coin", "2",
                           rpc_url="http://127.0.0.1:8545"),
}
