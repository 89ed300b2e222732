"""jobs may cover several series (study-level routes); studies record when they were last stable

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
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
        "job_series",
        sa.Column("job_fk", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_fk"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"]),
        sa.PrimaryKeyConstraint("job_fk", "series_fk"),
    )
    with op.batch_alter_table("job_series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_series_series_fk"), ["series_fk"], unique=False)
    # Every job made before this revision analysed its own series, and only that one.
    op.execute("INSERT INTO job_series (job_fk, series_fk) SELECT id, series_fk FROM jobs")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        # Null until the node next finds the study quiet (node.ingest.completion.mark_stable).
        batch_op.add_column(sa.Column("stable_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_stable_at"), ["stable_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_stable_at"))
        batch_op.drop_column("stable_at")
    with op.batch_alter_table("job_series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_series_series_fk"))
    op.drop_table("job_series")
