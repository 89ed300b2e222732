"""Worker isolation and the local pool: a job that crashes, hangs or raises fails alone and the slot
recovers; workers load the routes' models before their first job; outcomes go through the job store;
stopping hands running jobs back uncounted."""

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import Route, Settings
from node.db import AuditEvent, Database, Job, JobStatus
from node.ingest.completion import mark_stable
from node.jobs import ExecutorContext, JobFailed, JobStore, dispatch, run
from node.jobs.local import LocalPool, WorkerSetup, WorkerSlot
from node.jobs.run import JobSpec, Preloaded, Task, loaded, prefer_faster_runtime, run_job, try_faster_runtime
from node.route import route_ready
from node.runtime import fastest
from node.spool import Spool
from tests import workers
from tests.peers import wait_for
from tests.test_flow import instance, store
from training.ct_phantom import write_head_ct_series

TASK = Task(JobSpec(job_id=7, handler="ct_hemorrhage", model="ct-hemorrhage"), [], "/tmp/x", "/nowhere")
MODELS = Path(__file__).resolve().parents[1] / "models"
ONE_THREAD = WorkerSetup(torch_threads=1)


def failure(slot: WorkerSlot, timeout: float = 60) -> JobFailed:
    with pytest.raises(JobFailed) as caught:
        slot.run(TASK, timeout)
    return caught.value


def worker_pid(slot: WorkerSlot) -> str:
    return str(failure(slot)).split("pid=")[1].split()[0]


def test_crash_hang_and_error_fail_alone_and_the_slot_recovers() -> None:
    slot = WorkerSlot(ONE_THREAD, work=workers.crash)
    assert failure(slot).kind == "crashed"
    assert "exit code 3" in str(failure(slot))  # a fresh process each time, crashing again

    slot = WorkerSlot(ONE_THREAD, work=workers.hang)
    assert failure(slot, timeout=2).kind == "timeout"

    slot = WorkerSlot(ONE_THREAD, work=workers.fail)
    error = failure(slot)
    assert error.kind == "error" and "bad input for job 7" in str(error)

    assert failure(WorkerSlot(ONE_THREAD, work=workers.refuse)).kind == "model_refused"

    slot = WorkerSlot(ONE_THREAD, work=workers.pid)
    assert worker_pid(slot) == worker_pid(slot)  # a healthy worker is reused between jobs
    slot.close()


def test_a_worker_loads_the_routes_models_before_its_first_job(tmp_path: Path) -> None:
    series = write_head_ct_series(tmp_path / "ct", 8, hemorrhage=True, seed=5, size=128)
    files = [str(path) for path in series]
    task = Task(JobSpec(1, "ct_hemorrhage", "ct-hemorrhage"), files, str(tmp_path / "out"), str(MODELS))
    packages = [("no-such-model", None), ("ct-hemorrhage", None)]
    said: list[Preloaded] = []
    slot = WorkerSlot(WorkerSetup(1, models_dir=str(MODELS), packages=packages), run_job, said.extend)
    unloaded = WorkerSlot(WorkerSetup(1, models_dir=str(MODELS)), run_job)
    try:
        slot.start()
        # One package missing is reported, and does not keep the other from loading.
        assert [(p.name, p.runtime, p.error.split(":")[0]) for p in said] == [
            ("no-such-model", "", "ModelMissing"),
            ("ct-hemorrhage", "TorchModel", ""),
        ]
        first = slot.run(task, 300)
        assert first.results and first.models_loaded == ()  # the first job found its model loaded
        # The reference: a worker told to load nothing loads the model during its first job.
        assert unloaded.run(task, 300).models_loaded == ("ct-hemorrhage 1.0.0",)
    finally:
        slot.close()
        unloaded.close()


def test_an_idle_worker_moves_its_models_to_the_faster_runtime_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a worker does between jobs (in this process here, with the cost stubbed: no timing)."""
    models = tmp_path / "models"
    shutil.copytree(MODELS / "ct-hemorrhage", models / "ct-hemorrhage")  # its own path in the cache
    monkeypatch.setattr(fastest, "cost_ms", lambda model: 1.0 if type(model).__name__ == "OnnxModel" else 2.0)
    # A worker process of its own: what earlier tests in this process loaded is not this worker's.
    monkeypatch.setattr(run, "_models", {})
    monkeypatch.setattr(run, "_runtime_tried", set())
    assert try_faster_runtime() is None  # off unless the worker's setup names a cache
    prefer_faster_runtime(tmp_path / "runtimes")
    try:
        assert type(loaded(models, "ct-hemorrhage")).__name__ == "TorchModel"  # loaded as packaged
        moved = try_faster_runtime()
        assert moved is not None and moved.runtime.startswith("ONNX Runtime")
        assert type(loaded(models, "ct-hemorrhage")).__name__ == "OnnxModel"
        assert try_faster_runtime() is None  # measured once
    finally:
        prefer_faster_runtime(None)


def test_the_pool_starts_its_workers_and_audits_a_package_that_cannot_load(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    route = Route(name="r", handler="ct_hemorrhage", model="no-such-model", match={"Modality": "CT"})
    settings = Settings.model_validate(
        {"node": {"models_dir": str(tmp_path / "models"), "workers": 2}, "routes": [route.model_dump()]}
    )
    _, executor = pool(db, tmp_path, settings)
    try:

        def failures() -> list[dict[str, str]]:
            with db.session() as session:
                return [
                    event.detail
                    for event in session.scalars(select(AuditEvent)).all()
                    if event.action == "model.load_failed"
                ]

        said = lambda: [r for r in caplog.records if "could not load model package" in r.getMessage()]  # noqa: E731
        wait_for(lambda: len(said()) == 2, 120, "both workers to report the failed load")  # no job submitted
    finally:
        executor.shutdown()
    (failed,) = failures()  # both workers failed the same way: audited once
    assert failed["package"] == "no-such-model" and failed["error"].startswith("ModelMissing")


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
