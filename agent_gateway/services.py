"""The composition root's product: every running service, built once by lifespan.build_services.

The faces (api/, v1/, dashboard/) reach it through `web.auth.services_of`; nothing below the
web floor imports it."""

from __future__ import annotations

from dataclasses import dataclass

from agent_gateway.admin.console import AdminConsole
from agent_gateway.catalog.pools import Catalog
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.jobs.runner import JobRunner
from agent_gateway.keys.lifecycle import KeyLifecycle
from agent_gateway.keys.revocation import RevocationBus
from agent_gateway.payments.service import PaymentService
from agent_gateway.proxy.directory import KeyDirectory
from agent_gateway.proxy.leases import Leases
from agent_gateway.proxy.streams import StreamRegistry
from agent_gateway.proxy.upstream import UpstreamClient
from agent_gateway.ratelimit import AttemptLimiter
from agent_gateway.settings import Settings
from agent_gateway.usage.recorder import UsageRecorder


@dataclass
class Services:
    settings: Settings
    clock: Clock
    db: Database
    catalog: Catalog
    usage: UsageRecorder
    jobs: JobRunner
    directory: KeyDirectory
    leases: Leases
    bus: RevocationBus
    streams: StreamRegistry
    keys: KeyLifecycle
    upstream: UpstreamClient
    payments: PaymentService
    attempts: AttemptLimiter
    admin: AdminConsole
