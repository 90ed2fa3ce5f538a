"""Key tokens: prefixed, high-entropy, stored as a hash, displayed as prefix…last four."""

from agent_gateway.keys.tokens import API_KEY_PREFIX, MANAGEMENT_KEY_PREFIX, hash_token, issue_token, looks_like, masked


def test_tokens_are_prefixed_random_and_hashed():
    tokens = {issue_token(API_KEY_PREFIX).plaintext for _ in range(500)}
    assert len(tokens) == 500
    token = issue_token(MANAGEMENT_KEY_PREFIX)
    assert token.plaintext.startswith("mk_") and looks_like(token.plaintext, "mk_")
    assert token.key_hash == hash_token(token.plaintext) and token.plaintext not in token.key_hash
    assert len(token.key_hash) == 64
    assert masked(token.prefix, token.last_four) == f"{token.plaintext[:7]}…{token.plaintext[-4:]}"


def test_garbled_tokens_do_not_look_like_keys():
    good = issue_token(API_KEY_PREFIX).plaintext
    assert looks_like(good, "sk_")
    assert not looks_like(good, "mk_")
    assert not looks_like(good[:-1], "sk_")
    assert not looks_like(good[:-1] + "!", "sk_")
