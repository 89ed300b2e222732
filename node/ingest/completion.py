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

The quiet period is only the fallback: waiting costs every study ``stable_seconds``, so the node uses
what the network says where it can (issue 12).

- A sender configured as a forwarder (``study.forwarders``: a PACS forwards a series whole, in one
  association) releasing its association, or a study-complete notification (Orthanc's OnStableStudy,
  through the API), declares series complete (:func:`declare_complete`). The indexer applies it behind
  every arrival acknowledged before it, so the series hold all of them. Only a series still receiving
  becomes ready: one already routed is not run again by a declaration alone. A study-complete
  notification also makes the study stable at once, once no series of it is receiving and nothing of it
  is still unindexed. A forwarder's release does not: a PACS may forward a study's series one
  association each (Orthanc's autoroute.lua does), and the second eye of a fundus visit would then find
  its study already analysed with the first alone; a ``group = "study"`` route waits for the study's
  quiet period, or its notification.
- A series whose first instance announces how many instances it will hold (:func:`announcement`) is
  ready as soon as that many distinct instances are indexed. An instance announcing something else,
  or one more than announced, voids the count (the series waits for the quiet period); one arriving
  after the series was routed is late, as any other.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydicom import Dataset
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from node import audit
from node.config import StudySettings
from node.db import Database, Series, SeriesStatus, Study, utcnow

if TYPE_CHECKING:  # the indexer applies these rules: it imports this module
    from node.ingest.index import Unindexed

log = logging.getLogger(__name__)

HANDLED = (SeriesStatus.ROUTED, SeriesStatus.NO_ROUTE)  # routing has decided
QUIET = "no instance for stable_seconds"  # why a series became ready, in its series.ready audit event
COUNTED = "as many instances as announced"


def _count(ds: Dataset, keyword: str) -> int | None:
    """A positive IS/US count from the header, or None (absent, empty, unreadable, not positive)."""
    try:
        value = int(ds.get(keyword))
    except Exception:  # absent (None), not a number, an element pydicom cannot read
        return None
    return value if 0 < value < 2**31 else None


def announcement(ds: Dataset) -> str:
    """How many instances the series of ``ds`` will hold, as ``ds`` announces it, with its grounds; ""
    when it announces nothing trustworthy. The grounds are part of it, so that an instance of another
    acquisition, announcing the same number, still disagrees.

    Trusted (the tags Orthanc also reads for a series' expected instances): Images in Acquisition (0020,1002),
    times Number of Temporal Positions where given (a dynamic series repeats the acquisition), counted
    within one acquisition (AcquisitionNumber); a PET series' Number of Slices times Number of Time
    Slices. Not trusted: Cardiac Number of Images (per cardiac cycle, per slice location: a series may
    hold several) and Number of Frames (frames of one instance, not instances of the series)."""
    images = _count(ds, "ImagesInAcquisition")
    if images is not None:
        temporal = _count(ds, "NumberOfTemporalPositions") or 1
        acquisition = str(ds.get("AcquisitionNumber", "") or "").strip()[:12]
        return f"{images * temporal} ImagesInAcquisition, acquisition {acquisition or '-'}"
    slices, time_slices = _count(ds, "NumberOfSlices"), _count(ds, "NumberOfTimeSlices")
    if slices is not None and time_slices is not None:
        return f"{slices * time_slices} NumberOfSlices x NumberOfTimeSlices"
    return ""


def announced_count(announced: str) -> int | None:
    """The number in an :func:`announcement`; None for none."""
    return int(announced.split(" ", 1)[0]) if announced else None


def arrived(
    session: Session, series: Series, settings: StudySettings, now: datetime, duplicate: bool, announced: str
) -> bool:
    """Update ``series``' readiness for an instance just indexed into it (after ``instance_count``
    counts it), which announced ``announced`` (:func:`announcement`). Returns whether the instance is
    late (a new one after the series was routed)."""
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
    expected = announced_count(series.announced)
    if expected is not None and (announced != series.announced or series.instance_count > expected):
        log.warning(
            "series %s: its instances' announced count does not hold: waits for quiet", series.series_uid
        )
        series.announced, expected = "", None
    if series.status == SeriesStatus.RECEIVING and expected is not None and series.instance_count >= expected:
        series.status, series.ready_at = SeriesStatus.READY, now
        _audit_ready(session, series, COUNTED)
    return late


def _audit_ready(session: Session, series: Series, reason: str) -> None:
    audit.record(
        session,
        "series.ready",
        study_uid=series.study.study_uid,
        series_uid=series.series_uid,
        instances=series.instance_count,
        late_instances=series.late_instances,
        reason=reason,
    )


def declare_complete(
    db: Database,
    series_uids: Collection[str],
    study_uids: Collection[str],
    reason: str,
    unindexed: Unindexed | None = None,
) -> int:
    """Mark the named series, and every series of the named studies, ready at once if they are still
    receiving, audited with ``reason`` (who or what declared them complete); then each named study
    stable, where no series of it is receiving and nothing of it is ``unindexed`` (a named series' study
    is left to its quiet period: see the module's docstring). Called once every arrival acknowledged
    before the declaration is indexed. Returns how many series became ready."""
    now = utcnow()
    studies = select(Study.id).where(Study.study_uid.in_(study_uids))
    named = or_(Series.series_uid.in_(series_uids), Series.study_fk.in_(studies))
    with db.session() as session:
        ready = session.scalars(
            update(Series)
            .where(Series.status == SeriesStatus.RECEIVING, named)
            .values(status=SeriesStatus.READY, ready_at=now)
            .returning(Series)
        ).all()
        for series in ready:
            _audit_ready(session, series, reason)
        if study_uids:
            receiving = select(Series.id).where(
                Series.study_fk == Study.id, Series.status == SeriesStatus.RECEIVING
            )
            stable = [Study.id.in_(studies), Study.stable_at.is_(None), ~receiving.exists()]
            if unindexed is not None and unindexed.study_uids:
                stable.append(Study.study_uid.not_in(unindexed.study_uids))
            session.execute(update(Study).where(*stable).values(stable_at=now))
        return len(ready)


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
            _audit_ready(session, series, QUIET)
        receiving = select(Series.id).where(
            Series.study_fk == Study.id, Series.status == SeriesStatus.RECEIVING
        )
        session.execute(update(Study).where(*study_quiet, ~receiving.exists()).values(stable_at=now))
        return len(ready)
