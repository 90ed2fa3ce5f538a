"""dashboard sessions kept server-side (revocable), SIWE sign-in messages

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel.sql.sqltypes


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dashboard_sessions',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('account_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('management_key_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['management_key_id'], ['management_keys.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dashboard_sessions_management_key_id'), ['management_key_id'],
                              unique=False)

    # A SIWE message carries AGW_PUBLIC_URL twice (domain and URI): no fixed bound fits it.
    with op.batch_alter_table('wallet_challenges', schema=None) as batch_op:
        batch_op.alter_column('message', existing_type=sqlmodel.sql.sqltypes.AutoString(length=500),
                              type_=sa.Text(), existing_nullable=False)


def downgrade() -> None:
    # Challenges live ten minutes: drop the ones a 500-character column cannot hold.
    op.execute("DELETE FROM wallet_challenges WHERE length(message) > 500")
    with op.batch_alter_table('wallet_challenges', schema=None) as batch_op:
        batch_op.alter_column('message', existing_type=sa.Text(),
                              type_=sqlmodel.sql.sqltypes.AutoString(length=500), existing_nullable=False)

    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dashboard_sessions_management_key_id'))

    op.drop_table('dashboard_sessions')
