"""Durable jobs: one state machine in the database (queued → running → done | failed).

The embedded executor runs jobs in worker *processes*, one per slot, each driven by a thread of the
node: a job that crashes its process, hangs past its timeout or raises fails alone, and the slot
starts a fresh process. Jobs found running at start-up (the node died under them) are queued again.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node import audit
from node.config import Settings
from node.db import Database, Job, JobStatus, Result, Send, utcnow
from node.pipeline import JobOutput, JobSpec, run_job
from node.runtime.model import set_threads
from node.runtime.package import ModelRefused
from node.runtime.package import select as select_package
from node.spool import Spool

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job attempt that did not produce results; ``kind`` names why (for the audit log)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


Work = Callable[[JobSpec], JobOutput]


def _worker_main(conn: Connection, torch_threads: int, work: Work) -> None:
    """A worker process: run specs until the parent closes the pipe."""
    set_threads(torch_threads)
    while True:
        try:
            spec: JobSpec = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", work(spec)))
        except ModelRefused as exc:
            conn.send(("model_refused", str(exc)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


class WorkerSlot:
    """One worker process, started on first use and after a crash or a timeout."""

    def __init__(self, torch_threads: int, work: Work = run_job) -> None:
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self._torch_threads = torch_threads
        self._work = work  # a module-level function, so the spawned process can import it
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self.close()
            parent, child = self._context.Pipe()
            self._process = self._context.Process(
                target=_worker_main,
                args=(child, self._torch_threads, self._work),
                daemon=True,
                name="ainode-worker",
            )
            self._process.start()
            child.close()
            self._conn = parent
        return self._conn

    def run(self, spec: JobSpec, timeout: float) -> JobOutput:
        conn = self._ensure()
        conn.send(spec)
        try:
            ready = conn.poll(timeout)
            reply = conn.recv() if ready else None
        except (EOFError, OSError):
            code = None
            if self._process is not None:
                self._process.join(timeout=5)
                code = self._process.exitcode
            self.close()
            raise JobFailed("crashed", f"worker process died (exit code {code})") from None
        if reply is None:
            self.close()
            raise JobFailed("timeout", f"no result after {timeout:.0f} s; worker stopped")
        status, payload = reply
        if status == "ok":
            output: JobOutput = payload
            return output
        raise JobFailed(status, payload)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=5)
            self._process = None


def _requeue(session: Session, job: Job, reason: str) -> None:
    """Queue a job again that was interrupted through no fault of its own."""
    job.status = JobStatus.QUEUED
    audit.record(session, "job.requeued", study_uid=job.series.study.study_uid, job=job.id, reason=reason)


def requeue_interrupted(db: Database) -> int:
    """Jobs left running by a node that stopped: queue them again. Returns how many."""
    with audit.writing(db) as session:
        jobs = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
        for job in jobs:
            _requeue(session, job, "node restarted while the job was running")
        return len(jobs)


def _claim(session: Session) -> Job | None:
    job = session.scalar(select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.id).limit(1))
    if job is None:
        return None
    claimed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, started_at=utcnow(), error="")
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(job)
    return job


class Executor:
    """The embedded executor: ``settings.node.workers`` slots, each a thread driving a process."""

    def __init__(
        self, settings: Settings, db: Database, spool: Spool, on_results: Callable[[], None]
    ) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self.on_results = on_results
        self._wake = threading.Event()
        self._stop = threading.Event()
        threads = settings.node.torch_threads
        self._slots = [WorkerSlot(threads) for _ in range(settings.node.workers)]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i, slot in enumerate(self._slots):
            thread = threading.Thread(target=self._loop, args=(slot,), name=f"job-slot-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for slot in self._slots:
            slot.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _loop(self, slot: WorkerSlot) -> None:
        while not self._stop.is_set():
            try:
                worked = self._run_one(slot)
            except Exception:
                log.exception("job slot error")
                worked = False
            if not worked:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def _run_one(self, slot: WorkerSlot) -> bool:
        with audit.writing(self.db) as session:
            job = _claim(session)
            if job is None:
                return False
            files = [inst.path for inst in job.series.instances]
            audit.record(
                session,
                "job.started",
                study_uid=job.series.study.study_uid,
                job=job.id,
                route=job.route,
                model=job.model,
                attempt=job.attempts,
            )
        spec = self._spec(job, files)  # hashes the weights: outside the lock every writer shares
        try:
            if isinstance(spec, JobFailed):
                raise spec
            output = slot.run(spec, self.settings.jobs.timeout_seconds)
        except JobFailed as failure:
            self._failed(job.id, failure)
            return True
        except Exception as exc:  # e.g. the worker could not start: the job must not stay RUNNING
            slot.close()
            self._failed(job.id, JobFailed("error", f"{type(exc).__name__}: {exc}"))
            return True
        try:
            self._done(job.id, output)
        except Exception as exc:  # results written but not recorded: run again rather than lose them
            log.exception("recording job %d failed", job.id)
            self._failed(job.id, JobFailed("error", f"recording results failed: {type(exc).__name__}"))
        return True

    def _spec(self, job: Job, files: list[str]) -> JobSpec | JobFailed:
        try:
            package = select_package(self.settings.node.models_dir, job.model, job.model_version or None)
        except LookupError as exc:
            return JobFailed("model_missing", str(exc))
        except ModelRefused as exc:
            return JobFailed("model_refused", str(exc))
        except Exception as exc:  # unreadable package folder and the like: fail this job, not the queue
            return JobFailed("model_missing", f"{type(exc).__name__}: {exc}")
        return JobSpec(
            job_id=job.id,
            files=files,
            handler=job.handler,
            model_dir=str(package),
            options=job.options,
            out_dir=str(self.spool.result_dir(job.id)),
        )

    def _failed(self, job_id: int, failure: JobFailed) -> None:
        if self._stop.is_set():  # the node is stopping and killed the worker: not the job's fault
            with audit.writing(self.db) as session:
                job = session.get_one(Job, job_id)
                job.attempts -= 1
                _requeue(session, job, "node stopping while the job was running")
            return
        with audit.writing(self.db) as session:
            job = session.get_one(Job, job_id)
            retry = failure.kind not in ("model_refused", "model_missing") and (
                job.attempts < self.settings.jobs.max_attempts
            )
            job.status = JobStatus.QUEUED if retry else JobStatus.FAILED
            job.error = str(failure)[:4000]
            job.finished_at = None if retry else utcnow()
            study_uid = job.series.study.study_uid
            if failure.kind == "model_refused":
                audit.record(
                    session,
                    "model.refused",
                    outcome="failure",
                    study_uid=study_uid,
                    model=job.model,
                    reason=str(failure),
                )
            audit.record(
                session,
                "job.retry" if retry else "job.failed",
                outcome="failure",
                study_uid=study_uid,
                job=job.id,
                kind=failure.kind,
                error=str(failure)[:500],
                attempt=job.attempts,
            )
        log.warning("job %d failed (%s)%s", job_id, failure.kind, "; will retry" if retry else "")
        if retry:
            self.wake()

    def _done(self, job_id: int, output: JobOutput) -> None:
        with audit.writing(self.db) as session:
            job = session.get_one(Job, job_id)
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
        self.on_results()
