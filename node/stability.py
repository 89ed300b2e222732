"""Deciding that a series is complete: no new instance for ``study.stable_seconds``.

Nobody can know for sure when a sender is done, so the node waits for a quiet period, as Orthanc
(StableAge) and mercure do. Single-image modalities are marked ready on arrival (node.index).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from node import audit
from node.config import StudySettings
from node.db import Database, Series, SeriesStatus, utcnow


def mark_stable(db: Database, settings: StudySettings) -> int:
    """Mark every series quiet for long enough as ready. Returns how many."""
    cutoff = utcnow() - timedelta(seconds=settings.stable_seconds)
    with db.session() as session:
        due = session.scalars(
            select(Series.id).where(
                Series.status == SeriesStatus.RECEIVING, Series.last_received_at <= cutoff
            )
        ).all()
    if not due:
        return 0
    with audit.writing(db) as session:
        count = 0
        for series in session.scalars(select(Series).where(Series.id.in_(due))):
            if series.status != SeriesStatus.RECEIVING or series.last_received_at > cutoff:
                continue  # an instance arrived in between: keep waiting
            series.status = SeriesStatus.READY
            series.ready_at = utcnow()
            count += 1
            audit.record(
                session,
                "series.ready",
                study_uid=series.study.study_uid,
                series_uid=series.series_uid,
                instances=series.instance_count,
                late_instances=series.late_instances,
            )
        return count
