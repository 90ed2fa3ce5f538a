"""refunds: a closed funding round's pledges and the operator's single-payment refunds

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel.sql.sqltypes


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('refunds',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('payment_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('subscription_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('account_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('pool_slug', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('amount_atomic', sa.BigInteger(), nullable=False),
    sa.Column('destination', sa.String(length=10), nullable=False),
    sa.Column('to_address', sqlmodel.sql.sqltypes.AutoString(length=42), nullable=True),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('note', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('waiting', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
    sa.Column('from_address', sqlmodel.sql.sqltypes.AutoString(length=42), nullable=True),
    sa.Column('nonce', sa.BigInteger(), nullable=True),
    sa.Column('tx_hash', sqlmodel.sql.sqltypes.AutoString(length=66), nullable=True),
    sa.Column('raw_tx', sa.Text(), nullable=True),
    sa.Column('block_number', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.create_index('ix_refunds_state_updated', ['state', 'updated_at'], unique=False)
        batch_op.create_index('ux_refunds_nonce', ['from_address', 'nonce'], unique=True,
                              sqlite_where=sa.text('nonce IS NOT NULL'), postgresql_where=sa.text('nonce IS NOT NULL'))
        batch_op.create_index('ux_refunds_payment', ['payment_id'], unique=True,
                              sqlite_where=sa.text('payment_id IS NOT NULL'),
                              postgresql_where=sa.text('payment_id IS NOT NULL'))
        batch_op.create_index('ux_refunds_subscription', ['subscription_id'], unique=True,
                              sqlite_where=sa.text('subscription_id IS NOT NULL'),
                              postgresql_where=sa.text('subscription_id IS NOT NULL'))


def downgrade() -> None:
    with op.batch_alter_table('refunds', schema=None) as batch_op:
        batch_op.drop_index('ux_refunds_subscription')
        batch_op.drop_index('ux_refunds_payment')
        batch_op.drop_index('ux_refunds_nonce')
        batch_op.drop_index('ix_refunds_state_updated')
    op.drop_table('refunds')
