"""The job state machine, in the database: queued → running → done | failed.

Every executor drives jobs through this one store, and the API and dashboard only read it: a job is
claimed (running, one attempt more, with a time limit scaled to its series), then finished (results
recorded, one send per result and destination: the outbox), failed (queued again while attempts remain
and the failure is worth retrying), or handed back uncounted when the node stops under it. Each
transition is one short transaction with its audit events.

Jobs are claimed oldest first; a job that has had an attempt goes back in line as of when that attempt
started: behind every job queued before it, ahead of those queued since. A series that crashes or runs
out of time costs each other job at most one attempt's wait, and a steady stream of new jobs never
keeps a retry from running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select, update
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
# A job that ran out of time once will very likely do so again, holding a worker all the while: it is
# retried only within ``timeout_max_attempts`` (by default never).
TIMED_OUT = ("timeout",)
MB = 1024 * 1024


def time_limit(settings: JobSettings, instances: int, size: int) -> float:
    """Seconds a job over ``instances`` files of ``size`` bytes in all may run: the base, plus its share
    per image and per MB (frames are counted by their bytes), capped."""
    scaled = (
        settings.timeout_base_seconds
        + settings.timeout_per_instance_seconds * instances
        + settings.timeout_per_mb_seconds * size / MB
    )
    return min(scaled, settings.timeout_seconds)


@dataclass(frozen=True)
class Claim:
    """A job claimed for running: its spec, and the files of every series it covers in this node's
    spool."""

    spec: JobSpec
    files: list[str]
    time_limit: float  # seconds; the executor stops the job after this and fails it as a timeout
    attempt: int = 0  # which attempt this is (the job's attempts once claimed): an outcome names it


@dataclass(frozen=True)
class Overdue:
    """A job still running past its time limit and the watchdog's grace."""

    job_id: int
    time_limit: float
    running: float  # seconds since its attempt started


class JobStore:
    def __init__(self, db: Database, settings: JobSettings) -> None:
        self.db = db
        self.settings = settings

    def claim(self) -> Claim | None:
        """The queued job first in line — queued first, a retry as of its last attempt's start — now
        running; None when there is none."""
        with self.db.session() as session:
            job = session.scalar(
                select(Job)
                .where(Job.status == JobStatus.QUEUED)
                .order_by(func.coalesce(Job.started_at, Job.created_at), Job.id)
                .limit(1)
            )
            if job is None:
                return None
            claimed = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.RUNNING,
                    attempts=Job.attempts + 1,
                    started_at=utcnow(),
                    error="",
                    worker="",  # nobody has taken this attempt yet
                    deliveries=0,
                )
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return None  # another dispatcher took it
            session.refresh(job)
            claimed_job = self._claim(session, job)
            audit.record(
                session,
                "job.started",
                study_uid=job.series.study.study_uid,
                job=job.id,
                route=job.route,
                model=job.model,
                attempt=job.attempts,
                time_limit=round(claimed_job.time_limit),
            )
            return claimed_job

    def take(self, job_id: int, attempt: int, worker: str) -> Claim | None:
        """A distributed worker takes attempt ``attempt`` of a job: record its name on the job, count
        the delivery, and return the job as claimed (the spec and files are the database's, whatever
        the message said). None when the job is no longer running that attempt (a message delivered
        again after the attempt ended, or one the watchdog gave up on): drop it.

        None too when workers took this attempt ``max_deliveries`` times already: the broker delivers a
        message again when the worker running it dies, so a job that kills its worker would come back
        forever. The attempt fails as ``crashed`` then, retried or not as a job that crashes a process
        of the local pool — whatever the broker can count."""
        limit = self.settings.distributed.max_deliveries
        with self.db.session() as session:
            current = (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
            taken = session.execute(
                update(Job)
                .where(*current, Job.deliveries < limit)
                # Its time limit counts from now: it may have waited at the broker for a worker.
                .values(worker=worker[:128], deliveries=Job.deliveries + 1, started_at=utcnow())
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                job = session.get(Job, job_id, populate_existing=True)
                assert job is not None
                audit.record(
                    session,
                    "job.taken",
                    study_uid=job.series.study.study_uid,
                    job=job.id,
                    attempt=attempt,
                    worker=job.worker,
                    delivery=job.deliveries,
                )
                return self._claim(session, job)
            crashing = session.scalar(select(Job.id).where(*current)) is not None
        if crashing:
            said = f"workers took attempt {attempt} {limit} times and none recorded an outcome: each died"
            self.fail(job_id, JobFailed("crashed", f"{said} running it (or lost the broker)"), attempt)
        return None

    def _claim(self, session: Session, job: Job) -> Claim:
        """A running job as an executor runs it: its spec, files, time limit and attempt."""
        files = _files(session, job.id)
        limit = time_limit(self.settings, len(files), sum(size for _, size in files))
        return Claim(_spec(job), [path for path, _ in files], limit, job.attempts)

    def files(self, job_id: int, attempt: int) -> list[str] | None:
        """The files of a job running attempt ``attempt``; None when it is not."""
        with self.db.session() as session:
            running = session.scalar(
                select(Job.id).where(
                    Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt
                )
            )
            return None if running is None else [path for path, _ in _files(session, job_id)]

    def finish(
        self, job_id: int, output: JobOutput, attempt: int | None = None, worker: str | None = None
    ) -> bool:
        """Record a job's results, and queue a send of each to each of the job's destinations. With
        ``attempt``, only while the job still runs that attempt (compare-and-set: an attempt the
        watchdog gave up on, or a message delivered twice, is never recorded); with ``worker``, the
        distributed worker whose outcome this is (the one that took the attempt last may be another,
        which got the message again while the first still ran it). Returns whether it was recorded."""
        with self.db.session() as session:
            job = _running(session, job_id, attempt)
            if job is None:
                return False
            job.status = JobStatus.DONE
            job.finished_at = utcnow()
            job.worker = job.worker if worker is None else worker[:128]
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
                models_loaded=list(output.models_loaded),  # empty where the worker had preloaded them
                **({} if worker is None else {"worker": job.worker}),
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
        return True

    def fail(
        self, job_id: int, failure: JobFailed, attempt: int | None = None, worker: str | None = None
    ) -> bool:
        """Record a failed attempt (with ``attempt`` and ``worker``: only while the job still runs it,
        and whose outcome it is, as :meth:`finish`). Returns whether the job is queued to run again."""
        with self.db.session() as session:
            job = _running(session, job_id, attempt)
            if job is None:
                return False
            retry = job.attempts < self._attempts_allowed(failure.kind)
            job.worker = job.worker if worker is None else worker[:128]
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

    def _attempts_allowed(self, kind: str) -> int:
        if kind in NOT_RETRIED:
            return 0
        if kind in TIMED_OUT:
            return min(self.settings.max_attempts, self.settings.timeout_max_attempts)
        return self.settings.max_attempts

    def overdue(self) -> list[Overdue]:
        """Running jobs whose attempt started longer ago than their time limit plus the watchdog's grace
        (an executor stops a job at its limit; one still running after the grace was lost or is stuck)."""
        now, grace = utcnow(), self.settings.watchdog_grace_seconds
        shortest = min(self.settings.timeout_base_seconds, self.settings.timeout_seconds)
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.started_at).where(
                    Job.status == JobStatus.RUNNING,
                    Job.started_at < now - timedelta(seconds=shortest + grace),
                )
            )
            running = {job_id: (now - at).total_seconds() for job_id, at in rows if at is not None}
            if not running:
                return []
            sizes = session.execute(
                select(job_series.c.job_fk, func.count(Instance.id), func.sum(Instance.size))
                .join(Instance, Instance.series_fk == job_series.c.series_fk)
                .where(job_series.c.job_fk.in_(running))
                .group_by(job_series.c.job_fk)
            )
            limits = {job_id: time_limit(self.settings, count, int(size)) for job_id, count, size in sizes}
        default = time_limit(self.settings, 0, 0)  # a job whose series has no instance left
        return [
            Overdue(job_id, limits.get(job_id, default), seconds)
            for job_id, seconds in sorted(running.items())
            if seconds > limits.get(job_id, default) + grace
        ]

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


def _spec(job: Job) -> JobSpec:
    return JobSpec(
        job_id=job.id,
        handler=job.handler,
        model=job.model,
        model_version=job.model_version or None,
        companions=dict(job.companions),
        options=dict(job.options),
        outputs=[OutputSpec.model_validate(output) for output in job.outputs],
    )


def _files(session: Session, job_id: int) -> list[tuple[str, int]]:
    """The path and size of every instance of every series a job covers, in a fixed order."""
    rows = session.execute(
        select(Instance.path, Instance.size)
        .join(job_series, job_series.c.series_fk == Instance.series_fk)
        .where(job_series.c.job_fk == job_id)
        .order_by(Instance.series_fk, Instance.id)
    ).all()
    return [(path, size) for path, size in rows]


def _running(session: Session, job_id: int, attempt: int | None = None) -> Job | None:
    """The job, if it is still running (with ``attempt``: that attempt): an outcome is recorded only
    for a job that was claimed and whose state nobody has decided since (a cancelled and deleted job,
    say). The check is a write, so the row stays locked until the transaction ends and the watchdog and
    a slot ending the job at that moment cannot both decide: SQLite ignores FOR UPDATE and reads
    outside the transaction, and a job read as running there could be decided twice (failed with its
    results queued to send)."""
    running = [Job.id == job_id, Job.status == JobStatus.RUNNING]
    if attempt is not None:
        running.append(Job.attempts == attempt)
    locked = session.execute(update(Job).where(*running).values(status=JobStatus.RUNNING))
    if locked.rowcount != 1:  # type: ignore[attr-defined]
        said = "" if attempt is None else f" attempt {attempt}"
        log.warning("job %d is no longer running%s; its outcome is not recorded", job_id, said)
        return None
    return session.get(Job, job_id, populate_existing=True)


def _requeue(session: Session, job: Job, reason: str) -> None:
    """Queue a job again uncounted, in its place: as if its attempt had never started."""
    job.status = JobStatus.QUEUED
    job.started_at = None
    audit.record(session, "job.requeued", study_uid=job.series.study.study_uid, job=job.id, reason=reason)
