"""`agent-gateway admin …`: the operator's console on the command line, a client of the admin API.

It calls a running gateway over HTTP (never the database), so a reload or a state change goes
through the same audited service as the API and reaches every process."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import quote, urlencode

from agent_gateway.settings import Settings

HELP = """\
The admin commands call the admin API of a running gateway:
  --url    or AGW_ADMIN_URL    (default AGW_PUBLIC_URL, else http://AGW_HOST:AGW_PORT)
  --token  or AGW_ADMIN_TOKEN  (prefer the variable: a command line is visible to other users)
  --actor  or AGW_ADMIN_ACTOR  your name, recorded in the audit log (required for changes)
"""


def add_admin_commands(commands: Any) -> None:
    admin = commands.add_parser("admin", help="the operator's console: pools, accounts, money, refunds, audit (over HTTP)",
                                description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(admin, None)
    # The same options after the action too (`admin reload --actor bob`); there they override.
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)
    actions = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)

    def action(name: str, help_: str, *args: tuple[str, str]) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_, parents=[common])
        for arg, arg_help in args:
            parser.add_argument(arg, help=arg_help)
        parser.set_defaults(run=run_admin)
        return parser

    reason = ("--reason", "why (kept in the audit log)")
    action("pools", "each pool's state, seats sold and left per block, requests in flight")
    action("pool-state", "move a pool to another state (funding, activating, active, paused, closed)",
           ("slug", "the pool"), ("status", "the new state"), reason)
    action("reload", "re-read the pools file in every process; a bad file changes nothing and says why", reason)
    action("find", "search accounts by id, wallet address, key prefix or name", ("query", "what to look for"))
    action("account", "an account's subscriptions, keys, balance and payments", ("account", "the account id"))
    action("credit", "add USDC to an account's prepaid balance", ("account", "the account id"),
           ("amount", 'USDC, e.g. "25.00"'), ("--reason", "why (required; kept in the audit log)"))
    action("debit", "take USDC from an account's prepaid balance (never below zero)", ("account", "the account id"),
           ("amount", 'USDC, e.g. "25.00"'), ("--reason", "why (required; kept in the audit log)"))
    action("disable", "disable an account: its keys are revoked at once, sign-in and purchases refused",
           ("account", "the account id"), reason)
    action("enable", "enable an account again, with the keys its disabling switched off",
           ("account", "the account id"), reason)
    money = action("money", "revenue per day and pool, payments by state (attention first), balances")
    money.add_argument("--days", type=int, default=30, help="how far back revenue goes (default 30)")
    refund = action("refund", "refund one payment: to the account's prepaid balance or on-chain to the paying "
                    "wallet (its subscriptions canceled, keys revoked)", ("payment", "the payment id"), reason)
    refund.add_argument("--to", choices=["balance", "chain"], default=None,
                        help="where the money goes (default: the gateway's AGW_REFUND_TO)")
    refunds = action("refunds", "refunds, those in progress first, with what each waits for; the refund wallet")
    refunds.add_argument("--state", choices=["planned", "broadcast", "refunded", "canceled"], default=None)
    refunds.add_argument("--pool", default=None, help="only this pool's refunds")
    refunds.add_argument("--limit", type=int, default=50)
    audit = action("audit", "the audit log, newest first")
    audit.add_argument("--limit", type=int, default=50)
    for name in ("--actor-name", "--target", "--action"):
        audit.add_argument(name, help=f"only records with this {name.removeprefix('--').split('-')[0]}")


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--url", default=default, help="the gateway's base URL (AGW_ADMIN_URL)")
    parser.add_argument("--token", default=default, help="the admin token (AGW_ADMIN_TOKEN)")
    parser.add_argument("--actor", default=default, help="who is acting, for the audit log (AGW_ADMIN_ACTOR)")
    parser.add_argument("--json", action="store_true", default=default or False,
                        help="print the API's JSON instead of text")


class AdminCallFailed(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_admin(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return _run(args, settings)
    except AdminCallFailed as exc:
        print(f"agent-gateway: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace, settings: Settings) -> int:
    url = (args.url or os.environ.get("AGW_ADMIN_URL") or settings.external_url).rstrip("/")
    token = args.token or settings.admin_token
    if not token:
        raise AdminCallFailed("set AGW_ADMIN_TOKEN (or --token) to the gateway's admin token", exit_code=2)
    actor = args.actor or os.environ.get("AGW_ADMIN_ACTOR")
    command = args.admin_command
    reason = {"reason": args.reason} if getattr(args, "reason", None) else {}
    account = quote(getattr(args, "account", "") or "", safe="")
    calls: dict[str, tuple[str, str, Any]] = {
        "pools": ("GET", "/api/admin/pools", None),
        "pool-state": ("POST", f"/api/admin/pools/{quote(getattr(args, 'slug', '') or '', safe='')}/state",
                       {"status": getattr(args, "status", None), **reason}),
        "reload": ("POST", "/api/admin/pools/reload", reason),
        "find": ("GET", "/api/admin/accounts?" + urlencode({"q": getattr(args, "query", "")}), None),
        "account": ("GET", f"/api/admin/accounts/{account}", None),
        "credit": ("POST", f"/api/admin/accounts/{account}/balance",
                   {"amount": getattr(args, "amount", ""), "reason": getattr(args, "reason", None) or ""}),
        "debit": ("POST", f"/api/admin/accounts/{account}/balance",
                  {"amount": "-" + (getattr(args, "amount", "") or "").lstrip("+"),
                   "reason": getattr(args, "reason", None) or ""}),
        "disable": ("POST", f"/api/admin/accounts/{account}/disable", reason),
        "enable": ("POST", f"/api/admin/accounts/{account}/enable", reason),
        "money": ("GET", f"/api/admin/money?days={getattr(args, 'days', 30)}", None),
        "refund": ("POST", f"/api/admin/payments/{quote(getattr(args, 'payment', '') or '', safe='')}/refund",
                   {**({"to": args.to} if getattr(args, "to", None) else {}), **reason}),
        "refunds": ("GET", "/api/admin/refunds?" + urlencode({k: v for k, v in {
            "limit": getattr(args, "limit", 50), "state": getattr(args, "state", None),
            "pool": getattr(args, "pool", None)}.items() if v is not None}), None),
        "audit": ("GET", "/api/admin/audit?" + urlencode({k: v for k, v in {
            "limit": getattr(args, "limit", 50), "actor": getattr(args, "actor_name", None),
            "target": getattr(args, "target", None), "action": getattr(args, "action", None)}.items()
            if v is not None}), None),
    }
    method, path, body = calls[command]
    if method == "POST" and not actor:
        raise AdminCallFailed("name yourself for the audit log: --actor NAME or AGW_ADMIN_ACTOR", exit_code=2)
    import httpx  # here, so that `agent-gateway --help` stays fast

    headers = {"Authorization": f"Bearer {token}"}
    if actor:
        headers["X-Admin-Actor"] = actor
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            response = http.request(method, path, headers=headers, json=body if method == "POST" else None)
    except httpx.HTTPError as exc:
        raise AdminCallFailed(f"cannot reach the gateway at {url} ({type(exc).__name__}); "
                              "is it running? (--url or AGW_ADMIN_URL)") from None
    try:
        payload = response.json()
    except ValueError:
        raise AdminCallFailed(f"{url}{path} answered {response.status_code} without JSON") from None
    if response.status_code >= 400 or not isinstance(payload, dict) or "data" not in payload:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        raise AdminCallFailed(f"{error.get('message', 'refused')} ({response.status_code} {error.get('code', '')})")
    data = payload["data"]
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for line in _text(command, data):
            print(line)
    return 0


def _text(command: str, data: Any) -> list[str]:
    """A few lines a person reads; --json has everything."""
    if command == "pools":
        lines = []
        for pool in data:
            blocks = ", ".join(f"{b['block']} {b['sold']}/{b['seats']} sold" for b in pool["blocks"])
            lines.append(f"{pool['slug']:<16} {pool['status']:<10} in flight {pool['inFlight'] if pool['inFlight'] is not None else '?':<4} {blocks}")
            if pool.get("funding"):
                round_ = pool["funding"]
                lines[-1] += f"; pledged {round_['progress']} of the goal" + (
                    f" by {round_['deadline']}" if round_["deadline"] else "")
        return lines
    if command == "pool-state":
        return [f"pool {data['slug']}: {data['status']}"]
    if command == "reload":
        changed = "applied" if data["changed"] else "unchanged"
        added = f"; new pools: {', '.join(data['added'])}" if data["added"] else ""
        return [f"pools file {changed} (version {data['sha256'][:12]}); pools: {', '.join(data['pools'])}{added}"]
    if command == "find":
        return [f"{a['id']}  {a['name']}  balance {a['balance']} USDC  wallet {a['walletAddress'] or '-'}"
                f"{'  DISABLED' if a['disabled'] else ''}" for a in data] or ["no account found"]
    if command == "account":
        return ([f"{data['id']}  {data['name']}  balance {data['balance']} USDC"
                 f"{'  DISABLED' if data['disabled'] else ''}"]
                + [f"  subscription {s['id']} {s['pool']} {','.join(s['blocks'])} {s['status']} until "
                   f"{s['currentPeriodEnd']}" for s in data["subscriptions"]]
                + [f"  key {k['id']} {k['keyPreview']} {k['status']}" for k in data["keys"]]
                + [f"  payment {p['id']} {p['state']} {p['amount']} USDC" for p in data["payments"]])
    if command in ("credit", "debit"):
        return [f"account {data['id']}: balance {data['balance']} USDC"]
    if command == "disable":
        return [f"account {data['id']} disabled; keys revoked: {', '.join(data['keysRevoked']) or 'none'}"]
    if command == "enable":
        return [f"account {data['id']} enabled; keys enabled: {', '.join(data['keysEnabled']) or 'none'}"]
    if command == "money":
        lines = [f"revenue, last {data['days']} days:"]
        lines += [f"  {pool}: {r['amount']} USDC ({r['payments']} payments)"
                  for pool, r in data["revenueByPool"].items()]
        lines += ["payments by state: " + ", ".join(f"{s} {v['count']}" for s, v in data["paymentsByState"].items())]
        lines += [f"  ATTENTION {p['why']}: {p['id']} {p['state']} {p['amount']} USDC {p['txHash'] or ''}"
                  for p in data["needsAttention"]]
        if data["balances"]:
            b = data["balances"]
            relayer = (f"relayer {b['relayer']}: {b['relayerNativeWei']} wei" if b["relayer"]
                       else "no relayer (a facilitator settles)")
            lines.append(f"{relayer}; payTo {b['payTo']}: {b['payToUsdc']} USDC"
                         + (f" ({b['error']})" if b["error"] else ""))
        wallet = data.get("refundWallet")
        if wallet:
            lines.append(f"refund wallet {wallet['address']}: {wallet['usdc']} USDC, {wallet['nativeWei']} wei "
                         f"(gas for {wallet['refundsLeftByGas']} refunds); {wallet['outstanding']} being sent"
                         + (f" ({wallet['error']})" if wallet["error"] else ""))
        return lines
    if command == "refund":
        sent = f"; tx {data['txHash']}" if data["txHash"] else ""
        waiting = f" (waiting: {data['waiting']})" if data["waiting"] else ""
        return [f"refund {data['id']} of payment {data['paymentId']}: {data['amount']} USDC to {data['destination']}"
                f"{' ' + data['to'] if data['destination'] == 'chain' else ''}, {data['state']}{waiting}{sent}",
                f"keys revoked: {', '.join(data['keysRevoked']) or 'none'}"]
    if command == "refunds":
        return [f"{r['id']}  {r['state']:<9} {r['destination']:<7} {r['amount']:>10} USDC  {r['pool']:<12} "
                f"{r['paymentId'] or r['subscriptionId'] or '-'}  {r['reason']}"
                + (f"  waiting: {r['waiting']}" if r["waiting"] else "") + (f"  tx {r['txHash']}" if r["txHash"] else "")
                for r in data] or ["no refunds"]
    if command == "audit":
        return [f"{a['createdAt']}  {a['actor']:<12} {a['action']:<16} {a['target']}  {a['reason']}" for a in data]
    return [json.dumps(data)]
