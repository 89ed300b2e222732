"""Worker isolation and the local pool: a job that crashes, hangs or raises fails alone and the slot
recovers; outcomes go through the job store; stopping hands running jobs back uncounted."""

from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import Route, Settings
from node.db import AuditEvent, Database, Job, JobStatus
from node.ingest.completion import mark_stable
from node.jobs import ExecutorContext, JobFailed, JobStore, dispatch
from node.jobs.local import LocalPool, WorkerSlot
from node.jobs.run import JobSpec, Task
from node.route import route_ready
from node.spool import Spool
from tests import workers
from tests.peers import wait_for
from tests.test_flow import instance, store

TASK = Task(JobSpec(job_id=7, handler="ct_hemorrhage", model="ct-hemorrhage"), [], "/tmp/x", "/nowhere")


def failure(slot: WorkerSlot, timeout: float = 60) -> JobFailed:
    with pytest.raises(JobFailed) as caught:
        slot.run(TASK, timeout)
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


def job(db: Database) -> Job:
    with db.session() as session:
        return session.scalars(select(Job)).one()


def pool(db: Database, tmp_path: Path, settings: Settings, **kwargs: object) -> tuple[JobStore, LocalPool]:
    jobs = JobStore(db, settings.jobs)
    executor = LocalPool(ExecutorContext(settings, jobs, Spool(tmp_path), ended=lambda: None), **kwargs)  # type: ignore[arg-type]
    executor.start()
    return jobs, executor


def test_missing_model_fails_the_job_without_retry(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="no-such-model")
    settings = Settings.model_validate({"node": {"models_dir": str(tmp_path / "models")}})
    jobs, executor = pool(db, tmp_path, settings)
    try:
        assert dispatch(jobs, executor) == 1
        wait_for(lambda: job(db).status == JobStatus.FAILED, 120, "the job to fail")
    finally:
        executor.shutdown()
    failed = job(db)
    assert (failed.status, failed.attempts) == (JobStatus.FAILED, 1)
    assert "no valid model package no-such-model" in failed.error
    with db.session() as session:
        assert "job.failed" in session.scalars(select(AuditEvent.action)).all()


def test_running_jobs_are_requeued_after_a_restart(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    with db.session() as session:
        session.scalars(select(Job)).one().status = JobStatus.RUNNING
    assert JobStore(db, Settings().jobs).requeue_interrupted() == 1
    assert job(db).status == JobStatus.QUEUED


def test_stopping_the_node_hands_a_running_job_back_uncounted(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    settings = Settings.model_validate({"jobs": {"max_attempts": 1}})
    jobs, executor = pool(db, tmp_path, settings, work=workers.hang)
    assert dispatch(jobs, executor) == 1
    assert executor.capacity() == 0 and dispatch(jobs, executor) == 0  # its one slot is busy
    assert (job(db).status, job(db).attempts) == (JobStatus.RUNNING, 1)  # its last attempt, running
    executor.shutdown()
    assert (job(db).status, job(db).attempts) == (JobStatus.QUEUED, 0)


def test_a_cancelled_job_stops_and_its_outcome_is_left_to_the_caller(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    jobs, executor = pool(db, tmp_path, Settings(), work=workers.hang)
    try:
        assert dispatch(jobs, executor) == 1
        executor.cancel(job(db).id)
        wait_for(lambda: executor.capacity() == 1, 60, "the slot to be free again")
    finally:
        executor.shutdown()
    assert job(db).status == JobStatus.RUNNING  # nothing recorded: not failed, not retried
    with db.session() as session:
        assert not {"job.failed", "job.retry"} & set(session.scalars(select(AuditEvent.action)))


def test_an_outcome_is_recorded_only_for_a_job_still_running(db: Database, tmp_path: Path) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    jobs = JobStore(db, Settings().jobs)
    assert jobs.fail(job(db).id, JobFailed("crashed", "late news")) is False  # queued, not running
    assert (job(db).status, job(db).attempts, job(db).error) == (JobStatus.QUEUED, 0, "")
