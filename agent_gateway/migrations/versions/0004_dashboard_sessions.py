"""dashboard sessions kept server-side (revocable), SIWE sign-in messages

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
