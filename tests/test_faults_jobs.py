"""Issue 11, fault 9: no watchdog. One slow series held the only worker for 2 × 900 s, and a job left
running in the database while the node was up was never noticed. Now each job's time limit is scaled
to its series, a timeout is retried (if at all) only behind the jobs not yet tried, and the watchdog
fails what is running past its limit: stopped where a slot still runs it, counted as lost where none
does. Local executor, real worker processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.config import JobSettings, Route, Settings
from node.db import AuditEvent, Database, Job, JobStatus, utcnow
from node.ingest.completion import mark_stable
from node.jobs import ExecutorContext, JobFailed, JobStore, dispatch, watch
from node.jobs import store as store_module
from node.jobs.local import LocalPool
from node.jobs.run import JobOutput
from node.jobs.store import MB, time_limit
from node.route import route_ready
from node.runtime.identity import ModelIdentity
from node.spool import Spool
from tests import workers
from tests.peers import wait_for
from tests.test_flow import instance, store

pytestmark = pytest.mark.faults


def queue_jobs(db: Database, tmp_path: Path, *options: Mapping[str, Any], instances: int = 1) -> list[int]:
    """One series of ``instances`` CT images, and one job on it per entry of ``options`` (its route's
    options), queued in that order."""
    spool = Spool(tmp_path)
    for _ in range(instances):
        store(db, instance(spool), Settings().study)
    mark_stable(db, Settings().study.model_copy(update={"stable_seconds": 0}))
    routes = [
        Route(
            name=f"r{i}", handler="ct_hemorrhage", model="ct-hemorrhage", match={"Modality": "CT"}, options=o
        )
        for i, o in enumerate(options)
    ]
    route_ready(db, routes)
    with db.session() as session:
        return list(session.scalars(select(Job.id).order_by(Job.id)))


def settings(**jobs: object) -> Settings:
    """Limits that leave no part of a job's time to its series: ``timeout_base_seconds`` is the limit."""
    return Settings.model_validate(
        {"jobs": {"timeout_per_instance_seconds": 0, "timeout_per_mb_seconds": 0, **jobs}}
    )


def local_pool(db: Database, tmp_path: Path, config: Settings, **kwargs: Any) -> tuple[JobStore, LocalPool]:
    jobs = JobStore(db, config.jobs)
    executor = LocalPool(ExecutorContext(config, jobs, Spool(tmp_path), ended=lambda: None), **kwargs)
    executor.start()
    return jobs, executor


def job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def audits(db: Database, action: str) -> list[dict[str, Any]]:
    with db.session() as session:
        return [
            dict(event.detail)
            for event in session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
            )
        ]


def claimed(jobs: JobStore) -> int | None:
    claim = jobs.claim()
    return None if claim is None else claim.spec.job_id


def started_long_ago(db: Database, job_id: int, seconds: float) -> None:
    """As if the job's attempt had started ``seconds`` ago."""
    with db.session() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(started_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_jobs_time_limit_is_scaled_to_its_series_and_capped(db: Database, tmp_path: Path) -> None:
    limits = JobSettings(
        timeout_base_seconds=100,
        timeout_per_instance_seconds=2,
        timeout_per_mb_seconds=10,
        timeout_seconds=3000,
    )
    assert time_limit(limits, 0, 0) == 100
    assert time_limit(limits, 300, 150 * MB) == 100 + 600 + 1500
    assert time_limit(limits.model_copy(update={"timeout_seconds": 900}), 300, 150 * MB) == 900  # the cap

    queue_jobs(db, tmp_path, {}, instances=3)
    claim = JobStore(db, limits).claim()
    assert claim is not None and len(claim.files) == 3
    size = sum(Path(path).stat().st_size for path in claim.files)
    assert claim.time_limit == pytest.approx(100 + 3 * 2 + 10 * size / MB)
    assert audits(db, "job.started")[0]["time_limit"] == round(claim.time_limit)


def test_a_timeout_is_not_retried_as_a_crash_is(db: Database, tmp_path: Path) -> None:
    slow, crashing = queue_jobs(db, tmp_path, {}, {})
    jobs = JobStore(db, JobSettings(max_attempts=3))  # timeout_max_attempts: 1, the default
    assert [claimed(jobs), claimed(jobs)] == [slow, crashing]
    assert jobs.fail(slow, JobFailed("timeout", "no result after 900 s")) is False
    assert jobs.fail(crashing, JobFailed("crashed", "worker process died")) is True
    assert (job(db, slow).status, job(db, crashing).status) == (JobStatus.FAILED, JobStatus.QUEUED)
    assert [(e["job"], e["kind"]) for e in audits(db, "job.failed")] == [(slow, "timeout")]

    patient = JobStore(db, JobSettings(max_attempts=3, timeout_max_attempts=3))
    assert claimed(patient) == crashing  # attempt 2
    assert patient.fail(crashing, JobFailed("timeout", "no result")) is True
    assert claimed(patient) == crashing  # attempt 3, the last
    assert patient.fail(crashing, JobFailed("timeout", "no result")) is False


def test_a_slow_job_holds_the_worker_only_to_its_limit_and_the_others_pass_it(
    db: Database, tmp_path: Path
) -> None:
    slow, first, second = queue_jobs(db, tmp_path, {"sleep": 600}, {}, {})
    limit = 6.0
    config = settings(timeout_base_seconds=limit, max_attempts=2, timeout_max_attempts=2)
    jobs, executor = local_pool(db, tmp_path, config, work=workers.nap)  # one slot: node.workers = 1
    start = time.monotonic()
    try:
        wait_for(
            lambda: dispatch(jobs, executor) >= 0 and job(db, slow).status == JobStatus.FAILED,
            4 * limit + 60,
            "the slow job to fail",
        )
    finally:
        executor.shutdown()
    took = time.monotonic() - start

    # Its first attempt ran out of time; the two jobs behind it then ran before its retry did.
    assert [e["job"] for e in audits(db, "job.started")] == [slow, first, second, slow]
    assert (job(db, first).status, job(db, second).status) == (JobStatus.DONE, JobStatus.DONE)
    failed = job(db, slow)
    assert (failed.attempts, failed.error.startswith(f"no result after {limit:.0f} s")) == (2, True)
    assert [(e["kind"], e["attempt"]) for e in audits(db, "job.retry")] == [("timeout", 1)]
    assert [(e["kind"], e["attempt"]) for e in audits(db, "job.failed")] == [("timeout", 2)]
    assert took < 2 * limit + 60  # a bound on a hang: two attempts of `limit` and two quick jobs


def test_the_watchdog_fails_a_job_the_executor_lost(db: Database, tmp_path: Path) -> None:
    (lost,) = queue_jobs(db, tmp_path, {})
    config = settings(timeout_base_seconds=30, watchdog_grace_seconds=10)
    jobs, executor = local_pool(db, tmp_path, config, work=workers.nap)
    try:
        assert jobs.claim() is not None  # claimed, then never submitted: the dispatcher died, say
        assert watch(jobs, executor) == 0  # within its limit
        started_long_ago(db, lost, 35)
        assert watch(jobs, executor) == 0  # past its limit, within the grace
        started_long_ago(db, lost, 41)
        assert watch(jobs, executor) == 1
    finally:
        executor.shutdown()
    requeued = job(db, lost)
    assert (requeued.status, requeued.attempts) == (JobStatus.QUEUED, 1)  # counted, and retried
    assert "the executor was not running it" in requeued.error
    assert [(e["job"], e["kind"]) for e in audits(db, "job.retry")] == [(lost, "lost")]


def test_the_watchdog_fails_a_job_whose_outcome_could_not_be_recorded(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (done,) = queue_jobs(db, tmp_path, {})
    config = settings(timeout_base_seconds=30, watchdog_grace_seconds=10, max_attempts=1)
    jobs, executor = local_pool(db, tmp_path, config, work=workers.nap)
    down = sa_exc.OperationalError("UPDATE jobs", {}, Exception("server closed the connection"))

    def database_down(*args: object) -> None:
        raise down

    monkeypatch.setattr(jobs, "finish", database_down)
    monkeypatch.setattr(jobs, "fail", database_down)
    try:
        assert dispatch(jobs, executor) == 1
        wait_for(lambda: executor.capacity() == 1, 60, "the slot to be free again")
        assert job(db, done).status == JobStatus.RUNNING  # the job ran; nothing says so
        monkeypatch.undo()  # the database is back
        started_long_ago(db, done, 41)
        assert watch(jobs, executor) == 1
    finally:
        executor.shutdown()
    failed = job(db, done)
    assert (failed.status, failed.attempts) == (JobStatus.FAILED, 1)  # its last attempt: failed, said why
    assert [(e["job"], e["kind"]) for e in audits(db, "job.failed")] == [(done, "lost")]


def test_the_watchdog_stops_a_slot_stuck_past_its_deadline(db: Database, tmp_path: Path) -> None:
    # A worker that never reads its first task (a plug-in's import hangs), given a task bigger than the
    # pipe holds (a long series' file list): the slot blocks in sending it, before its own timer starts.
    (stuck,) = queue_jobs(db, tmp_path, {"pad": "x" * (4 * MB)})
    # The limit (and so the wait for a worker to be ready) is short: the slot's next worker hangs in
    # the same import, and the slot is free again only once that one is stopped.
    config = settings(timeout_base_seconds=10, watchdog_grace_seconds=10, max_attempts=2).model_copy(
        update={"node": Settings().node.model_copy(update={"plugins": ["tests.hanging_plugin"]})}
    )
    jobs, executor = local_pool(db, tmp_path, config, work=workers.nap)
    try:
        assert dispatch(jobs, executor) == 1
        time.sleep(3)  # the slot is in its send now, the worker importing the plug-in
        assert executor.capacity() == 0
        started_long_ago(db, stuck, 21)
        assert watch(jobs, executor) == 1
        wait_for(lambda: executor.capacity() == 1, 30, "the stuck slot to be free again")
    finally:
        executor.shutdown()
    stopped = job(db, stuck)
    assert (stopped.status, stopped.attempts) == (JobStatus.FAILED, 1)  # a timeout: not retried
    assert "stopped by the watchdog" in stopped.error
    assert [(e["job"], e["kind"]) for e in audits(db, "job.failed")] == [(stuck, "timeout")]


def test_a_worker_that_cannot_start_fails_its_job_and_the_slot_carries_on(
    db: Database, tmp_path: Path
) -> None:
    # Seen while measuring: a worker process that failed to start left its job running (closing the
    # never-started process raised while the failure was being recorded).
    (job_id,) = queue_jobs(db, tmp_path, {})
    unpicklable = lambda task: workers.nap(task)  # noqa: E731 - a spawned process cannot be given it
    jobs, executor = local_pool(db, tmp_path, settings(max_attempts=1), work=unpicklable)
    try:
        assert dispatch(jobs, executor) == 1
        wait_for(lambda: job(db, job_id).status == JobStatus.FAILED, 60, "the job to fail")
        wait_for(lambda: executor.capacity() == 1, 60, "the slot to be free again")
    finally:
        executor.shutdown()
    assert [(e["job"], e["kind"]) for e in audits(db, "job.failed")] == [(job_id, "error")]


def test_a_retry_waits_for_the_jobs_queued_before_its_attempt_not_for_those_since(
    db: Database, tmp_path: Path
) -> None:
    """Under steady load (a new job after every claim) a retried job still runs: it goes back in line
    as of its attempt's start, not behind every job that arrives later."""
    crashing, before = queue_jobs(db, tmp_path, {}, {})
    jobs = JobStore(db, settings(max_attempts=3).jobs)
    assert claimed(jobs) == crashing
    assert jobs.fail(crashing, JobFailed("crashed", "worker died")) is True
    order, arrived = [], []
    for _ in range(3):
        arrived.append(queue_jobs(db, tmp_path, {})[-1])  # one more instance, and a job on it
        order.append(claimed(jobs))
    assert order == [before, crashing, arrived[0]]


def test_a_slot_recording_results_while_the_watchdog_fails_the_job_leaves_one_outcome(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog fails a job at the moment its slot records its results: whichever takes the job's
    row first decides, the other finds it no longer running. (SQLite ignores FOR UPDATE: a job read
    as running before the other's commit was decided twice, failed with its results queued to send.)"""
    (job_id,) = queue_jobs(db, tmp_path, {})
    jobs = JobStore(db, settings(max_attempts=1).jobs)
    assert claimed(jobs) == job_id
    results = JobOutput(ModelIdentity("m", "1", "0" * 64, "test"), [], "done", {})
    running = store_module._running
    slot = threading.Thread(target=jobs.finish, args=(job_id, results))

    def watchdog_decides_as_the_slot_records(session: Session, found: int, attempt: int | None) -> Job | None:
        decided = running(session, found, attempt)
        if slot.ident is None:  # the watchdog's call (the first): the slot records now
            slot.start()
            slot.join(timeout=3)  # it waits for the row where the row is locked
        return decided

    monkeypatch.setattr(store_module, "_running", watchdog_decides_as_the_slot_records)
    jobs.fail(job_id, JobFailed("timeout", "stopped by the watchdog"))
    slot.join(timeout=60)
    assert not slot.is_alive()
    decided = {event.action for event in session_events(db) if event.action.startswith("job.")} - {
        "job.started"
    }
    assert len(decided) == 1, decided
    assert job(db, job_id).status == (JobStatus.FAILED if decided == {"job.failed"} else JobStatus.DONE)


def session_events(db: Database) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
