"""Migration 0003 on SQLite and PostgreSQL: one transaction may carry several x402 payments, while a
tx-hash claim holds its transaction alone; going back to 0002 gives the older code what it knew."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic import command
from eth_utils import keccak

from agent_gateway.db.engine import sync_url
from agent_gateway.db.migrate import alembic_config, upgrade_database

CARRIER = "0x" + "ab" * 32
SETTLEMENTS = {"pay_a": "0x" + "01" * 40, "pay_b": "0x" + "02" * 40}  # each x402 payment's own signed bytes


def payment_row(payment_id: str, method: str, *, nonce: str | None, raw_tx: str | None) -> dict:
    return {"id": payment_id, "method": method, "network": "eip155:31337", "payer": "0x" + "11" * 20,
            "amount_atomic": 10, "auth_nonce": nonce, "tx_hash": CARRIER, "raw_tx": raw_tx, "state": "delivered",
            "seats_held": False, "pool_slug": "alpha", "blocks": '["europe"]', "quantity": 1,
            "billing_cycle": "month", "unit_price_atomic": 10, "key_name": "agent",
            "created_at": "2026-11-27 10:00:00+00:00", "updated_at": "2026-11-27 10:00:00+00:00"}


def insert(connection, row: dict) -> None:
    columns = ", ".join(row)
    connection.execute(sa.text(f"INSERT INTO payments ({columns}) VALUES ({', '.join(':' + c for c in row)})"), row)


def test_a_carrier_shared_by_x402_payments_survives_the_migration_both_ways(database_url):
    engine = sa.create_engine(sync_url(database_url))
    try:
        with engine.begin() as connection:
            insert(connection, payment_row("pay_a", "x402-exact", nonce="0x01", raw_tx=SETTLEMENTS["pay_a"]))
            insert(connection, payment_row("pay_b", "x402-exact", nonce="0x02", raw_tx=SETTLEMENTS["pay_b"]))
            insert(connection, payment_row("pay_c", "tx-hash", nonce=None, raw_tx=None))
            with pytest.raises(sa.exc.IntegrityError), connection.begin_nested():
                insert(connection, payment_row("pay_d", "tx-hash", nonce=None, raw_tx=None))

        command.downgrade(alembic_config(database_url), "0002")

        with engine.begin() as connection:
            hashes = dict(connection.execute(sa.text("SELECT id, tx_hash FROM payments")).all())
            # The older index holds one payment per transaction: the x402 payments name their own
            # settlements again (as the older code recorded them), the tx-hash claim keeps its own.
            assert hashes == {**{pid: "0x" + keccak(bytes.fromhex(raw[2:])).hex() for pid, raw in SETTLEMENTS.items()},
                              "pay_c": CARRIER}
            with pytest.raises(sa.exc.IntegrityError), connection.begin_nested():
                insert(connection, {**payment_row("pay_e", "x402-exact", nonce="0x03", raw_tx=None)})

        upgrade_database(database_url)

        with engine.begin() as connection:
            insert(connection, payment_row("pay_f", "x402-exact", nonce="0x04", raw_tx=None))
            assert connection.execute(sa.text("SELECT count(*) FROM payments WHERE tx_hash = :h"),
                                      {"h": CARRIER}).scalar() == 2
    finally:
        engine.dispose()
