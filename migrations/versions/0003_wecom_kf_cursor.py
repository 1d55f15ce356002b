"""WeChat Customer Service: the sync_msg cursor per service account

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "wecom_kf_cursors",
        sa.Column("account", sa.String(length=128), nullable=False),
        sa.Column("open_kfid", sa.String(length=64), nullable=False),
        sa.Column("cursor", sa.String(length=255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account", "open_kfid", name=op.f("pk_wecom_kf_cursors")),
    )


def downgrade() -> None:
    op.drop_table("wecom_kf_cursors")
