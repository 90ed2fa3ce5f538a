"""The wallet sign-in message is laid out exactly as EIP-4361 says, so SIWE wallets show and check it."""

from datetime import UTC, datetime

from agent_gateway.payments.wallet import SIGN_IN_STATEMENT, sign_in_message


def test_the_sign_in_message_has_the_eip_4361_layout_with_the_public_urls_domain():
    issued = datetime(2026, 11, 25, 10, 0, 0, 123000, tzinfo=UTC)
    message = sign_in_message("https://gateway.example.com:8443/agw", 8453,
                              "0xc02aaa39b223fe8d0a0e5c4f27ead9083c756cc2", "a1b2c3d4e5f6a7b8", issued)
    assert message.text() == (
        "gateway.example.com:8443 wants you to sign in with your Ethereum account:\n"
        "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2\n"  # EIP-55, whatever case was asked for
        "\n"
        f"{SIGN_IN_STATEMENT}\n"
        "\n"
        "URI: https://gateway.example.com:8443/agw\n"
        "Version: 1\n"
        "Chain ID: 8453\n"
        "Nonce: a1b2c3d4e5f6a7b8\n"
        "Issued At: 2026-11-25T10:00:00.123Z\n"
        "Expiration Time: 2026-11-25T10:10:00.123Z"
    )
    assert "\n" not in SIGN_IN_STATEMENT
