"""series keep their routing header; jobs carry their outputs and companion models

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_OUTPUTS = '[{"writer": "sc"}, {"writer": "sr"}]'  # what every route wrote before outputs were chosen


def upgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        # Null for series indexed before this revision: routing reads their first file instead.
        batch_op.add_column(sa.Column("header", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("outputs", sa.JSON(), nullable=False, server_default=sa.text(f"'{DEFAULT_OUTPUTS}'"))
        )
        batch_op.add_column(
            sa.Column("companions", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("companions")
        batch_op.drop_column("outputs")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("header")
