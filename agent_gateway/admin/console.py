"""The operator's console as one value: the admin services every face (API, CLI, dashboard) uses."""

from __future__ import annotations

from dataclasses import dataclass

from agent_gateway.admin.accounts import AccountAdmin
from agent_gateway.admin.funding import FundingWatch
from agent_gateway.admin.money import MoneyReport
from agent_gateway.admin.pools import PoolAdmin
from agent_gateway.admin.refunds import RefundAdmin
from agent_gateway.db.engine import Database


@dataclass
class AdminConsole:
    db: Database
    pools: PoolAdmin
    accounts: AccountAdmin
    money: MoneyReport
    funding: FundingWatch
    refunds: RefundAdmin
