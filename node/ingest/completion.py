"""When a series is complete, every rule in one place.

Nobody can know for sure when a sender is done, so the node waits for a quiet period,
``study.stable_seconds`` without a new instance, as Orthanc (StableAge) and mercure do. A single-image
modality's series is complete on arrival. An instance that arrives after its series was routed is
late: by ``study.late_instances`` it makes the series wait and run again, or it is only counted.

A whole study is stable when none of its series is still receiving and no instance has come for
``study.stable_seconds``; a route with ``group = "study"`` waits for that, even for single-image
series (the second eye of a fundus visit may come seconds after the first). Any arrival makes the
study wait again.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from node import audit
from node.config import StudySettings
from node.db import Database, Series, SeriesStatus, Study, utcnow

HANDLED = (SeriesStatus.ROUTED, SeriesStatus.NO_ROUTE)  # routing has decided


def arrived(series: Series, settings: StudySettings, now: datetime, duplicate: bool) -> bool:
    """Update ``series``' readiness for an instance just indexed into it. Returns whether the instance
    is late (a new one after the series was routed)."""
    late = series.status in HANDLED and not duplicate
    if late:
        series.late_instances = (series.late_instances or 0) + 1
    series.last_received_at = now
    series.study.stable_at = None  # whatever came, the study may not be done
    single = series.modality in {m.upper() for m in settings.single_image_modalities}
    waiting = series.status in (SeriesStatus.RECEIVING, SeriesStatus.READY)
    if waiting or (late and settings.late_instances == "rerun"):
        series.status = SeriesStatus.READY if single else SeriesStatus.RECEIVING
        series.ready_at = now if single else None
    return late


def mark_stable(db: Database, settings: StudySettings) -> int:
    """Mark every series quiet for long enough as ready, then every study with no series still
    receiving and no instance for as long as stable. Returns how many series became ready."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stable_seconds)
    with db.session() as session:
        # One conditional UPDATE: an instance indexed meanwhile keeps its series waiting.
        ready = session.scalars(
            update(Series)
            .where(Series.status == SeriesStatus.RECEIVING, Series.last_received_at <= cutoff)
            .values(status=SeriesStatus.READY, ready_at=now)
            .returning(Series)
        ).all()
        for series in ready:
            audit.record(
                session,
                "series.ready",
                study_uid=series.study.study_uid,
                series_uid=series.series_uid,
                instances=series.instance_count,
                late_instances=series.late_instances,
            )
        receiving = select(Series.id).where(
            Series.study_fk == Study.id, Series.status == SeriesStatus.RECEIVING
        )
        session.execute(
            update(Study)
            .where(Study.stable_at.is_(None), Study.last_received_at <= cutoff, ~receiving.exists())
            .values(stable_at=now)
        )
        return len(ready)
