"""The chain adapter: the gateway's only web3 user; reads facts, signs and sends settlements, reads receipts."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar, cast

import httpx
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils import keccak, to_checksum_address
from web3 import AsyncWeb3
from web3.exceptions import (
    BadFunctionCallOutput,
    BadResponseFormat,
    ContractLogicError,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)
from web3.providers.async_base import AsyncJSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse, TxParams

from agent_gateway.errors import InvalidRequest, PaymentRequired, ServiceUnavailable
from agent_gateway.payments.wire import ExactPayment

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_ABI_FILE = "usdc_abi.json"  # package data of agent_gateway.payments
_TRANSFER_WITH_AUTHORIZATION = (
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
_TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")
_ERC20_TRANSFER_SELECTOR = keccak(text="transfer(address,uint256)")[:4]
# EIP-3009: the token marks a nonce used (a transfer or receive with authorization) or canceled.
_AUTHORIZATION_USED_TOPIC = keccak(text="AuthorizationUsed(address,bytes32)")
_AUTHORIZATION_CANCELED_TOPIC = keccak(text="AuthorizationCanceled(address,bytes32)")
GAS_HEADROOM_PCT = 20
# The gas limit one settlement may be signed with, to judge the relayer's balance (sending estimates
# each one). Our TestUSDC estimates ~88,000 (measured on anvil), real USDC (FiatToken behind its
# proxy) is of the same order; this is GAS_HEADROOM_PCT over 100,000.
SETTLEMENT_GAS_BUDGET = 120_000
# The gas limit one refund (an ERC-20 `transfer` from the refund wallet) may be signed with, to judge
# the refund wallet's gas: a USDC transfer estimates ~35,000-60,000 (a new holder's slot costs more).
TRANSFER_GAS_BUDGET = 80_000
# Node messages for "I already have this exact transaction" (geth, anvil, erigon/nethermind).
_ALREADY_KNOWN = ("already known", "already imported", "known transaction")
_NONCE_CONFLICT = ("nonce too low", "replacement transaction underpriced", "nonce has already been used")


@dataclass(frozen=True)
class SignedSettlement:
    """A signed `transferWithAuthorization` transaction: persist it, then broadcast it (any number of times)."""

    tx_hash: str  # 0x + 64 lowercase hex
    raw_tx: str  # 0x-hex of the signed envelope
    nonce: int  # the relayer's account nonce it uses


@dataclass(frozen=True)
class Transfer:
    """An ERC-20 transfer of our token: a decoded `Transfer` log, or a decoded `transfer(...)` call."""

    token: str
    from_: str
    to: str
    value: int


@dataclass(frozen=True)
class AuthorizationUse:
    """A decoded `AuthorizationUsed(authorizer, nonce)` log of our token: an EIP-3009 authorization
    executed in the transaction (FiatToken emits it right before that authorization's Transfer)."""

    authorizer: str
    nonce: str  # 0x + 64 lowercase hex
    # The Transfer log right after it: what the authorization moved. None if none follows.
    transfer: Transfer | None = None


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    ok: bool  # status == 1
    block_number: int
    confirmations: int  # latest - block_number + 1
    transfers: tuple[Transfer, ...]  # Transfer logs emitted by our token only
    authorizations_used: tuple[AuthorizationUse, ...] = ()  # AuthorizationUsed logs of our token

    def authorization_transfer(self, authorizer: str, nonce: str) -> Transfer | None:
        """What the authorization (authorizer, nonce) moved in this transaction, if it was executed
        here. Not any Transfer of the payer: one transaction can execute several authorizations of
        one payer, and the payer can sign two under one nonce (the one it gave us, and another for
        one atomic unit), so only the Transfer its own execution emitted is its payment."""
        return next((u.transfer for u in self.authorizations_used
                     if u.authorizer.lower() == authorizer.lower() and u.nonce == nonce.lower()), None)

    def authorizer_in_it(self, address: str) -> bool:
        """Whether any authorization of `address` was executed in this transaction."""
        return any(u.authorizer.lower() == address.lower() for u in self.authorizations_used)


@dataclass(frozen=True)
class TxInfo:
    tx_hash: str
    from_: str
    to: str | None  # None for a contract creation
    nonce: int
    block_number: int | None  # None while pending
    transfer: Transfer | None  # the call decoded, when it is our token's transfer(to, value)


@dataclass(frozen=True)
class TokenFacts:
    """What the token contract says about itself; None where it has no such function (or no code)."""

    has_code: bool
    name: str | None
    version: str | None
    decimals: int | None
    domain_separator: bytes | None


@dataclass(frozen=True)
class AuthorizationEvent:
    """The mined transaction that used (a Transfer) or canceled an EIP-3009 authorization."""

    kind: str  # used | canceled
    tx_hash: str
    block_number: int


class SettlementWouldRevert(PaymentRequired):
    """The node refuses to estimate the settlement: it would revert (raced since the simulation)."""

    code = "settlement_would_fail"

    def __init__(self, reason: str) -> None:
        super().__init__(f"The settlement would fail on-chain: {reason}.")
        self.reason = reason


@lru_cache(maxsize=1)
def load_token_abi() -> tuple[dict[str, Any], ...]:
    """The USDC ABI fragments we call, shipped as package data beside this module."""
    return tuple(json.loads(resources.files("agent_gateway.payments").joinpath(TOKEN_ABI_FILE).read_text(encoding="utf-8")))


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """65 bytes r ‖ s ‖ v -> (v, r, s), with v 0/1 lifted to 27/28 as the token's ecrecover wants."""
    if len(signature) != 65:
        raise ValueError("an EOA signature is 65 bytes")
    v = signature[64]
    return (v + 27 if v < 27 else v), signature[:32], signature[32:64]


def _hash_hex(value: str) -> HexStr:
    if not (isinstance(value, str) and len(value) == 66 and value[:2] == "0x"):
        raise InvalidRequest("A transaction hash is 0x followed by 32 bytes of hex.", code="invalid_tx_hash")
    try:
        bytes.fromhex(value[2:])
    except ValueError:
        raise InvalidRequest("A transaction hash is 0x followed by 32 bytes of hex.", code="invalid_tx_hash") from None
    return HexStr(value.lower())


def _rpc_message(exc: Web3RPCError) -> str:
    # The JSON-RPC error object's message, never the transport text (which can carry the RPC URL).
    response = getattr(exc, "rpc_response", None) or {}
    error = response.get("error") if isinstance(response, dict) else None
    return str(error.get("message", "")) if isinstance(error, dict) else str(exc.message or "")


def _max_fee_per_gas(block: Any, tip: int) -> int:
    # EIP-1559 only (every x402 network is post-London). Twice the base fee survives six full
    # blocks of +12.5% before the settlement stalls; the tip is the node's suggestion.
    return 2 * int(block["baseFeePerGas"]) + int(tip)


def _revert_reason(exc: ContractLogicError) -> str:
    text = exc.message if isinstance(exc.message, str) else ""
    return text.removeprefix("execution reverted").lstrip(": ").strip() or "execution reverted"


class NodeProvider(AsyncJSONBaseProvider):
    """JSON-RPC over HTTP to the chain node, with an httpx client of its own.

    web3's AsyncHTTPProvider takes a lock on every request, one `threading.Lock` shared by every
    provider in the process, acquired through a thread pool; a request cancelled while waiting
    for it (our timeout, a client that went away, a shutdown) can leave it held for good, and then
    every chain call in the process, async or sync, waits for ever (reproduced: a dozen calls at
    once, half of them cancelled, held it within a few rounds). This provider takes no lock. Its
    client belongs to the event loop it was made in; used from another, it makes a new one."""

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__()
        self.endpoint_uri = url
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, headers={"Content-Type": "application/json"})
            self._client_loop = loop
        return self._client

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        response = await self._http().post(self.endpoint_uri, content=self.encode_rpc_request(method, params))
        response.raise_for_status()
        answer = self.decode_rpc_response(response.content)
        if not isinstance(answer, dict):  # web3 would fail on it with an AttributeError
            raise BadResponseFormat(f"the node's answer to {method} is not a JSON-RPC response object")
        return answer

    async def disconnect(self) -> None:
        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._client_loop = None


class ChainAdapter:
    """Async access to one chain, one EIP-3009 token and, for own settlement, one relayer key
    (without one, as when a facilitator settles, it reads and never signs).

    Every web3, HTTP or timeout failure leaves as `ServiceUnavailable(code="chain_unavailable")`;
    a settlement that would revert is a reason text (`simulate_settlement`), not an exception."""

    def __init__(self, rpc_url: str, chain_id: int, token_address: str, relayer_key: str | None,
                 request_timeout_s: float = 10) -> None:
        self.chain_id = chain_id
        self.token_address = to_checksum_address(token_address)
        self._relayer_account = Account.from_key(relayer_key) if relayer_key is not None else None
        self._timeout_s = request_timeout_s
        # No retries and no middleware: a dead node must fail within one timeout, and every
        # request we make is explicit (the default middleware adds eth_chainId round trips).
        self._w3 = AsyncWeb3(NodeProvider(rpc_url, request_timeout_s), middleware=[])
        self._token = self._w3.eth.contract(address=self.token_address, abi=list(load_token_abi()))
        self._nonce_lock = asyncio.Lock()
        self._next_nonce: int | None = None
        self._holes: set[int] = set()  # relayer nonces handed out, then released unsent

    @property
    def _relayer(self) -> LocalAccount:
        if self._relayer_account is None:
            raise RuntimeError("this chain adapter has no relayer key: settlements go through the facilitator")
        return self._relayer_account

    @property
    def relayer_address(self) -> ChecksumAddress:
        return self._relayer.address

    @property
    def has_relayer(self) -> bool:
        """False when a facilitator settles (no relayer key): then there is no relayer to report on."""
        return self._relayer_account is not None

    async def close(self) -> None:
        await self._w3.provider.disconnect()

    async def _rpc(self, what: str, call: Awaitable[T], passthrough: tuple[type[BaseException], ...] = ()) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except passthrough:
            raise
        except Web3RPCError as exc:
            raise ServiceUnavailable(f"The chain node refused {what}: {_rpc_message(exc)}",
                                     code="chain_unavailable") from exc
        except (TimeoutError, httpx.HTTPError, OSError, Web3Exception, ValueError) as exc:
            raise ServiceUnavailable(f"The chain node is unavailable ({what}: {type(exc).__name__}).",
                                     code="chain_unavailable") from exc

    # --- facts ---------------------------------------------------------------------------------

    async def chain_now(self) -> int:
        """The chain's clock: the timestamp of the block a transaction sent now would land in, at
        the earliest. That is the pending block's where the node builds one (anvil: wall time, so an
        idle dev chain does not lag), else the latest block's."""
        try:
            block = await self._rpc("the pending block", self._w3.eth.get_block("pending"),
                                    passthrough=(Web3RPCError,))
        except Web3RPCError:
            block = None
        if not block:
            block = await self._rpc("the latest block", self._w3.eth.get_block("latest"))
        return int(block["timestamp"])  # type: ignore[index]  # get_block returns a block or raises; web3 types it Optional

    async def node_chain_id(self) -> int:
        """The chain id the RPC node reports (eth_chainId)."""
        return int(await self._rpc("the chain id", self._w3.eth.chain_id))

    async def token_facts(self) -> TokenFacts:
        """The token's name(), version(), decimals() and DOMAIN_SEPARATOR(), each None if it reverts."""
        code = await self._rpc("the token's code", self._w3.eth.get_code(self.token_address))
        if not code:
            return TokenFacts(has_code=False, name=None, version=None, decimals=None, domain_separator=None)
        functions = self._token.functions
        name, version, decimals, separator = [await self._optional_call(what, call) for what, call in (
            ("name()", functions.name()), ("version()", functions.version()),
            ("decimals()", functions.decimals()), ("DOMAIN_SEPARATOR()", functions.DOMAIN_SEPARATOR()))]
        return TokenFacts(has_code=True, name=name, version=version,
                          decimals=None if decimals is None else int(decimals),
                          domain_separator=None if separator is None else bytes(separator))

    async def _optional_call(self, what: str, function: Any) -> Any:
        try:
            return await self._rpc(what, function.call(), passthrough=(ContractLogicError, BadFunctionCallOutput))
        except (ContractLogicError, BadFunctionCallOutput):
            return None

    async def relayer_balance(self) -> int:
        """The relayer's native balance (wei): what pays the settlements' gas."""
        return int(await self._rpc("the relayer balance", self._w3.eth.get_balance(self.relayer_address)))

    async def settlement_cost(self) -> int:
        """The most one settlement can cost the relayer at the current fees (wei): the node accepts a
        transaction only if the sender holds its gas limit times its max fee per gas."""
        block, tip = await asyncio.gather(self._rpc("the latest block", self._w3.eth.get_block("latest")),
                                          self._rpc("the priority fee", self._w3.eth.max_priority_fee))
        return SETTLEMENT_GAS_BUDGET * _max_fee_per_gas(block, tip)

    async def transfer_cost(self) -> int:
        """The most one refund transfer can cost its sender at the current fees (wei)."""
        block, tip = await asyncio.gather(self._rpc("the latest block", self._w3.eth.get_block("latest")),
                                          self._rpc("the priority fee", self._w3.eth.max_priority_fee))
        return TRANSFER_GAS_BUDGET * _max_fee_per_gas(block, tip)

    async def authorization_used(self, authorizer: str, nonce_hex: str) -> bool:
        call = self._token.functions.authorizationState(to_checksum_address(authorizer),
                                                         bytes.fromhex(nonce_hex.removeprefix("0x"))).call()
        return bool(await self._rpc("authorizationState", call))

    async def block_number(self) -> int:
        """The latest block's number."""
        return int(await self._rpc("the block number", self._w3.eth.block_number))

    async def block_timestamp(self, number: int) -> int:
        return int((await self._rpc("a block", self._w3.eth.get_block(number)))["timestamp"])

    async def sender_nonce(self, address: str, block: int | None = None) -> int:
        """How many transactions `address` has in mined blocks up to `block` (None: the latest): its
        next nonce there."""
        return int(await self._rpc("an account nonce", self._w3.eth.get_transaction_count(
            to_checksum_address(address), "latest" if block is None else block)))

    async def authorization_event(self, authorizer: str, nonce_hex: str, from_block: int) -> AuthorizationEvent | None:
        """Which mined transaction, in blocks from `from_block` on, used or canceled the authorization
        `(authorizer, nonce)`; None if none did. (A nonce is spent once, so there is one at most.)"""
        topics = [["0x" + _AUTHORIZATION_USED_TOPIC.hex(), "0x" + _AUTHORIZATION_CANCELED_TOPIC.hex()],
                  "0x" + bytes(12).hex() + authorizer.lower().removeprefix("0x"),
                  "0x" + nonce_hex.lower().removeprefix("0x")]
        logs = await self._rpc("the authorization's events", self._w3.eth.get_logs(
            {"address": self.token_address, "fromBlock": max(0, from_block), "toBlock": "latest", "topics": topics}))
        for entry in logs:
            if entry.get("removed"):
                continue
            kind = "used" if bytes(entry["topics"][0]) == _AUTHORIZATION_USED_TOPIC else "canceled"
            return AuthorizationEvent(kind=kind, tx_hash="0x" + bytes(entry["transactionHash"]).hex(),
                                      block_number=int(entry["blockNumber"]))
        return None

    async def balance_of(self, address: str) -> int:
        return int(await self._rpc("balanceOf", self._token.functions.balanceOf(to_checksum_address(address)).call()))

    async def native_balance(self, address: str) -> int:
        """The chain's own coin (wei) at `address`: what the relayer pays gas with."""
        return int(await self._rpc("a balance", self._w3.eth.get_balance(to_checksum_address(address))))

    # --- settlement ------------------------------------------------------------------------------

    @staticmethod
    def _settlement_args(payment: ExactPayment) -> tuple[Any, ...]:
        v, r, s = split_signature(payment.signature_bytes)
        return (payment.payer, payment.to, payment.value, payment.valid_after, payment.valid_before,
                bytes.fromhex(payment.nonce[2:]), v, r, s)

    async def simulate_settlement(self, payment: ExactPayment) -> str | None:
        """eth_call the settlement from the relayer against the pending block: None if it would
        succeed, else the revert reason (e.g. "FiatTokenV2: authorization is used or canceled")."""
        function = self._token.get_function_by_signature(_TRANSFER_WITH_AUTHORIZATION)
        call = function(*self._settlement_args(payment)).call({"from": self.relayer_address},
                                                             block_identifier="pending")
        try:
            await self._rpc("the settlement simulation", call, passthrough=(ContractLogicError,))
        except ContractLogicError as exc:
            return _revert_reason(exc)
        return None

    async def build_settlement(self, payment: ExactPayment) -> SignedSettlement:
        """Sign (not send) the settlement with the next relayer nonce, so the caller can persist the
        hash and raw bytes before anything reaches the network. A built settlement that will never
        be sent must be given back with `release_settlement`, or later nonces wait behind the gap."""
        data = self._token.encode_abi(_TRANSFER_WITH_AUTHORIZATION, args=self._settlement_args(payment))
        call = {"from": self.relayer_address, "to": self.token_address, "data": data, "value": 0}
        gas, block, tip = await asyncio.gather(
            self._estimate_gas(call), self._rpc("the latest block", self._w3.eth.get_block("latest")),
            self._rpc("the priority fee", self._w3.eth.max_priority_fee))
        async with self._nonce_lock:
            if self._next_nonce is None:
                self._next_nonce = await self._pending_nonce()
            if self._holes:
                nonce = min(self._holes)
                self._holes.discard(nonce)
            else:
                nonce = self._next_nonce
                self._next_nonce += 1
        tx = {"type": 2, "chainId": self.chain_id, "nonce": nonce, "to": self.token_address, "value": 0,
              "data": data, "gas": gas, "maxPriorityFeePerGas": int(tip), "maxFeePerGas": _max_fee_per_gas(block, tip)}
        signed = self._relayer.sign_transaction(tx)
        return SignedSettlement(tx_hash="0x" + bytes(signed.hash).hex(),
                                raw_tx="0x" + bytes(signed.raw_transaction).hex(), nonce=nonce)

    async def build_transfer(self, to: str, value: int, nonce: int) -> SignedSettlement:
        """Sign (not send) a USDC `transfer(to, value)` from this adapter's key with the given
        account nonce (refunds: the caller stores it before sending, and owns the nonce; the local
        settlement counter is not used)."""
        data = self._token.encode_abi("transfer", args=(to_checksum_address(to), int(value)))
        call = {"from": self.relayer_address, "to": self.token_address, "data": data, "value": 0}
        gas, block, tip = await asyncio.gather(
            self._estimate_gas(call), self._rpc("the latest block", self._w3.eth.get_block("latest")),
            self._rpc("the priority fee", self._w3.eth.max_priority_fee))
        tx = {"type": 2, "chainId": self.chain_id, "nonce": nonce, "to": self.token_address, "value": 0,
              "data": data, "gas": gas, "maxPriorityFeePerGas": int(tip),
              "maxFeePerGas": _max_fee_per_gas(block, tip)}
        signed = self._relayer.sign_transaction(tx)
        return SignedSettlement(tx_hash="0x" + bytes(signed.hash).hex(),
                                raw_tx="0x" + bytes(signed.raw_transaction).hex(), nonce=nonce)

    async def pending_nonce(self) -> int:
        """This adapter's key's next nonce, counting transactions in the node's pool."""
        return await self._pending_nonce()

    async def _estimate_gas(self, call: dict[str, Any]) -> int:
        try:
            gas = await self._rpc("a gas estimate", self._w3.eth.estimate_gas(cast(TxParams, call), "pending"),
                                  passthrough=(ContractLogicError,))
        except ContractLogicError as exc:
            raise SettlementWouldRevert(_revert_reason(exc)) from exc
        return gas * (100 + GAS_HEADROOM_PCT) // 100

    async def _pending_nonce(self) -> int:
        return int(await self._rpc("the relayer nonce",
                                   self._w3.eth.get_transaction_count(self.relayer_address, "pending")))

    async def release_settlement(self, settlement: SignedSettlement) -> None:
        """Give back the nonce of a settlement that was neither persisted nor sent."""
        async with self._nonce_lock:
            if self._next_nonce is None or settlement.nonce >= self._next_nonce:
                return
            self._holes.add(settlement.nonce)
            while self._next_nonce - 1 in self._holes:  # a gap at the top is simply not there yet
                self._next_nonce -= 1
                self._holes.discard(self._next_nonce)

    async def resync_nonce(self) -> int:
        """Forget the local counter and take the relayer's pending nonce from the chain."""
        async with self._nonce_lock:
            self._next_nonce = await self._pending_nonce()
            self._holes.clear()
            return self._next_nonce

    async def broadcast(self, raw_tx_hex: str) -> str:
        """Send a signed transaction; idempotent: resending one the node already has, or already
        mined, returns its hash. A nonce taken by another transaction resyncs the counter and
        raises ServiceUnavailable(code="relayer_nonce_conflict"): these bytes can never be mined."""
        raw = bytes.fromhex(raw_tx_hex.removeprefix("0x"))
        tx_hash = "0x" + keccak(raw).hex()
        try:
            await self._rpc("the settlement", self._w3.eth.send_raw_transaction(raw), passthrough=(Web3RPCError,))
        except Web3RPCError as exc:
            message = _rpc_message(exc)
            if any(marker in message.lower() for marker in _ALREADY_KNOWN):
                return tx_hash
            if any(marker in message.lower() for marker in _NONCE_CONFLICT):
                if await self.transaction(tx_hash) is not None:
                    return tx_hash  # our own bytes, already in a block or the pool
                await self.resync_nonce()
                log.warning("settlement %s lost its relayer nonce: %s", tx_hash, message)
                raise ServiceUnavailable(f"The settlement's relayer nonce was used by another transaction "
                                         f"({message}).", code="relayer_nonce_conflict") from exc
            raise ServiceUnavailable(f"The chain node refused the settlement: {message}",
                                     code="chain_unavailable") from exc
        return tx_hash

    # --- receipts and transactions ---------------------------------------------------------------

    async def receipt(self, tx_hash: str) -> Receipt | None:
        """The mined receipt with our token's Transfer logs decoded; None while pending or unknown."""
        tx_hash = _hash_hex(tx_hash)
        try:
            raw = await self._rpc("a receipt", self._w3.eth.get_transaction_receipt(tx_hash),
                                  passthrough=(TransactionNotFound,))
        except TransactionNotFound:
            return None
        if raw is None or raw.get("blockNumber") is None:
            return None
        latest = await self._rpc("the block number", self._w3.eth.block_number)
        block = int(raw["blockNumber"])
        logs = raw.get("logs", [])
        return Receipt(tx_hash=tx_hash, ok=raw.get("status") == 1, block_number=block,
                       confirmations=max(0, latest - block + 1),
                       transfers=tuple(t for t in map(self._decode_transfer_log, logs) if t),
                       authorizations_used=self._decode_authorizations_used(logs))

    def _decode_authorizations_used(self, logs: list[Any]) -> tuple[AuthorizationUse, ...]:
        """Each AuthorizationUsed log with the Transfer log that follows it: FiatToken marks the
        nonce used and then transfers, with no log in between, one authorization at a time."""
        uses = []
        for index, entry in enumerate(logs):
            use = self._decode_authorization_used(entry)
            if use is not None:
                following = self._decode_transfer_log(logs[index + 1]) if index + 1 < len(logs) else None
                uses.append(replace(use, transfer=following))
        return tuple(uses)

    def _decode_transfer_log(self, entry: Any) -> Transfer | None:
        topics = [bytes(t) for t in entry.get("topics", [])]
        if (to_checksum_address(entry["address"]) != self.token_address or len(topics) != 3
                or topics[0] != _TRANSFER_TOPIC):
            return None
        return Transfer(token=self.token_address, from_=to_checksum_address(topics[1][-20:]),
                        to=to_checksum_address(topics[2][-20:]), value=int.from_bytes(bytes(entry["data"]), "big"))

    def _decode_authorization_used(self, entry: Any) -> AuthorizationUse | None:
        topics = [bytes(t) for t in entry.get("topics", [])]
        if (to_checksum_address(entry["address"]) != self.token_address or len(topics) != 3
                or topics[0] != _AUTHORIZATION_USED_TOPIC):
            return None
        return AuthorizationUse(authorizer=to_checksum_address(topics[1][-20:]), nonce="0x" + topics[2].hex())

    async def transaction(self, tx_hash: str) -> TxInfo | None:
        """A transaction by hash (mined or in the pool); None if the node does not know it."""
        tx_hash = _hash_hex(tx_hash)
        try:
            tx = await self._rpc("a transaction", self._w3.eth.get_transaction(tx_hash),
                                 passthrough=(TransactionNotFound,))
        except TransactionNotFound:
            return None
        if tx is None:
            return None
        sender, to = to_checksum_address(tx["from"]), tx.get("to")
        to = to_checksum_address(to) if to else None
        return TxInfo(tx_hash=tx_hash, from_=sender, to=to, nonce=int(tx["nonce"]),
                      block_number=tx.get("blockNumber"), transfer=self._decode_transfer_call(sender, to, tx))

    def _decode_transfer_call(self, sender: str, to: str | None, tx: Any) -> Transfer | None:
        data = bytes(tx.get("input") or b"")
        if to != self.token_address or len(data) != 68 or data[:4] != _ERC20_TRANSFER_SELECTOR:
            return None
        recipient, value = abi_decode(["address", "uint256"], data[4:])
        return Transfer(token=self.token_address, from_=sender, to=to_checksum_address(recipient), value=int(value))

    async def transfers_in(self, tx_hash: str, to: str | None = None) -> tuple[Transfer, ...] | None:
        """For the tx-hash flow: our token's Transfer logs in a mined transaction, only those into
        `to` when given (empty if it reverted); None while it is not mined. receipt() has the depth."""
        receipt = await self.receipt(tx_hash)
        if receipt is None:
            return None
        if not receipt.ok:
            return ()
        to = to_checksum_address(to) if to is not None else None
        return tuple(t for t in receipt.transfers if to is None or t.to == to)
