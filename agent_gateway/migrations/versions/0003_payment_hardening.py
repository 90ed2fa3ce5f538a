"""payment hardening: the transaction that carried a payment, reorg re-checks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel.sql.sqltypes


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('watch_from_block', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('block_number', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('sender_nonce', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('credit_atomic', sa.BigInteger(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('chain_final', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index('ix_payments_recheck', ['chain_final', 'state'], unique=False)
    # Payments delivered before this revision were never re-checked; they are not started now
    # (their block is unknown), and ended payments have nothing to re-check.
    op.execute("UPDATE payments SET chain_final = TRUE WHERE state IN ('delivered', 'credited', 'failed')")


def downgrade() -> None:
    # The older code knows no `revoked`; to it a payment whose money is gone is `failed` (the
    # reason stays), which its reconciler leaves alone.
    op.execute("UPDATE payments SET state = 'failed' WHERE state = 'revoked'")
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_index('ix_payments_recheck')
        batch_op.drop_column('chain_final')
        batch_op.drop_column('credit_atomic')
        batch_op.drop_column('sender_nonce')
        batch_op.drop_column('block_number')
        batch_op.drop_column('watch_from_block')
