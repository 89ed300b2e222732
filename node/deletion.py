"""Deleting a study from the node: its rows and its files (received instances, results), audited.

The one place a study is deleted: an admin does it from the dashboard (a study sent by mistake, one
that must not be kept), retention (``node/retention.py``) for studies that are old or when the disk
fills. The rows go in one transaction with the ``study.deleted`` event; the files after it commits, so
a failure leaves files without rows (harmless, and visible on disk) rather than rows without files.
Only the files the rows name are removed, and then the folders left empty: an instance acknowledged a
moment ago and not yet indexed stays, and is indexed as a new arrival. The audit log keeps everything
that happened to the study, who deleted it and why.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import ColumnElement, and_, delete, exists, func, select, update

from node import audit
from node.db import (
    Database,
    Instance,
    Job,
    JobStatus,
    Patient,
    Result,
    Send,
    SendStatus,
    Series,
    SeriesStatus,
    Study,
    job_series,
)
from node.ingest.conflicts import SUPERSEDED
from node.spool import Spool, check_uid

_SERIES_SETTLED = (SeriesStatus.ROUTED, SeriesStatus.NO_ROUTE)

# Held from a study's rows going to its files going. Reconciliation (node.ingest.reconcile) takes it
# for a pass, so it never finds the files of a deleted study without rows and indexes them again.
removing = threading.Lock()


class StudyBusy(Exception):
    """The study has a job running (or, for retention, is not settled): deleting it now would leave
    a worker's results orphaned, or lose what is still to be analysed or sent."""


@dataclass(frozen=True)
class Deleted:
    series: int
    instances: int
    jobs: int
    bytes: int  # the files removed: received instances and results


def settled() -> ColumnElement[bool]:
    """Whether a study (correlated with ``Study``) has nothing left to happen and nothing for an admin
    to decide: every series routed (or matched no route), every job done, every send sent. A job or a
    send that failed for good keeps its study until an admin re-runs, resends or deletes it."""
    in_study = Series.study_fk == Study.id
    return and_(
        ~exists().where(in_study, Series.status.not_in(_SERIES_SETTLED)),
        ~exists().where(in_study, Job.series_fk == Series.id, Job.status != JobStatus.DONE),
        ~exists().where(
            in_study,
            Job.series_fk == Series.id,
            Result.job_fk == Job.id,
            Send.result_fk == Result.id,
            Send.status != SendStatus.SENT,
        ),
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # already gone: nothing to free
        return 0


def _prune_empty(folder: Path) -> None:
    """Remove ``folder`` and the folders in it that are empty; one still holding a file stays."""
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def delete_study(
    db: Database,
    spool: Spool,
    study_uid: str,
    actor: str,
    *,
    reason: str = "admin",
    only_if_settled: bool = False,
    received_by: datetime | None = None,
) -> Deleted | None:
    """Delete the study ``study_uid``; None if there is none. Raises StudyBusy while a job runs or,
    with ``only_if_settled``, unless the study is settled, or, with ``received_by``, if an instance
    arrived after it — checked in the deleting transaction, so a study that an arrival or a re-run woke
    since it was chosen is left alone."""
    with removing:
        return _delete(db, spool, study_uid, actor, reason, only_if_settled, received_by)


def _delete(
    db: Database,
    spool: Spool,
    study_uid: str,
    actor: str,
    reason: str,
    only_if_settled: bool,
    received_by: datetime | None,
) -> Deleted | None:
    with db.session() as session:
        # A write first, so the study's row is locked to the end: an arrival indexed meanwhile committed
        # before (and is seen below) or waits, then finds the study gone and indexes into a new one.
        # Reads alone would not do: SQLite ignores FOR UPDATE and reads outside the transaction.
        locked = session.execute(
            update(Study)
            .where(Study.study_uid == study_uid)
            .values(study_uid=Study.study_uid)
            .execution_options(synchronize_session=False)
        )
        if locked.rowcount != 1:  # type: ignore[attr-defined]
            return None
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        if received_by is not None and study.last_received_at > received_by:
            raise StudyBusy("an instance arrived since the study was chosen")
        if (
            only_if_settled
            and session.scalar(select(Study.id).where(Study.id == study.id, settled())) is None
        ):
            raise StudyBusy("the study is not settled: something is still to be analysed, sent or decided")
        series_ids = select(Series.id).where(Series.study_fk == study.id).scalar_subquery()
        jobs = session.scalars(select(Job).where(Job.series_fk.in_(series_ids))).all()
        if any(job.status == JobStatus.RUNNING for job in jobs):
            raise StudyBusy("a job of this study is running; delete it when the job has ended")
        job_ids = [job.id for job in jobs]
        paths = [
            Path(p) for p in session.scalars(select(Instance.path).where(Instance.series_fk.in_(series_ids)))
        ]
        # The results' folders, and the earlier versions of corrected instances (node.ingest.conflicts).
        folders = [spool.result_dir(job_id) for job_id in job_ids]
        folders.append(spool.root / SUPERSEDED / check_uid(study_uid, "StudyInstanceUID"))
        files = paths + [f for folder in folders if folder.is_dir() for f in folder.rglob("*") if f.is_file()]
        series_count = session.scalar(
            select(func.count()).select_from(Series).where(Series.study_fk == study.id)
        )
        results = select(Result.id).where(Result.job_fk.in_(job_ids)).scalar_subquery()
        session.execute(delete(Send).where(Send.result_fk.in_(results)))
        session.execute(delete(Result).where(Result.job_fk.in_(job_ids)))
        session.execute(delete(job_series).where(job_series.c.job_fk.in_(job_ids)))
        session.execute(delete(Job).where(Job.id.in_(job_ids)))
        session.execute(delete(Instance).where(Instance.series_fk.in_(series_ids)))
        session.execute(delete(Series).where(Series.study_fk == study.id))
        patient_fk = study.patient_fk
        session.delete(study)
        session.flush()
        if session.scalar(select(func.count()).select_from(Study).where(Study.patient_fk == patient_fk)) == 0:
            session.execute(delete(Patient).where(Patient.id == patient_fk))
        deleted = Deleted(
            series=series_count or 0,
            instances=len(paths),
            jobs=len(job_ids),
            bytes=sum(_size(f) for f in files),
        )
        audit.record(
            session,
            "study.deleted",
            actor=actor,
            study_uid=study_uid,
            reason=reason,
            series=deleted.series,
            instances=deleted.instances,
            jobs=deleted.jobs,
            bytes=deleted.bytes,
        )
    for path in paths:
        path.unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    _prune_empty(spool.incoming / check_uid(study_uid, "StudyInstanceUID"))
    return deleted
