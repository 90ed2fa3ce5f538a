"""The README's first command: the demo runs the whole story and exits cleanly."""

import re
import subprocess
import sys


def test_the_demo_tells_the_whole_story():
    result = subprocess.run([sys.executable, "-m", "agent_gateway", "demo"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "HTTP 402: pay" in out
    assert "HTTP 201 in" in out and "settled on-chain in 0x" in out
    assert "HTTP 429 concurrency_limit" in out
    # The wallet signs a real EIP-4361 message naming the demo gateway, and gets a management key.
    assert "wants you to sign in with your Ethereum account:" in out and "Chain ID: 31337" in out
    assert "HTTP 201: management key mk_" in out
    assert '"requests": 1' in out and "Demo finished." in out
    # It says where the tokens came from, and what to try next with the keys it printed.
    assert "These tokens come from the test upstream, a deterministic fake model" in out
    next_steps = out.split("== What to try next", 1)[1]
    dashboard = re.search(r"open (http://127\.0\.0\.1:\d+)/dashboard/ and sign in", next_steps)
    assert dashboard and re.search(r"^\s+mk_\w{43}$", next_steps, re.M)
    assert f"curl {dashboard.group(1)}/v1/chat/completions -H 'Authorization: Bearer sk_" in next_steps
    assert "agent-gateway serve" in next_steps and "agent-gateway accounts create" in next_steps
