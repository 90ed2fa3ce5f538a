"""TestUSDC on a real anvil chain: ERC-20 basics and EIP-3009 semantics, with real EIP-712 signatures."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from agent_gateway.testing.devchain import ANVIL_DEV_KEYS, DevChain, token_contract
from tests.fixtures.x402 import SECP256K1_N, TRANSFER_WITH_AUTHORIZATION_TYPES

USDC_1 = 10**6


def _domain(chain: DevChain) -> dict[str, Any]:
    return {"name": chain.token_name, "version": chain.token_version,
            "chainId": chain.chain_id, "verifyingContract": chain.token}


def _authorize(chain: DevChain, signer_key: str, *, from_: str | None = None, to: str | None = None,
               value: int = USDC_1, valid_after: int = 0, valid_before: int | None = None,
               nonce: bytes | None = None) -> dict[str, Any]:
    """Build and sign a TransferWithAuthorization. `from_` defaults to the signer's own address."""
    message = {
        "from": from_ or Account.from_key(signer_key).address,
        "to": to or chain.pay_to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before if valid_before is not None else int(time.time()) + 3600,
        "nonce": nonce or os.urandom(32),
    }
    signed = Account.sign_typed_data(signer_key, _domain(chain), TRANSFER_WITH_AUTHORIZATION_TYPES, message)
    return {"message": message, "v": signed.v, "r": signed.r.to_bytes(32, "big"),
            "s": signed.s.to_bytes(32, "big"), "signature": bytes(signed.signature)}


def _args(auth: dict[str, Any]) -> list[Any]:
    m = auth["message"]
    return [m["from"], m["to"], m["value"], m["validAfter"], m["validBefore"], m["nonce"]]


def _vrs_call(token: Any, auth: dict[str, Any]) -> Any:
    return token.functions.transferWithAuthorization(*_args(auth), auth["v"], auth["r"], auth["s"])


def _bytes_call(token: Any, auth: dict[str, Any]) -> Any:
    return token.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )(*_args(auth), auth["signature"])


def _send_as_relayer(w3: Web3, chain: DevChain, call: Any) -> Any:
    """Broadcast `call` from the relayer with a fixed gas limit (so reverting calls still get mined)."""
    relayer = Account.from_key(chain.relayer_key)
    tx = call.build_transaction({"from": relayer.address, "gas": 300_000,
                                 "nonce": w3.eth.get_transaction_count(relayer.address, "pending")})
    signed = relayer.sign_transaction(tx)
    return w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction), timeout=30)


@pytest.fixture
def w3(devchain: DevChain) -> Web3:  # noqa: F811
    return devchain.web3()


@pytest.fixture
def token(devchain: DevChain, w3: Web3) -> Any:  # noqa: F811
    return token_contract(w3, devchain.token)


def test_metadata_and_domain(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    assert w3.eth.chain_id == devchain.chain_id == 31337
    assert token.functions.decimals().call() == 6
    assert token.functions.name().call() == "USD Coin" == devchain.token_name
    assert token.functions.version().call() == "2" == devchain.token_version
    assert token.functions.symbol().call() == "USDC"
    # The on-chain EIP-712 domain separator is exactly what eth_account derives from the advertised domain.
    signable = encode_typed_data(_domain(devchain), TRANSFER_WITH_AUTHORIZATION_TYPES, _authorize(
        devchain, devchain.agent_keys[0])["message"])
    assert token.functions.DOMAIN_SEPARATOR().call() == signable.header
    assert token.functions.TRANSFER_WITH_AUTHORIZATION_TYPEHASH().call().hex() == (
        "7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267")


def test_devchain_wallets_and_env(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    anvil_accounts = set(w3.eth.accounts)
    assert {Account.from_key(k).address for k in ANVIL_DEV_KEYS} == anvil_accounts
    assert len(devchain.agent_keys) == 3
    for address in devchain.agent_addresses:
        assert token.functions.balanceOf(address).call() >= 900 * USDC_1
    env = devchain.env()
    assert env["AGW_CHAIN_ID"] == "31337" and env["AGW_CONFIRMATIONS"] == "1"
    assert env["AGW_USDC_ADDRESS"] == devchain.token and w3.eth.get_code(devchain.token) != b""
    assert Account.from_key(env["AGW_RELAYER_KEY"]).address == devchain.relayer_address
    assert env["AGW_PAY_TO"] not in devchain.agent_addresses + [devchain.relayer_address]


def test_erc20_mint_transfer_approve(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    fresh = Account.create()
    supply_before = token.functions.totalSupply().call()
    devchain.fund(fresh.address, 5 * USDC_1, eth_wei=10**17)
    assert token.functions.balanceOf(fresh.address).call() == 5 * USDC_1
    assert token.functions.totalSupply().call() == supply_before + 5 * USDC_1
    assert w3.eth.get_balance(fresh.address) == 10**17
    payee = devchain.pay_to
    before = token.functions.balanceOf(payee).call()
    tx = token.functions.transfer(payee, 2 * USDC_1).build_transaction(
        {"from": fresh.address, "nonce": w3.eth.get_transaction_count(fresh.address)})
    receipt = w3.eth.wait_for_transaction_receipt(
        w3.eth.send_raw_transaction(fresh.sign_transaction(tx).raw_transaction))
    assert receipt["status"] == 1
    assert token.functions.balanceOf(fresh.address).call() == 3 * USDC_1
    assert token.functions.balanceOf(payee).call() == before + 2 * USDC_1
    with pytest.raises(ContractLogicError, match="transfer amount exceeds balance"):
        token.functions.transfer(payee, 4 * USDC_1).call({"from": fresh.address})


@pytest.mark.parametrize("form", ["vrs", "bytes"])
def test_authorization_settles(devchain: DevChain, w3: Web3, token: Any, form: str) -> None:  # noqa: F811
    payer_key = devchain.agent_keys[0]
    payer = Account.from_key(payer_key).address
    auth = _authorize(devchain, payer_key, value=1_234_567)
    nonce = auth["message"]["nonce"]
    payer_before = token.functions.balanceOf(payer).call()
    payee_before = token.functions.balanceOf(devchain.pay_to).call()
    assert token.functions.authorizationState(payer, nonce).call() is False

    call = _vrs_call(token, auth) if form == "vrs" else _bytes_call(token, auth)
    call.call({"from": devchain.relayer_address})  # simulation passes
    receipt = _send_as_relayer(w3, devchain, call)

    assert receipt["status"] == 1
    assert token.functions.balanceOf(payer).call() == payer_before - 1_234_567
    assert token.functions.balanceOf(devchain.pay_to).call() == payee_before + 1_234_567
    assert token.functions.authorizationState(payer, nonce).call() is True
    transfers = token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert [(e.address, e.args["from"], e.args["to"], e.args["value"]) for e in transfers] == [
        (devchain.token, payer, devchain.pay_to, 1_234_567)]
    used = token.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert [(e.args["authorizer"], e.args["nonce"]) for e in used] == [(payer, nonce)]


def test_replayed_nonce_reverts(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    payer_key = devchain.agent_keys[1]
    payer = Account.from_key(payer_key).address
    auth = _authorize(devchain, payer_key, value=USDC_1)
    assert _send_as_relayer(w3, devchain, _vrs_call(token, auth))["status"] == 1
    after_first = token.functions.balanceOf(payer).call()

    for call in (_vrs_call(token, auth), _bytes_call(token, auth)):
        with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
            call.call({"from": devchain.relayer_address})
    receipt = _send_as_relayer(w3, devchain, _bytes_call(token, auth))
    assert receipt["status"] == 0
    assert token.functions.balanceOf(payer).call() == after_first
    # Same nonce, fresh signature for a different amount: still used (nonces are per authorizer).
    again = _authorize(devchain, payer_key, value=2 * USDC_1, nonce=auth["message"]["nonce"])
    with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
        _vrs_call(token, again).call({"from": devchain.relayer_address})


def test_wrong_signer_and_tampered_fields_revert(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    victim = Account.from_key(devchain.agent_keys[0]).address
    victim_before = token.functions.balanceOf(victim).call()
    forged = _authorize(devchain, devchain.agent_keys[2], from_=victim)  # signed by another wallet
    for call in (_vrs_call(token, forged), _bytes_call(token, forged)):
        with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
            call.call({"from": devchain.relayer_address})
    assert _send_as_relayer(w3, devchain, _vrs_call(token, forged))["status"] == 0
    assert token.functions.balanceOf(victim).call() == victim_before
    assert token.functions.authorizationState(victim, forged["message"]["nonce"]).call() is False

    honest = _authorize(devchain, devchain.agent_keys[0])
    honest["message"] = {**honest["message"], "value": 2 * USDC_1}  # relayer raises the amount
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        _vrs_call(token, honest).call({"from": devchain.relayer_address})

    other_domain = Account.sign_typed_data(  # right signer, wrong EIP-712 domain name
        devchain.agent_keys[0], {**_domain(devchain), "name": "USDC"}, TRANSFER_WITH_AUTHORIZATION_TYPES,
        _authorize(devchain, devchain.agent_keys[0])["message"])
    honest2 = _authorize(devchain, devchain.agent_keys[0])
    honest2["signature"] = bytes(other_domain.signature)
    with pytest.raises(ContractLogicError, match="FiatTokenV2: invalid signature"):
        _bytes_call(token, honest2).call({"from": devchain.relayer_address})


def test_malleable_and_malformed_signatures_revert(devchain: DevChain, token: Any) -> None:  # noqa: F811
    auth = _authorize(devchain, devchain.agent_keys[0])
    high_s = dict(auth, s=(SECP256K1_N - int.from_bytes(auth["s"], "big")).to_bytes(32, "big"),
                  v=55 - auth["v"])  # the other valid (r, n-s, v') encoding of the same signature
    with pytest.raises(ContractLogicError, match="invalid signature 's' value"):
        _vrs_call(token, high_s).call({"from": devchain.relayer_address})
    with pytest.raises(ContractLogicError, match="invalid signature 'v' value"):
        _vrs_call(token, dict(auth, v=auth["v"] - 27)).call({"from": devchain.relayer_address})
    with pytest.raises(ContractLogicError, match="invalid signature length"):
        _bytes_call(token, dict(auth, signature=auth["signature"][:64])).call({"from": devchain.relayer_address})
    _vrs_call(token, auth).call({"from": devchain.relayer_address})  # the original still simulates fine


def test_expired_and_not_yet_valid_revert(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    key = devchain.agent_keys[2]
    payer = Account.from_key(key).address
    latest = w3.eth.get_block("latest")["timestamp"]
    expired = _authorize(devchain, key, valid_before=latest)  # every later block has timestamp >= latest
    early = _authorize(devchain, key, valid_after=latest + 3600)
    for auth, reason in ((expired, "authorization is expired"), (early, "authorization is not yet valid")):
        for call in (_vrs_call(token, auth), _bytes_call(token, auth)):
            with pytest.raises(ContractLogicError, match=reason):
                call.call({"from": devchain.relayer_address})
        before = token.functions.balanceOf(payer).call()
        assert _send_as_relayer(w3, devchain, _vrs_call(token, auth))["status"] == 0
        assert token.functions.balanceOf(payer).call() == before
        assert token.functions.authorizationState(payer, auth["message"]["nonce"]).call() is False


def test_window_bounds_are_strict_block_time(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    """Mined at block time T: validAfter == T and validBefore == T both fail; (T-1, T+1) succeeds."""
    key = devchain.agent_keys[2]
    t = max(w3.eth.get_block("latest")["timestamp"] + 1, int(time.time()))
    cases = [
        (_authorize(devchain, key, valid_after=t, valid_before=t + 3600), 0),
        (_authorize(devchain, key, valid_after=0, valid_before=t + 1), 0),
        (_authorize(devchain, key, valid_after=t + 1, valid_before=t + 3), 1),
    ]
    for i, (auth, want_status) in enumerate(cases):
        block_time = t + i
        w3.provider.make_request("evm_setNextBlockTimestamp", [block_time])
        receipt = _send_as_relayer(w3, devchain, _vrs_call(token, auth))
        assert w3.eth.get_block(receipt["blockNumber"])["timestamp"] == block_time
        assert receipt["status"] == want_status, (i, auth["message"])


def test_cancel_authorization_burns_nonce(devchain: DevChain, w3: Web3, token: Any) -> None:  # noqa: F811
    key = devchain.agent_keys[1]
    payer = Account.from_key(key).address
    auth = _authorize(devchain, key)
    nonce = auth["message"]["nonce"]
    cancel = Account.sign_typed_data(
        key, _domain(devchain),
        {"CancelAuthorization": [{"name": "authorizer", "type": "address"}, {"name": "nonce", "type": "bytes32"}]},
        {"authorizer": payer, "nonce": nonce})
    call = token.functions.cancelAuthorization(payer, nonce, cancel.v, cancel.r.to_bytes(32, "big"),
                                               cancel.s.to_bytes(32, "big"))
    assert _send_as_relayer(w3, devchain, call)["status"] == 1
    assert token.functions.authorizationState(payer, nonce).call() is True
    with pytest.raises(ContractLogicError, match="authorization is used or canceled"):
        _vrs_call(token, auth).call({"from": devchain.relayer_address})
