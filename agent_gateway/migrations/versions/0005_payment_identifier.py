"""x402 payment-identifier: a payer's idempotency key and the request it was first sent with

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel.sql.sqltypes


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_HELD = "state <> 'failed' AND payment_identifier IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('payment_identifier', sqlmodel.sql.sqltypes.AutoString(length=128),
                                      nullable=True))
        batch_op.add_column(sa.Column('request_fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64),
                                      nullable=True))
    # Outside the batch: a plain CREATE INDEX on both databases (SQLite never copies the table).
    op.create_index('ux_payments_identifier', 'payments', ['payer', 'payment_identifier'], unique=True,
                    sqlite_where=sa.text(_HELD), postgresql_where=sa.text(_HELD))


def downgrade() -> None:
    op.drop_index('ux_payments_identifier', table_name='payments')
    with op.batch_alter_table('payments', schema=None) as batch_op:
        batch_op.drop_column('request_fingerprint')
        batch_op.drop_column('payment_identifier')
