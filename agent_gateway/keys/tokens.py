"""Key tokens: high-entropy random `sk_…` / `mk_…`, stored as SHA-256, shown as prefix…last four."""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass

API_KEY_PREFIX = "sk_"
MANAGEMENT_KEY_PREFIX = "mk_"
_ALPHABET = string.ascii_letters + string.digits
_BODY_LENGTH = 43  # 43 base62 characters carry 256 bits of entropy
DISPLAY_PREFIX = 7


@dataclass(frozen=True)
class IssuedToken:
    """A freshly generated token: the plaintext leaves the process once, only the hash is stored."""

    plaintext: str
    key_hash: str
    prefix: str
    last_four: str


def issue_token(kind_prefix: str) -> IssuedToken:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_BODY_LENGTH))
    plaintext = kind_prefix + body
    return IssuedToken(
        plaintext=plaintext,
        key_hash=hash_token(plaintext),
        prefix=plaintext[:DISPLAY_PREFIX],
        last_four=plaintext[-4:],
    )


def hash_token(plaintext: str) -> str:
    # A plain SHA-256 is enough here: the tokens carry 256 random bits, so there is nothing to
    # brute-force, and lookup by hash keeps verification a single indexed read.
    return hashlib.sha256(plaintext.encode()).hexdigest()


def looks_like(plaintext: str, kind_prefix: str) -> bool:
    body = plaintext[len(kind_prefix):]
    return (
        plaintext.startswith(kind_prefix)
        and len(body) == _BODY_LENGTH
        and all(c in _ALPHABET for c in body)
    )


def masked(prefix: str, last_four: str) -> str:
    return f"{prefix}…{last_four}"
