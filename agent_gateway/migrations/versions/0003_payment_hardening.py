"""payment hardening: the transaction that carried a payment, reorg re-checks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from eth_utils import keccak


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# ux_payments_tx_hash: before, every payment's transaction; from here on, tx-hash claims only. One
# transaction may carry several x402 payments (a bundle of authorizations), each its own payment.
_EVERY_TX_HASH = "state <> 'failed' AND tx_hash IS NOT NULL"
_CLAIMED_TX_HASH = "method = 'tx-hash' AND state <> 'failed' AND tx_hash IS NOT NULL"


def _tx_hash_index(where: str) -> None:
    op.create_index('ux_payments_tx_hash', 'payments', ['tx_hash'], unique=True,
                    sqlite_where=sa.text(where), postgresql_where=sa.text(where))


def upgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('watch_from_block', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('block_number', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('sender_nonce', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('credit_atomic', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('chain_final', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('rechecked_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_payments_recheck', ['chain_final', 'state'], unique=False)
    # Outside the batch: a plain DROP/CREATE INDEX on both databases (SQLite never copies the table).
    op.drop_index('ux_payments_tx_hash', table_name='payments')
    _tx_hash_index(_CLAIMED_TX_HASH)
    # Payments delivered before this revision were never re-checked; they are not started now
    # (their block is unknown), and ended payments have nothing to re-check.
    op.execute("UPDATE payments SET chain_final = TRUE WHERE state IN ('delivered', 'credited', 'failed')")


def _unshare_carriers() -> None:
    """The older index holds one payment per transaction. An x402 payment that shares its carrier
    with another payment gets back the hash of its own settlement (the bytes it stored), which is
    what the older code recorded; without stored bytes it records none."""
    bind = op.get_bind()
    shared = bind.execute(sa.text(
        "SELECT id, raw_tx FROM payments WHERE method = 'x402-exact' AND state <> 'failed' AND tx_hash IN "
        "(SELECT tx_hash FROM payments WHERE state <> 'failed' AND tx_hash IS NOT NULL "
        "GROUP BY tx_hash HAVING COUNT(*) > 1)")).all()
    for payment_id, raw_tx in shared:
        own = "0x" + keccak(bytes.fromhex(raw_tx.removeprefix("0x"))).hex() if raw_tx else None
        bind.execute(sa.text("UPDATE payments SET tx_hash = :tx_hash WHERE id = :id"),
                     {"tx_hash": own, "id": payment_id})


def downgrade() -> None:
    # The older code knows no `revoked`; to it a payment whose money is gone is `failed` (the
    # reason stays), which its reconciler leaves alone.
    op.execute("UPDATE payments SET state = 'failed' WHERE state = 'revoked'")
    op.drop_index('ux_payments_tx_hash', table_name='payments')
    _unshare_carriers()
    _tx_hash_index(_EVERY_TX_HASH)
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_index('ix_payments_recheck')
        batch_op.drop_column('rechecked_at')
        batch_op.drop_column('chain_final')
        batch_op.drop_column('credit_atomic')
        batch_op.drop_column('sender_nonce')
        batch_op.drop_column('block_number')
        batch_op.drop_column('watch_from_block')
