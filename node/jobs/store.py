"""The job state machine, in the database: queued → running → done | failed.

Every executor drives jobs through this one store, and the API and dashboard only read it: a job is
claimed (running, one attempt more), then finished (results recorded, one send per result and
destination: the outbox), failed (queued again while attempts remain and the failure is worth
retrying), or handed back uncounted when the node stops under it. Each transition is one short
transaction with its audit events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from node import audit
from node.config import JobSettings, OutputSpec
from node.db import Database, Instance, Job, JobStatus, Result, Send, Series, Study, job_series, utcnow
from node.jobs.run import JobOutput, JobSpec

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job attempt that did not produce results; ``kind`` names why (for the audit log)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


NOT_RETRIED = ("model_refused", "model_missing")  # running it again cannot help


@dataclass(frozen=True)
class Claim:
    """A job claimed for running: its spec, and the files of every series it covers in this node's
    spool."""

    spec: JobSpec
    files: list[str]


class JobStore:
    def __init__(self, db: Database, settings: JobSettings) -> None:
        self.db = db
        self.settings = settings

    def claim(self) -> Claim | None:
        """The oldest queued job, now running, or None when there is none."""
        with self.db.session() as session:
            job = session.scalar(select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.id).limit(1))
            if job is None:
                return None
            claimed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, started_at=utcnow(), error="")
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None  # another dispatcher took it
            session.refresh(job)
            files = session.scalars(
                select(Instance.path)
                .join(job_series, job_series.c.series_fk == Instance.series_fk)
                .where(job_series.c.job_fk == job.id)
                .order_by(Instance.series_fk, Instance.id)
            ).all()
            audit.record(
                session,
                "job.started",
                study_uid=job.series.study.study_uid,
                job=job.id,
                route=job.route,
                model=job.model,
                attempt=job.attempts,
            )
            spec = JobSpec(
                job_id=job.id,
                handler=job.handler,
                model=job.model,
                model_version=job.model_version or None,
                companions=dict(job.companions),
                options=dict(job.options),
                outputs=[OutputSpec.model_validate(output) for output in job.outputs],
            )
            return Claim(spec, list(files))

    def finish(self, job_id: int, output: JobOutput) -> None:
        """Record a job's results, and queue a send of each to each of the job's destinations."""
        with self.db.session() as session:
            job = _running(session, job_id)
            if job is None:
                return
            job.status = JobStatus.DONE
            job.finished_at = utcnow()
            job.model_version = output.model.version
            job.model_sha256 = output.model.sha256
            job.summary = output.summary
            job.outcome = output.outcome
            job.timings = {k: round(v, 4) for k, v in output.timings.items()}
            study_uid = job.series.study.study_uid
            audit.record(
                session,
                "job.finished",
                study_uid=study_uid,
                job=job.id,
                model=output.model.name,
                model_version=output.model.version,
                model_sha256=output.model.sha256,
                analysed=output.outcome.get("analysed"),
                summary=output.summary,
            )
            destinations = job.destinations.get("names", [])
            for written in output.results:
                result = Result(
                    job=job,
                    kind=written.kind,
                    sop_uid=written.sop_uid,
                    sop_class_uid=written.sop_class_uid,
                    path=written.path,
                )
                session.add(result)
                for name in destinations:
                    session.add(Send(result=result, destination=name))
                audit.record(
                    session,
                    "result.created",
                    study_uid=study_uid,
                    job=job.id,
                    kind=written.kind,
                    sop_uid=written.sop_uid,
                    destinations=destinations,
                )
        log.info("job %d done in %.1f s: %s", job_id, sum(output.timings.values()), output.summary)

    def fail(self, job_id: int, failure: JobFailed) -> bool:
        """Record a failed attempt. Returns whether the job is queued to run again."""
        with self.db.session() as session:
            job = _running(session, job_id)
            if job is None:
                return False
            retry = failure.kind not in NOT_RETRIED and job.attempts < self.settings.max_attempts
            job.status = JobStatus.QUEUED if retry else JobStatus.FAILED
            job.error = str(failure)[:4000]
            job.finished_at = None if retry else utcnow()
            study_uid = job.series.study.study_uid
            # The audit log, which users read, gets the first line; the trace stays in job.error.
            said = str(failure).strip().split("\n", 1)[0][:500]
            if failure.kind == "model_refused":
                audit.record(
                    session,
                    "model.refused",
                    outcome="failure",
                    study_uid=study_uid,
                    model=job.model,
                    reason=said,
                )
            audit.record(
                session,
                "job.retry" if retry else "job.failed",
                outcome="failure",
                study_uid=study_uid,
                job=job.id,
                kind=failure.kind,
                error=said,
                attempt=job.attempts,
            )
        log.warning("job %d failed (%s)%s", job_id, failure.kind, "; will retry" if retry else "")
        return retry

    def hand_back(self, job_id: int, reason: str) -> None:
        """Queue a running job again without counting its attempt: it was interrupted through no
        fault of its own (the node is stopping, the executor did not take it)."""
        with self.db.session() as session:
            job = _running(session, job_id)
            if job is not None:
                job.attempts -= 1
                _requeue(session, job, reason)

    def requeue_interrupted(self) -> int:
        """Jobs left running by a node that stopped: queue them again. Returns how many."""
        with self.db.session() as session:
            jobs = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
            for job in jobs:
                _requeue(session, job, "node restarted while the job was running")
            return len(jobs)


def rerun_study(db: Database, study_uid: str, actor: str) -> list[int]:
    """Queue every finished job of a study again (a person asked for it: say, after a model update or
    a fixed destination), each for one attempt more. Its outcome and results are forgotten — the
    attempt replaces the result files, and the audit log keeps what the earlier run said and sent;
    jobs still queued or running are left alone. Returns the jobs queued."""
    with db.session() as session:
        jobs = session.scalars(
            select(Job)
            .join(Series, Job.series_fk == Series.id)
            .join(Study)
            .where(Study.study_uid == study_uid, Job.status.in_((JobStatus.DONE, JobStatus.FAILED)))
            .order_by(Job.id)
        ).all()
        for job in jobs:
            session.execute(
                delete(Send).where(Send.result_fk.in_(select(Result.id).where(Result.job_fk == job.id)))
            )
            session.execute(delete(Result).where(Result.job_fk == job.id))
            audit.record(
                session,
                "job.rerun",
                actor=actor,
                study_uid=study_uid,
                job=job.id,
                previous_status=job.status.value,
                attempts=job.attempts,
            )
            job.status, job.error, job.summary, job.outcome, job.timings = JobStatus.QUEUED, "", "", {}, {}
            job.started_at = job.finished_at = None
        return [job.id for job in jobs]


def _running(session: Session, job_id: int) -> Job | None:
    """The job, if it is still running: an outcome is recorded only for a job that was claimed and
    whose state nobody has decided since (a cancelled and deleted job, say)."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.RUNNING:
        log.warning("job %d is no longer running; its outcome is not recorded", job_id)
        return None
    return job


def _requeue(session: Session, job: Job, reason: str) -> None:
    job.status = JobStatus.QUEUED
    audit.record(session, "job.requeued", study_uid=job.series.study.study_uid, job=job.id, reason=reason)
