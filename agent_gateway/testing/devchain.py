"""Dev/test tooling: a local anvil chain (from npm), the TestUSDC token and funded dev wallets."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3

from agent_gateway.testing.processes import free_port

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
# The first 10 accounts anvil derives from ANVIL_MNEMONIC (m/44'/60'/0'/0/i). Public test constants:
# never use them anywhere that holds value.
ANVIL_DEV_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
# Roles on a DevChain: 0 deploys and mints, 1 relays settlements, 2 is the merchant, 3..8 are agents,
# 9 is an x402 facilitator's signer (testing.facilitator).
DEPLOYER_INDEX, RELAYER_INDEX, PAY_TO_INDEX, FIRST_AGENT_INDEX, FACILITATOR_INDEX = 0, 1, 2, 3, 9
MAX_AGENTS = FACILITATOR_INDEX - FIRST_AGENT_INDEX

_NPM_PLATFORM = {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}
_NPM_ARCH = {"x86_64": "amd64", "AMD64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class AnvilNotFoundError(RuntimeError):
    """The anvil binary is not installed."""


def _find_upwards(relative: Path | str) -> Path | None:
    """Return the first `<ancestor>/<relative>` that exists, walking up from this file: a checkout's
    node_modules/, whether the package runs from the checkout or from a venv inside it."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / relative
        if candidate.exists():
            return candidate
    return None


def find_anvil() -> str:
    """Locate anvil: $AGW_ANVIL_BIN, then the repo's node_modules (npm ci), then PATH."""
    env_bin = os.environ.get("AGW_ANVIL_BIN")
    if env_bin:
        if not (os.path.isfile(env_bin) and os.access(env_bin, os.X_OK)):
            raise AnvilNotFoundError(f"AGW_ANVIL_BIN={env_bin!r} is not an executable file")
        return env_bin
    node_modules = _find_upwards(Path("node_modules") / ".bin" / "anvil")
    if node_modules is not None:
        # Prefer the native binary shipped in @foundry-rs/anvil-<os>-<arch> over the node wrapper in .bin/,
        # so stop() signals anvil itself rather than a node process in between.
        exe = "anvil.exe" if sys.platform == "win32" else "anvil"
        pkg = f"anvil-{_NPM_PLATFORM.get(platform.system(), '?')}-{_NPM_ARCH.get(platform.machine(), '?')}"
        native = node_modules.parent.parent / "@foundry-rs" / pkg / "bin" / exe
        return str(native if native.is_file() and os.access(native, os.X_OK) else node_modules)
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    raise AnvilNotFoundError(
        "anvil (the local Ethereum node) was not found: install it from npm "
        "(`npm install -g @foundry-rs/anvil`, or `npm ci` in a checkout), put it on PATH "
        "or set AGW_ANVIL_BIN to its path"
    )


def _rpc(url: str, method: str, params: list[Any] | None = None, timeout: float = 2.0) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.loads(resp.read())
    if "error" in reply:
        raise RuntimeError(f"{method} failed: {reply['error']}")
    return reply["result"]


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class AnvilProcess:
    """A running anvil node. Use as a context manager or call stop()."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, chain_id: int, log_path: Path):
        self.proc = proc
        self.port = port
        self.chain_id = chain_id
        self.rpc_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        # Last-resort cleanup if the owner forgets stop() (also runs at interpreter exit).
        self._finalizer = weakref.finalize(self, _terminate, proc)

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        self._finalizer()
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> AnvilProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_anvil(
    port: int | None = None, chain_id: int = 31337, block_time: float | None = None, timeout: float = 30.0
) -> AnvilProcess:
    """Start anvil on 127.0.0.1 (a free port when port is None) and wait until eth_chainId answers."""
    binary = find_anvil()
    attempts = 3 if port is None else 1
    last_error = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        cmd = [binary, "--host", "127.0.0.1", "--port", str(chosen), "--chain-id", str(chain_id),
               "--mnemonic", ANVIL_MNEMONIC, "--accounts", str(len(ANVIL_DEV_KEYS))]
        if block_time is not None:
            cmd += ["--block-time", str(block_time)]
        fd, log_name = tempfile.mkstemp(prefix="anvil-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        node = AnvilProcess(proc, chosen, chain_id, Path(log_name))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                got = int(_rpc(node.rpc_url, "eth_chainId", timeout=1.0), 16)
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                time.sleep(0.02)  # poll interval while the port is not yet open
                continue
            if got != chain_id:
                node.stop()
                raise RuntimeError(f"anvil on port {chosen} reports chain id {got}, expected {chain_id}")
            return node
        last_error = node.log_tail()
        exited = proc.poll() is not None
        node.stop()
        if not exited:
            raise TimeoutError(f"anvil did not answer eth_chainId within {timeout}s:\n{last_error}")
    raise RuntimeError(f"anvil exited during start-up ({binary}):\n{last_error}")


def load_artifact(contract: str = "TestUSDC") -> dict[str, Any]:
    """A test contract's build output ({contractName, abi, bytecode, compiler}): TestUSDC (the dev
    chain's token) or CallBatch (the attack tests' bundler); package data of agent_gateway.testing,
    written by contracts_abi/build.js."""
    artifact = resources.files("agent_gateway.testing").joinpath(f"{contract}.json")
    result: dict[str, Any] = json.loads(artifact.read_text(encoding="utf-8"))
    return result


def _web3(rpc_url: str) -> Web3:
    return Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))


def _send(w3: Web3, key: str, tx: dict[str, Any]) -> Any:
    """Sign and send a transaction from `key`, wait for the receipt and require success."""
    acct = Account.from_key(key)
    tx = {"from": acct.address, "chainId": w3.eth.chain_id,
          "nonce": w3.eth.get_transaction_count(acct.address, "pending"), **tx}
    signed = acct.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction), timeout=60)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {receipt['transactionHash'].hex()} reverted")
    return receipt


def token_contract(w3: Web3, address: str) -> Any:
    return w3.eth.contract(address=Web3.to_checksum_address(address), abi=load_artifact()["abi"])


def deploy_test_token(rpc_url: str, deployer_key: str, name: str = "USD Coin", version: str = "2") -> str:
    """Deploy TestUSDC(name, version) and return its checksum address."""
    w3 = _web3(rpc_url)
    artifact = load_artifact()
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    deployer = Account.from_key(deployer_key).address
    tx = factory.constructor(name, version).build_transaction(
        {"from": deployer, "nonce": w3.eth.get_transaction_count(deployer, "pending")}
    )
    receipt = _send(w3, deployer_key, tx)
    return Web3.to_checksum_address(receipt["contractAddress"])


def fund_wallet(rpc_url: str, token: str, deployer_key: str, address: str, usdc_atomic: int, eth_wei: int = 0) -> None:
    """Mint `usdc_atomic` TestUSDC to `address` and send it `eth_wei` from the deployer."""
    w3 = _web3(rpc_url)
    to = Web3.to_checksum_address(address)
    deployer = Account.from_key(deployer_key).address
    if usdc_atomic:
        tx = token_contract(w3, token).functions.mint(to, usdc_atomic).build_transaction(
            {"from": deployer, "nonce": w3.eth.get_transaction_count(deployer, "pending")}
        )
        _send(w3, deployer_key, tx)
    if eth_wei:
        _send(w3, deployer_key, {"to": to, "value": eth_wei, "gas": 21_000, "gasPrice": w3.eth.gas_price})


@dataclass
class DevChain:
    """A running local chain with TestUSDC deployed and funded agent wallets."""

    rpc_url: str
    chain_id: int
    token: str
    token_name: str
    token_version: str
    pay_to: str
    relayer_key: str
    agent_keys: tuple[str, ...]
    deployer_key: str = ANVIL_DEV_KEYS[DEPLOYER_INDEX]
    process: AnvilProcess | None = field(default=None, repr=False, compare=False)

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"

    @property
    def relayer_address(self) -> str:
        return Account.from_key(self.relayer_key).address

    @property
    def facilitator_key(self) -> str:
        """The key an x402 facilitator on this chain settles with (a funded dev account)."""
        return ANVIL_DEV_KEYS[FACILITATOR_INDEX]

    @property
    def agent_addresses(self) -> list[str]:
        return [Account.from_key(k).address for k in self.agent_keys]

    def web3(self) -> Web3:
        return _web3(self.rpc_url)

    def x402_client(self, private_key: str, max_usdc_atomic: int = 1000 * 10**6) -> Any:
        """The official x402 client for a wallet on this chain (the `x402` package: test/demo extra).

        Out of the box it pays only assets it knows, up to $1: this allows our test USDC."""
        from x402 import x402Client
        from x402.mechanisms.evm.exact import ExactEvmScheme

        client = x402Client()
        client.register(self.network, ExactEvmScheme(signer=Account.from_key(private_key)))
        client.set_spend_controls({"allowed_assets": [
            {"network": self.network, "asset": self.token, "max_amount_per_payment": str(max_usdc_atomic)}]})
        return client

    def fund(self, address: str, usdc_atomic: int, eth_wei: int = 0) -> None:
        fund_wallet(self.rpc_url, self.token, self.deployer_key, address, usdc_atomic, eth_wei)

    def env(self) -> dict[str, str]:
        return {
            "AGW_CHAIN_RPC_URL": self.rpc_url,
            "AGW_CHAIN_ID": str(self.chain_id),
            "AGW_USDC_ADDRESS": self.token,
            "AGW_USDC_NAME": self.token_name,
            "AGW_USDC_VERSION": self.token_version,
            "AGW_PAY_TO": self.pay_to,
            "AGW_RELAYER_KEY": self.relayer_key,
            "AGW_CONFIRMATIONS": "1",
        }

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> DevChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_devchain(
    port: int | None = None, agents: int = 3, *, chain_id: int = 31337, block_time: float | None = None,
    agent_usdc: int = 1_000 * 10**6, token_name: str = "USD Coin", token_version: str = "2",
) -> DevChain:
    """Start anvil, deploy TestUSDC and mint `agent_usdc` atomic units to each of `agents` dev wallets."""
    if not 0 <= agents <= MAX_AGENTS:
        raise ValueError(f"agents must be between 0 and {MAX_AGENTS}")
    node = start_anvil(port, chain_id=chain_id, block_time=block_time)
    try:
        deployer_key = ANVIL_DEV_KEYS[DEPLOYER_INDEX]
        token = deploy_test_token(node.rpc_url, deployer_key, token_name, token_version)
        agent_keys = ANVIL_DEV_KEYS[FIRST_AGENT_INDEX:FIRST_AGENT_INDEX + agents]
        for key in agent_keys:
            fund_wallet(node.rpc_url, token, deployer_key, Account.from_key(key).address, agent_usdc)
        return DevChain(
            rpc_url=node.rpc_url, chain_id=chain_id, token=token, token_name=token_name,
            token_version=token_version, pay_to=Account.from_key(ANVIL_DEV_KEYS[PAY_TO_INDEX]).address,
            relayer_key=ANVIL_DEV_KEYS[RELAYER_INDEX], agent_keys=tuple(agent_keys),
            deployer_key=deployer_key, process=node,
        )
    except BaseException:
        node.stop()
        raise
