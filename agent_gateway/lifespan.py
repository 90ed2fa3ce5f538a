"""Builds the running services from Settings, starts their background work and stops it in order."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta

from starlette.applications import Starlette

from agent_gateway.admin.accounts import AccountAdmin
from agent_gateway.admin.console import AdminConsole
from agent_gateway.admin.funding import FundingWatch
from agent_gateway.admin.money import MoneyReport
from agent_gateway.admin.pools import PoolAdmin
from agent_gateway.admin.refunds import RefundAdmin
from agent_gateway.admin.sessions import delete_stale_admin_sessions
from agent_gateway.catalog.pools import parse_catalog, read_pools_file
from agent_gateway.subscriptions.funding import start_pledges
from agent_gateway.clock import Clock
from agent_gateway.db.engine import Database
from agent_gateway.db.models import RefundDestination
from agent_gateway.db.migrate import upgrade_database
from agent_gateway.errors import GatewayError
from agent_gateway.jobs.expiry import expire_subscriptions
from agent_gateway.jobs.runner import JobRunner, Pass
from agent_gateway.keys.lifecycle import KeyLifecycle
from agent_gateway.keys.revocation import RESTORED, KeyRevoker, RedisRevocationBus, make_revocation_bus
from agent_gateway.keys.sessions import delete_stale_sessions
from agent_gateway.metrics import SUBSCRIPTIONS_EXPIRED
from agent_gateway.payments.chain import ChainAdapter
from agent_gateway.payments.checks import RelayerGasWatch, verify_chain
from agent_gateway.payments.facilitator import FacilitatorClient
from agent_gateway.payments.late import LatePayments
from agent_gateway.payments.refunds import Refunds
from agent_gateway.payments.reorgs import ReorgWatch
from agent_gateway.payments.service import FacilitatorMismatch, PaymentService
from agent_gateway.payments.wallet import delete_stale_challenges
from agent_gateway.proxy.directory import KeyDirectory
from agent_gateway.proxy.leases import Leases, make_leases
from agent_gateway.proxy.streams import StreamRegistry
from agent_gateway.proxy.upstream import UpstreamClient, UpstreamTimeouts
from agent_gateway.ratelimit import AttemptLimiter, make_attempt_limiter
from agent_gateway.services import Services
from agent_gateway.settings import Settings
from agent_gateway.usage.recorder import UsageRecorder

log = logging.getLogger(__name__)

# How long a sign-in challenge or session row is kept after it expired or was ended.
STALE_ROWS_KEPT = timedelta(days=1)


def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    """Everything the routes use, built once; nothing is started yet."""
    clock = clock or Clock()
    pools_text = read_pools_file(settings.pools_file)
    catalog = parse_catalog(pools_text, str(settings.pools_file))
    db = Database(settings.database_url)
    usage = UsageRecorder(db)
    leases = make_leases(settings.redis_url, settings.lease_ttl_s)
    bus = make_revocation_bus(settings.redis_url)
    streams = StreamRegistry()
    revoker = KeyRevoker(leases, bus)
    upstream = UpstreamClient(
        UpstreamTimeouts(
            connect_s=settings.upstream_connect_timeout_s,
            first_byte_s=settings.upstream_first_byte_timeout_s,
            total_s=settings.upstream_total_timeout_s,
        ),
        max_connections=settings.upstream_max_connections,
        kind=settings.upstream_client,
    )

    payments = PaymentService(settings, db, clock, catalog, chain_adapter_for(settings), facilitator_for(settings))

    keys = KeyLifecycle(db, clock, revoker)
    # Pool changes reach the other processes on a channel of their own (the payload is only a hint:
    # each process re-reads the database), and by polling should a message be missed.
    notifier = (RedisRevocationBus(settings.redis_url, channel="agw:catalog", client_name="agw-catalog")
                if settings.redis_url else None)
    pools = PoolAdmin(db, clock, catalog, settings.pools_file, pools_text, leases, notifier, settings.catalog_poll_s)
    refunds = Refunds(db, clock, keys, refund_wallet_for(settings),
                      default_destination=RefundDestination(settings.refund_to),
                      confirmations=payments.confirmations, horizon_blocks=payments.reorg_horizon_blocks)
    # A pool marked active starts every pledge's period in the transition's own transaction; a
    # closed one cancels every pledge and plans its refund there (keys ended once it committed).
    pools.transition_hooks.append(start_pledges)
    pools.transition_hooks.append(refunds.on_pool_transition)
    pools.committed_hooks.append(refunds.after_pool_transition)
    admin = AdminConsole(
        db=db, pools=pools,
        accounts=AccountAdmin(db, clock, keys),
        money=MoneyReport(db, clock, settings, payments.chain, refunds),
        funding=FundingWatch(db, pools),
        refunds=RefundAdmin(db, refunds),
    )

    async def expiry_pass() -> None:
        result = await expire_subscriptions(db, clock)
        SUBSCRIPTIONS_EXPIRED.inc(len(result.subscription_ids))
        await keys.end_revoked_keys(result.revoked_key_ids, "subscription_expired")

    async def housekeeping_pass() -> None:
        # Sign-in challenges and sessions past their end are worthless (refused with or without
        # their row); a day's grace keeps a just-ended one's row for whoever looks into it.
        before = clock.now() - STALE_ROWS_KEPT
        deleted = {"sign-in challenges": await delete_stale_challenges(db, before),
                   "dashboard sessions": await delete_stale_sessions(db, before),
                   "console sessions": await delete_stale_admin_sessions(db, before)}
        if any(deleted.values()):
            log.info("housekeeping: deleted %s, each ended over %s ago",
                     ", ".join(f"{count} {what}" for what, count in deleted.items()), STALE_ROWS_KEPT)

    reorgs = ReorgWatch(payments)

    async def reorg_pass() -> None:
        for revocation in await reorgs.recheck_settled():
            await keys.end_revoked_keys(revocation.key_ids, "payment_revoked")

    passes: dict[str, Pass] = {"expiry": expiry_pass, "payments": payments.reconcile, "reorgs": reorg_pass,
                               "late_payments": LatePayments(payments).check,
                               "funding": admin.funding.check, "funding_deadlines": admin.funding.close_overdue,
                               "refunds": refunds.run, "housekeeping": housekeeping_pass}
    if payments.chain is not None and payments.facilitator is None:  # own settlement: the relayer's gas, into /metrics
        passes["relayer_gas"] = RelayerGasWatch(payments.chain, settings.relayer_warn_settlements)
    return Services(
        settings=settings, clock=clock, db=db, catalog=catalog, usage=usage,
        jobs=JobRunner(settings.job_interval_s, passes, exclusive=db.exclusive),
        directory=KeyDirectory(db, ttl_s=settings.key_cache_ttl_s),
        leases=leases, bus=bus, streams=streams, keys=keys, upstream=upstream,
        payments=payments,
        attempts=make_attempt_limiter(settings.redis_url, settings.unauth_writes_per_minute,
                                      settings.unauth_attempts_in_flight),
        admin=admin,
    )


def chain_adapter_for(settings: Settings) -> ChainAdapter | None:
    """The chain adapter when the chain is configured (Settings checks it is all or nothing)."""
    chain = settings.chain
    if chain is None:
        return None
    return ChainAdapter(chain.rpc_url, chain.chain_id, chain.usdc_address, chain.relayer_key)


def refund_wallet_for(settings: Settings) -> ChainAdapter | None:
    """The refund wallet (a chain adapter signing with AGW_REFUND_PRIVATE_KEY) when on-chain refunds
    are configured; its nonces are its own (Settings refuses the relayer's key)."""
    chain = settings.chain
    if chain is None or settings.refund_private_key is None:
        return None
    return ChainAdapter(chain.rpc_url, chain.chain_id, chain.usdc_address, settings.refund_private_key)


def facilitator_for(settings: Settings) -> FacilitatorClient | None:
    """The x402 facilitator client when payments settle through one (AGW_FACILITATOR_URL)."""
    chain = settings.chain
    if chain is None or chain.facilitator_url is None:
        return None
    return FacilitatorClient(chain.facilitator_url, auth_header=chain.facilitator_auth_header,
                             timeout_s=chain.facilitator_timeout_s)


@asynccontextmanager
async def run_services(services: Services) -> AsyncIterator[Services]:
    settings = services.settings
    if settings.chain is not None and services.payments.chain is not None:
        # Payments on: refuse to start on a chain, token or relayer that does not match the settings.
        for line in settings.preset_overrides:
            log.warning("%s", line)
        await verify_chain(settings.chain, services.payments.chain,
                           own_settlement=services.payments.facilitator is None,
                           warn_settlements=settings.relayer_warn_settlements,
                           refund_wallet=services.admin.refunds.refunds.wallet)
    if settings.auto_migrate:
        # Alembic is synchronous; run it before the server takes traffic.
        import anyio.to_thread

        await anyio.to_thread.run_sync(upgrade_database, settings.database_url)
    # The pools file under the reload rules: new pools seeded, stored states applied, a bad file refused.
    await services.admin.pools.start()
    await services.db.warm_up()
    # Before any traffic: a facilitator that cannot settle on our network stops the start.
    try:
        await services.payments.check_facilitator()
    except (FacilitatorMismatch, GatewayError) as exc:
        log.error("agent_gateway not starting: %s", exc)
        raise

    def on_revocation(key_id: str, reason: str) -> None:
        services.directory.forget(key_id)
        if reason != RESTORED:
            services.streams.cancel_key(key_id, reason)

    services.bus.subscribe(on_revocation)
    await services.bus.start()
    await services.upstream.start()
    services.usage.start()
    services.jobs.start()
    log.info(
        "agent_gateway ready: %d pools, blocks %s, database %s",
        len(services.catalog.pools),
        ", ".join(f"{b.name} {b.hours_utc}" for b in services.catalog.blocks.values()),
        services.db.engine.url.render_as_string(hide_password=True),
    )
    try:
        yield services
    finally:
        # Stop taking new background work, then drain usage so no record is lost, then close.
        await services.jobs.stop()
        await services.admin.pools.close()
        await services.upstream.close()
        await services.usage.close()
        await services.bus.close()
        await services.leases.close()
        await services.attempts.close()
        if services.payments.chain is not None:
            await services.payments.chain.close()
        if services.admin.refunds.refunds.wallet is not None:
            await services.admin.refunds.refunds.wallet.close()
        if services.payments.facilitator is not None:
            await services.payments.facilitator.close()
        await services.db.dispose()
        log.info("agent_gateway stopped")


def lifespan_for(services: Services) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with run_services(services):
            yield

    return lifespan
