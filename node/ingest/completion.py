"""When a series is complete, every rule in one place.

Nobody can know for sure when a sender is done, so the node waits for a quiet period,
``study.stable_seconds`` without a new instance, as Orthanc (StableAge) and mercure do. A single-image
modality's series is complete on arrival. An instance that arrives after its series was routed is
late: by ``study.late_instances`` it makes the series wait and run again, or it is only counted.

A whole study is stable when none of its series is still receiving and no instance has come for
``study.stable_seconds``; a route with ``group = "study"`` waits for that, even for single-image
series (the second eye of a fundus visit may come seconds after the first). Any arrival makes the
study wait again.

Quiet is not enough: while an acknowledged instance of a series is not indexed yet (queued, or held
while the database is unavailable: node.ingest.index.Indexer), neither the series nor its study is
complete, however long ago the last indexed instance came.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from node import audit
from node.config import StudySettings
from node.db import Database, Series, SeriesStatus, Study, utcnow

if TYPE_CHECKING:  # the indexer applies these rules: it imports this module
    from node.ingest.index import Unindexed

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


def mark_stable(db: Database, settings: StudySettings, unindexed: Unindexed | None = None) -> int:
    """Mark every series quiet for long enough as ready, then every study with no series still
    receiving and no instance for as long as stable; but none of the series and studies of what is
    ``unindexed``. Returns how many series became ready."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stable_seconds)
    quiet = [Series.status == SeriesStatus.RECEIVING, Series.last_received_at <= cutoff]
    study_quiet = [Study.stable_at.is_(None), Study.last_received_at <= cutoff]
    if unindexed is not None and unindexed.series_uids:
        quiet.append(Series.series_uid.not_in(unindexed.series_uids))
        study_quiet.append(Study.study_uid.not_in(unindexed.study_uids))
    with db.session() as session:
        # One conditional UPDATE: an instance indexed meanwhile keeps its series waiting.
        ready = session.scalars(
            update(Series).where(*quiet).values(status=SeriesStatus.READY, ready_at=now).returning(Series)
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
        session.execute(update(Study).where(*study_quiet, ~receiving.exists()).values(stable_at=now))
        return len(ready)
