"""The README, followed in order on a fresh clone, works: the files it names exist and its
management walk (credit, then subscribe from the balance) is paid by the credit it gives."""

import json
import re
from pathlib import Path

from agent_gateway.catalog.pools import load_catalog
from agent_gateway.catalog.pricing import make_order
from agent_gateway.money import parse_usdc
from agent_gateway.settings import EXAMPLE_POOLS_FILE

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_pools_file_the_readme_checks_exists():
    checked = re.findall(r"agent-gateway pools check(?: +([^\s#]+))?", README)
    assert checked
    for path in filter(None, checked):
        assert (ROOT / path).is_file(), f"the README runs `pools check {path}`, which does not exist"


def test_the_readme_subscribe_example_is_paid_by_the_credit_it_gives():
    credit = parse_usdc(re.search(r"accounts credit acct_… ([\d.]+)", README).group(1))
    example = re.search(r"/api/pools/(\w+)/subscribe -H \"Authorization: Bearer \$MK\" \\\n"
                        r"\s+-H 'content-type: application/json' \\\n\s+-d '(\{.*?\})'", README)
    body = json.loads(example.group(2))
    order = make_order(load_catalog(EXAMPLE_POOLS_FILE), example.group(1), body["blocks"], body["quantity"],
                       body["billingCycle"])
    assert order.total_atomic <= credit, "following the README in order would answer 402"
    assert f"costs {order.quote()['total']}" in README  # and the README states that price
