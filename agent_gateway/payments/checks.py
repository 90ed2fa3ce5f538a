"""The chain checks run before serving and by `agent-gateway chain check`: does the chain say what the
settings say (chain id, the token's EIP-712 domain and decimals, payTo, the relayer's gas)?

A check is a value (name, ok/warn/FAIL, what was expected and found), never an exception; a report
with a FAIL stops the start (`verify_chain`). The relayer-gas check is the only one that depends on
who settles: with a facilitator (it pays the gas) it is skipped, and the facilitator's `/supported`
must list exact payments on our network instead. With on-chain refunds configured
(AGW_REFUND_PRIVATE_KEY), the refund wallet's USDC and gas are reported too: a warning, never a
FAIL, when it cannot pay a refund (refunds then wait, and the operator's are refused with a 409)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from eth_abi import encode as abi_encode
from eth_utils import is_checksum_address, is_hex_address, keccak, to_checksum_address

from agent_gateway.errors import GatewayError, ServiceUnavailable
from agent_gateway.metrics import RELAYER_BALANCE, RELAYER_SETTLEMENTS_LEFT
from agent_gateway.money import USDC_DECIMALS, format_usdc
from agent_gateway.payments.chain import ChainAdapter
from agent_gateway.payments.facilitator import FacilitatorClient
from agent_gateway.settings import ChainSettings

log = logging.getLogger(__name__)

_EIP712_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
_ZERO_ADDRESS = "0x" + "00" * 20


class CheckStatus(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class ChainCheck:
    name: str
    status: CheckStatus
    detail: str

    def line(self) -> str:
        return f"{self.status.value:<4}  {self.name}: {self.detail}"


@dataclass(frozen=True)
class ChainReport:
    checks: tuple[ChainCheck, ...]

    @property
    def failed(self) -> tuple[ChainCheck, ...]:
        return tuple(check for check in self.checks if check.status is CheckStatus.FAIL)


class ChainMisconfigured(RuntimeError):
    """A start-up chain check failed: the gateway must not take payments with these settings."""

    def __init__(self, report: ChainReport) -> None:
        super().__init__("the chain does not match the settings: "
                         + "; ".join(f"{check.name}: {check.detail}" for check in report.failed))
        self.report = report


def _ok(name: str, detail: str) -> ChainCheck:
    return ChainCheck(name, CheckStatus.OK, detail)


def _fail(name: str, detail: str) -> ChainCheck:
    return ChainCheck(name, CheckStatus.FAIL, detail)


def _compare(name: str, setting: str, expected: object, found: object) -> ChainCheck:
    if expected == found:
        return _ok(name, repr(found))
    return _fail(name, f"expected {expected!r} ({setting}), found {found!r}")


def domain_separator(name: str, version: str, chain_id: int, token: str) -> bytes:
    """The EIP-712 domain separator a token with this domain computes (FiatToken v2.2, TestUSDC)."""
    return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "uint256", "address"],
                             [_EIP712_DOMAIN_TYPEHASH, keccak(text=name), keccak(text=version), chain_id,
                              to_checksum_address(token)]))


def format_eth(wei: int) -> str:
    return f"{Decimal(wei).scaleb(-18).normalize():f} ETH"


def check_pay_to(pay_to: str) -> ChainCheck:
    """payTo must be an address a transfer can reach: 20 bytes of hex, EIP-55 if mixed case, not zero."""
    if not is_hex_address(pay_to):
        return _fail("payTo", f"{pay_to!r} (AGW_PAY_TO) is not an address (0x and 40 hex digits)")
    if pay_to != pay_to.lower() and pay_to[2:] != pay_to[2:].upper() and not is_checksum_address(pay_to):
        return _fail("payTo", f"{pay_to} (AGW_PAY_TO) fails its EIP-55 checksum (a mistyped address?); "
                              f"expected {to_checksum_address(pay_to)} if the digits are right")
    if pay_to.lower() == _ZERO_ADDRESS:
        return _fail("payTo", "the zero address (AGW_PAY_TO) would burn every payment")
    return _ok("payTo", to_checksum_address(pay_to))


async def check_relayer_gas(adapter: ChainAdapter, warn_settlements: int) -> ChainCheck:
    """Whether the relayer can pay for one settlement (else FAIL) and for `warn_settlements` (else
    warn) at the current fees; sets the relayer gauges in /metrics."""
    balance, cost = await adapter.relayer_balance(), await adapter.settlement_cost()
    RELAYER_BALANCE.set(balance / 10**18)
    said = f"{adapter.relayer_address} holds {format_eth(balance)}"
    if cost == 0:  # a chain without fees (anvil --base-fee 0): nothing to run out of
        RELAYER_SETTLEMENTS_LEFT.set(float("inf"))
        return _ok("relayer gas", f"{said}; fees are zero")
    left = balance // cost
    RELAYER_SETTLEMENTS_LEFT.set(left)
    if left < 1:
        return _fail("relayer gas", f"{said}; one settlement may cost up to {format_eth(cost)} at the current "
                                    f"fees: fund the relayer (AGW_RELAYER_KEY's address)")
    enough = f"{said}, {left} settlements at up to {format_eth(cost)} each"
    if left < warn_settlements:
        return ChainCheck("relayer gas", CheckStatus.WARN,
                          f"{enough}: fewer than AGW_RELAYER_WARN_SETTLEMENTS={warn_settlements}; fund it soon")
    return _ok("relayer gas", enough)


async def check_refund_wallet(wallet: ChainAdapter) -> ChainCheck:
    """The refund wallet (AGW_REFUND_PRIVATE_KEY): its USDC and whether it has gas for a refund."""
    address = wallet.relayer_address
    usdc, native, cost = (await wallet.balance_of(address), await wallet.native_balance(address),
                          await wallet.transfer_cost())
    said = f"{address} holds {format_usdc(usdc)} USDC and {format_eth(native)}"
    if usdc == 0 or (cost and native < cost):
        return ChainCheck("refund wallet", CheckStatus.WARN,
                          f"{said}: on-chain refunds wait (and the operator's are refused) until it holds USDC "
                          f"and gas (one refund may cost up to {format_eth(cost)})")
    left = f"gas for {native // cost} refunds" if cost else "fees are zero"
    return _ok("refund wallet", f"{said}; {left}")


async def _token_checks(chain: ChainSettings, adapter: ChainAdapter) -> list[ChainCheck]:
    facts = await adapter.token_facts()
    if not facts.has_code:
        return [_fail("token", f"no contract at {adapter.token_address} (AGW_USDC_ADDRESS) on chain {chain.chain_id}")]
    checks = [_compare("token name", "AGW_USDC_NAME", chain.usdc_name, facts.name)]
    if facts.version is not None:
        checks.append(_compare("token version", "AGW_USDC_VERSION", chain.usdc_version, facts.version))
    if facts.domain_separator is not None:
        # What signatures are checked against: name, version, chain id and address in one hash.
        expected = domain_separator(chain.usdc_name, chain.usdc_version, chain.chain_id, chain.usdc_address)
        checks.append(_ok("token domain", "DOMAIN_SEPARATOR() matches the name, version, chain id and address")
                      if facts.domain_separator == expected else
                      _fail("token domain", f"DOMAIN_SEPARATOR() is 0x{facts.domain_separator.hex()}, expected "
                                            f"0x{expected.hex()} (AGW_USDC_NAME, AGW_USDC_VERSION, chain id, address)"))
    elif facts.version is None:
        checks.append(_fail("token version", "the token has neither version() nor DOMAIN_SEPARATOR(): "
                                             "its EIP-712 domain cannot be checked"))
    checks.append(_compare("token decimals", "USDC has 6", USDC_DECIMALS, facts.decimals))
    return checks


async def check_facilitator(chain: ChainSettings, facilitator: FacilitatorClient) -> ChainCheck:
    """The facilitator's `/supported` lists exact payments (x402 v2) on our network."""
    try:
        kinds = await facilitator.supported()
    except GatewayError as exc:
        return _fail("facilitator", f"{facilitator.url}/supported: {exc.message} (AGW_FACILITATOR_URL)")
    if (2, "exact", chain.network) in kinds:
        return ChainCheck("facilitator", CheckStatus.OK, f"{facilitator.url} settles exact on {chain.network}")
    usable = ", ".join(sorted(n for version, scheme, n in kinds if version == 2 and scheme == "exact")) or "none"
    return _fail("facilitator", f"expected exact on {chain.network} in {facilitator.url}/supported, "
                                f"found exact v2 on: {usable} (AGW_FACILITATOR_URL)")


async def run_chain_checks(chain: ChainSettings, adapter: ChainAdapter, *, own_settlement: bool = True,
                           warn_settlements: int = 100, facilitator: FacilitatorClient | None = None,
                           refund_wallet: ChainAdapter | None = None) -> ChainReport:
    """Every check, in order; the chain ones stop at the first node failure (reported as a FAIL).

    own_settlement: the gateway signs and pays for its settlements with AGW_RELAYER_KEY. False when
    a facilitator settles: then the relayer's gas is not ours to check, and the facilitator (when
    given) is asked what it supports."""
    checks = [check_pay_to(chain.pay_to)]
    if facilitator is not None:
        checks.append(await check_facilitator(chain, facilitator))
    try:
        found = await adapter.node_chain_id()
        checks.append(_compare("chain id", "AGW_CHAIN_ID or AGW_NETWORK", chain.chain_id, found))
        if found == chain.chain_id:
            checks += await _token_checks(chain, adapter)
            if own_settlement:
                checks.append(await check_relayer_gas(adapter, warn_settlements))
            if refund_wallet is not None:
                checks.append(await check_refund_wallet(refund_wallet))
    except ServiceUnavailable as exc:
        checks.append(_fail("RPC node", f"{exc.message} (AGW_CHAIN_RPC_URL)"))
    return ChainReport(tuple(checks))


async def verify_chain(chain: ChainSettings, adapter: ChainAdapter, *, own_settlement: bool = True,
                       warn_settlements: int = 100, refund_wallet: ChainAdapter | None = None) -> ChainReport:
    """Run the checks before serving: log each one, raise ChainMisconfigured if any failed."""
    report = await run_chain_checks(chain, adapter, own_settlement=own_settlement, warn_settlements=warn_settlements,
                                    refund_wallet=refund_wallet)
    levels = {CheckStatus.OK: logging.INFO, CheckStatus.WARN: logging.WARNING, CheckStatus.FAIL: logging.ERROR}
    for check in report.checks:
        log.log(levels[check.status], "chain check %s", check.line())
    if report.failed:
        raise ChainMisconfigured(report)
    return report


class RelayerGasWatch:
    """A background pass: refresh the relayer gauges, and log when its gas runs low or out (once per
    change, not every pass)."""

    def __init__(self, adapter: ChainAdapter, warn_settlements: int) -> None:
        self.adapter = adapter
        self.warn_settlements = warn_settlements
        self._last = CheckStatus.OK

    async def __call__(self) -> ChainCheck:
        check = await check_relayer_gas(self.adapter, self.warn_settlements)
        if check.status is not self._last:
            level = logging.INFO if check.status is CheckStatus.OK else logging.WARNING
            log.log(level, "relayer gas is now %s: %s", check.status.value, check.detail)
            self._last = check.status
        return check
