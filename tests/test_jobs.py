"""Worker isolation: a job that crashes, hangs or raises fails alone and the slot recovers."""

from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import Route, Settings
from node.db import AuditEvent, Database, Job, JobStatus
from node.jobs import Executor, JobFailed, WorkerSlot, requeue_interrupted
from node.pipeline import JobSpec
from node.route import route_ready
from node.spool import Spool
from node.stability import mark_stable
from tests import workers
from tests.test_flow import instance, store

SPEC = JobSpec(
    job_id=7, files=[], handler="ct_hemorrhage", model_dir="/nowhere", options={}, out_dir="/tmp/x"
)


def failure(slot: WorkerSlot, timeout: float = 60) -> JobFailed:
    with pytest.raises(JobFailed) as caught:
        slot.run(SPEC, timeout)
    return caught.value


def worker_pid(slot: WorkerSlot) -> str:
    return str(failure(slot)).split("pid=")[1].split()[0]


def test_crash_hang_and_error_fail_alone_and_the_slot_recovers() -> None:
    slot = WorkerSlot(torch_threads=1, work=workers.crash)
    assert failure(slot).kind == "crashed"
    assert "exit code 3" in str(failure(slot))  # a fresh process each time, crashing again

    slot = WorkerSlot(torch_threads=1, work=workers.hang)
    assert failure(slot, timeout=2).kind == "timeout"

    slot = WorkerSlot(torch_threads=1, work=workers.fail)
    error = failure(slot)
    assert error.kind == "error" and "bad input for job 7" in str(error)

    assert failure(WorkerSlot(torch_threads=1, work=workers.refuse)).kind == "model_refused"

    slot = WorkerSlot(torch_threads=1, work=workers.pid)
    assert worker_pid(slot) == worker_pid(slot)  # a healthy worker is reused between jobs
    slot.close()


def queued_job(db: Database, tmp_path: Path, model: str) -> None:
    store(db, instance(Spool(tmp_path)), Settings().study)
    mark_stable(db, Settings().study.model_copy(update={"stable_seconds": 0}))
    route_ready(db, [Route(name="r", handler="ct_hemorrhage", model=model, match={"Modality": "CT"})])


def test_missing_model_fails_the_job_without_retry(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="no-such-model")
    settings = Settings.model_validate({"node": {"models_dir": str(tmp_path / "models")}})
    executor = Executor(settings, db, Spool(tmp_path), on_results=lambda: None)
    assert executor._run_one(WorkerSlot(torch_threads=1)) is True
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
        assert "no valid model package no-such-model" in job.error
        assert "job.failed" in session.scalars(select(AuditEvent.action)).all()


def test_running_jobs_are_requeued_after_a_restart(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    with db.session() as session:
        session.scalars(select(Job)).one().status = JobStatus.RUNNING
    assert requeue_interrupted(db) == 1
    with db.session() as session:
        assert session.scalars(select(Job.status)).one() == JobStatus.QUEUED


def test_stopping_the_node_hands_a_running_job_back_uncounted(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    settings = Settings.model_validate({"jobs": {"max_attempts": 1}})
    executor = Executor(settings, db, Spool(tmp_path), on_results=lambda: None)
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        job.status, job.attempts = JobStatus.RUNNING, 1  # its last attempt, running
    executor._stop.set()
    executor._failed(job.id, JobFailed("crashed", "worker process died (exit code -9)"))
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)
