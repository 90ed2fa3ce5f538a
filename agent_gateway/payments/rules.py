"""Pure payment verification: does an EIP-3009 authorization pay exactly what we offered? A verdict, never a raise."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_utils import ValidationError, to_checksum_address

from agent_gateway.payments.wire import ExactPayment, Offer

# The SDK verifiers demand this much life left in an authorization (validBefore >= now + 6), so a
# payment cannot expire between our check and the block that carries the settlement.
MIN_REMAINING_S = 6
# How far validBefore may sit beyond now + maxTimeoutSeconds. Clients compute validBefore from their
# own wall clock, which can run ahead of the chain's; beyond this slack the authorization is refused,
# because an authorization we hold but never settle stays spendable (by anyone, to our payTo) until
# validBefore, and the reconciler can only call a lost payment dead once it has expired.
WINDOW_SLACK_S = 600
# secp256k1 group order: USDC's ECRecover rejects s in the upper half (malleable signatures).
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

_DOMAIN_TYPE = [
    {"name": "name", "type": "string"}, {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"},
]
_TRANSFER_WITH_AUTHORIZATION_TYPE = [
    {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"},
]


# What each reason code tells the payer to fix.
REASONS = {
    "wrong_network": "The payment is for another network.",
    "wrong_asset": "The payment is in another token.",
    "wrong_recipient": "The payment is not addressed to this gateway's payTo address.",
    "wrong_amount": "The payment amount is not the exact price.",
    "invalid_signature": "The authorization's signature does not come from the payer.",
    "not_yet_valid": "The authorization is not valid yet.",
    "expired": "The authorization has expired (or expires too soon to settle).",
    "window_too_long": "The authorization stays valid far longer than this gateway's maxTimeoutSeconds.",
    "accepted_mismatch": "The payment's `accepted` requirements differ from the ones offered.",
    "nonce_already_used": "This authorization was already used on-chain.",
    "insufficient_balance": "The payer's USDC balance is below the price.",
}


def reason_message(reason: str | None) -> str:
    return REASONS.get(reason or "", reason or "The payment was refused.")


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: ok, or a stable reason code. `payer` is set only when ok."""

    ok: bool
    reason: str | None = None
    payer: str | None = None


def _refuse(reason: str) -> Verdict:
    return Verdict(ok=False, reason=reason, payer=None)


def recover_authorizer(payment: ExactPayment, token_name: str, token_version: str, chain_id: int,
                       token_address: str) -> str | None:
    """The checksummed signer of the payment's `TransferWithAuthorization`, under OUR EIP-712 domain.

    The domain comes from our settings, never from the payload: a payment signed for another
    token, chain or domain name recovers to some unrelated address. None when the signature is
    not one USDC's ECRecover would accept (v not 27/28 or 0/1, s in the upper half, unrecoverable)."""
    sig = payment.signature_bytes
    s, v = int.from_bytes(sig[32:64], "big"), sig[64]
    if v not in (0, 1, 27, 28) or not 0 < s <= _SECP256K1_N // 2:
        return None
    typed = {
        "types": {"EIP712Domain": _DOMAIN_TYPE, "TransferWithAuthorization": _TRANSFER_WITH_AUTHORIZATION_TYPE},
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": token_name, "version": token_version, "chainId": chain_id,
                   "verifyingContract": to_checksum_address(token_address)},
        "message": {"from": payment.payer, "to": payment.to, "value": payment.value,
                    "validAfter": payment.valid_after, "validBefore": payment.valid_before,
                    "nonce": bytes.fromhex(payment.nonce[2:])},
    }
    try:
        return Account.recover_message(encode_typed_data(full_message=typed), signature=sig)
    except (BadSignature, ValidationError, ValueError):  # r or s out of range, not a curve point
        return None


def _same_address(a: object, b: str) -> bool:
    return isinstance(a, str) and a.lower() == b.lower()


def _accepted_matches(accepted: dict, offer: Offer) -> bool:
    """The SDK server's rule: equal requirements, and our `extra` a subset of the echoed one."""
    extra = accepted.get("extra") or {}
    return (
        accepted.get("scheme") == offer.scheme
        and accepted.get("amount") == str(offer.amount_atomic)
        and _same_address(accepted.get("payTo"), offer.pay_to)
        and accepted.get("maxTimeoutSeconds") == offer.max_timeout_s
        and extra.get("name") == offer.token_name
        and extra.get("version") == offer.token_version
    )


def check_payment(offer: Offer, payment: ExactPayment, chain_id: int, token_address: str, chain_now: int,
                  *, window_slack_s: int | None = WINDOW_SLACK_S) -> Verdict:
    """Check a decoded payment against the offer it claims to pay, at chain time `chain_now`.

    The money checks come first because their reasons tell a client what to fix; the signature
    comes last. USDC accepts an authorization iff validAfter < block.timestamp < validBefore; we
    also want MIN_REMAINING_S of life left and (unless window_slack_s is None) a window no longer
    than the offer's maxTimeoutSeconds plus window_slack_s."""
    if offer.network != f"eip155:{chain_id}" or not _same_address(offer.asset, token_address):
        raise ValueError("the offer is not for the configured chain and token")  # our bug, not the payer's
    if payment.network != offer.network:
        return _refuse("wrong_network")
    accepted = payment.accepted
    if accepted is not None:
        if accepted.get("network") != offer.network:
            return _refuse("wrong_network")
        if not _same_address(accepted.get("asset"), offer.asset):
            return _refuse("wrong_asset")
    if payment.to != to_checksum_address(offer.pay_to):
        return _refuse("wrong_recipient")
    if payment.value != offer.amount_atomic:
        return _refuse("wrong_amount")
    if accepted is not None and not _accepted_matches(accepted, offer):
        return _refuse("accepted_mismatch")
    if payment.valid_after >= chain_now:
        return _refuse("not_yet_valid")
    if payment.valid_before < chain_now + MIN_REMAINING_S:
        return _refuse("expired")
    if window_slack_s is not None and payment.valid_before > chain_now + offer.max_timeout_s + window_slack_s:
        return _refuse("window_too_long")
    signer = recover_authorizer(payment, offer.token_name, offer.token_version, chain_id, token_address)
    if signer is None or signer != payment.payer:
        return _refuse("invalid_signature")
    return Verdict(ok=True, reason=None, payer=payment.payer)


def check_chain_facts(payment: ExactPayment, authorization_used: bool, balance: int) -> Verdict:
    """Check what only the chain knows: the nonce is unused and the payer can cover the value."""
    if authorization_used:
        return _refuse("nonce_already_used")
    if balance < payment.value:
        return _refuse("insufficient_balance")
    return Verdict(ok=True, reason=None, payer=payment.payer)
