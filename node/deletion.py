"""Deleting a study from the node: its rows and its files (received instances, results), audited.

An admin does it for a study sent to the node by mistake, or one that must not be kept. The rows go
in one transaction with the ``study.deleted`` event; the files after it commits, so a failure leaves
files without rows (harmless, and visible on disk) rather than rows without files. The audit log keeps
everything that happened to the study, and who deleted it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, func, select

from node import audit
from node.db import Database, Instance, Job, JobStatus, Patient, Result, Send, Series, Study, job_series
from node.spool import Spool, check_uid


class StudyBusy(Exception):
    """The study has a job running: deleting it now would leave the worker's results orphaned."""


@dataclass(frozen=True)
class Deleted:
    series: int
    instances: int
    jobs: int


def delete_study(db: Database, spool: Spool, study_uid: str, actor: str) -> Deleted | None:
    """Delete the study ``study_uid``; None if there is none. Raises StudyBusy while a job runs."""
    with db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            return None
        series_ids = select(Series.id).where(Series.study_fk == study.id).scalar_subquery()
        jobs = session.scalars(select(Job).where(Job.series_fk.in_(series_ids))).all()
        if any(job.status == JobStatus.RUNNING for job in jobs):
            raise StudyBusy("a job of this study is running; delete it when the job has ended")
        job_ids = [job.id for job in jobs]
        paths = session.scalars(select(Instance.path).where(Instance.series_fk.in_(series_ids))).all()
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
        deleted = Deleted(series=series_count or 0, instances=len(paths), jobs=len(job_ids))
        audit.record(
            session,
            "study.deleted",
            actor=actor,
            study_uid=study_uid,
            series=deleted.series,
            instances=deleted.instances,
            jobs=deleted.jobs,
        )
    for path in paths:
        Path(path).unlink(missing_ok=True)
    for job_id in job_ids:
        shutil.rmtree(spool.result_dir(job_id), ignore_errors=True)
    shutil.rmtree(spool.incoming / check_uid(study_uid, "StudyInstanceUID"), ignore_errors=True)
    return deleted
