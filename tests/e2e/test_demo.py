"""The README's first command: the demo runs the whole story and exits cleanly."""

import subprocess
import sys


def test_the_demo_tells_the_whole_story():
    result = subprocess.run([sys.executable, "-m", "agent_gateway", "demo"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "HTTP 402: pay" in out
    assert "HTTP 201 in" in out and "settled on-chain in 0x" in out
    assert "HTTP 429 concurrency_limit" in out
    # The wallet signs a real EIP-4361 message naming the demo gateway, and gets a management key.
    assert "wants you to sign in with your Ethereum account:" in out and "Chain ID: 31337" in out
    assert "HTTP 201: management key mk_" in out
    assert '"requests": 1' in out and "Demo finished." in out
