"""The distributed executor's failure semantics, visibility and routing (issue 14): a node restarted
under its jobs, a job that kills every worker it reaches, a worker whose main process alone is killed,
which worker ran what (API, pages), and jobs that need companion models going only to workers that
hold them.

The slow tests run the node and the workers as processes (tests/cluster.py), on RabbitMQ at
127.0.0.1:5672 with rabbitmqctl, PostgreSQL and dcmtk's storescu, as tests/test_distributed.py does.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from sqlalchemy import select, update

from node.config import Route, Settings
from node.db import AuditEvent, Database, Job, JobStatus, Worker, open_database, utcnow
from node.jobs import ExecutorContext, JobStore, watch
from node.jobs.distributed import CeleryExecutor, Need, needs, queue_name, record_worker
from node.jobs.run import JobOutput, JobSpec
from node.jobs.worker import serves
from node.service import Node
from node.spool import Spool
from tests.cluster import PLUGIN, SECRET, Cluster, chest_settings, only
from tests.peers import free_port, storescu, wait_for
from tests.test_distributed import IDENTITY
from tests.test_distributed import cluster as cluster  # noqa: F401 - the fixtures, for the slow tests here
from tests.test_distributed import pg_url as pg_url  # noqa: F401
from tests.test_distributed import vhost as vhost  # noqa: F401
from tests.test_faults_jobs import queue_jobs, started_long_ago
from tests.test_jobs import job, queued_job
from tests.web import logged_in
from training.skin_phantom import write_dermoscopy

pytestmark = pytest.mark.distributed

DERMOSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.7"  # Dermoscopic Photography Image Storage

SKIN = Route(
    name="skin",
    match={"Modality": "DMS", "SOPClassUID": DERMOSCOPY},
    handler="skin_lesion",
    model="skin-lesion",
    models={"segmentation": "skin-lesion-segmentation"},
    outputs=["sc", "sr"],  # type: ignore[list-item]
)
SKIN_QUEUE = "ainode.model.skin-lesion+skin-lesion-segmentation"


def actions(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def distributed(executor: str = "local", **settings: Any) -> Settings:
    return Settings.model_validate(
        {"jobs": {"executor": executor, "distributed": {"secret": SECRET, **settings}}}
    )


# --- The store: deliveries counted, outcomes named by the worker that recorded them -------------------


def test_a_job_that_kills_every_worker_it_reaches_fails_as_crashed(db: Database, tmp_path: Path) -> None:
    """Each take of the running attempt counts a delivery; past max_deliveries the attempt fails as
    ``crashed`` and is retried under max_attempts, as a job that crashes a process of the local pool."""
    queued_job(db, tmp_path, model="ct-hemorrhage")
    settings = Settings.model_validate({"jobs": {"max_attempts": 2, "distributed": {"max_deliveries": 2}}})
    jobs = JobStore(db, settings.jobs)
    for attempt in (1, 2):
        claim = jobs.claim()
        assert claim is not None and claim.attempt == attempt
        assert (job(db).worker, job(db).deliveries) == ("", 0)  # a new attempt: nobody took it yet
        for delivery in (1, 2):
            assert jobs.take(claim.spec.job_id, attempt, f"w{delivery}") is not None
            assert job(db).deliveries == delivery
        assert jobs.take(claim.spec.job_id, attempt, "w3") is None  # both died: the third is refused
        assert "took attempt" in job(db).error and job(db).worker == "w2"
    failed = job(db)
    assert (failed.status, failed.attempts) == (JobStatus.FAILED, 2)
    assert [e.detail["kind"] for e in actions(db, "job.retry") + actions(db, "job.failed")] == ["crashed"] * 2
    assert [e.detail["delivery"] for e in actions(db, "job.taken")] == [1, 2, 1, 2]


def test_a_stale_delivery_is_dropped_without_touching_the_running_attempt(
    db: Database, tmp_path: Path
) -> None:
    queued_job(db, tmp_path, model="ct-hemorrhage")
    jobs = JobStore(db, distributed(max_deliveries=1).jobs)
    claim = jobs.claim()
    assert claim is not None
    assert jobs.take(claim.spec.job_id, 2, "w") is None  # not the attempt that runs
    assert (job(db).status, job(db).deliveries, job(db).error) == (JobStatus.RUNNING, 0, "")


def test_the_outcome_names_the_worker_that_recorded_it(db: Database, tmp_path: Path) -> None:
    """A message delivered again while its first worker still runs it (the worker lost the broker):
    both run the attempt, the first outcome recorded wins and names its worker — not the one that took
    the attempt last."""
    queued_job(db, tmp_path, model="ct-hemorrhage")
    jobs = JobStore(db, Settings().jobs)
    claim = jobs.claim()
    assert claim is not None
    job_id = claim.spec.job_id
    assert jobs.take(job_id, 1, "first") is not None
    assert jobs.take(job_id, 1, "second") is not None
    assert job(db).worker == "second"
    output = JobOutput(IDENTITY, [], "nothing", {"analysed": False}, {})
    assert jobs.finish(job_id, output, attempt=1, worker="first") is True
    assert jobs.finish(job_id, output, attempt=1, worker="second") is False
    assert (job(db).status, job(db).worker) == (JobStatus.DONE, "first")
    assert [e.detail["worker"] for e in actions(db, "job.finished")] == ["first"]


def test_a_job_waits_at_the_broker_for_a_worker_with_its_model_however_long(
    db: Database, tmp_path: Path
) -> None:
    """The watchdog leaves alone a job no worker took while no live worker consumes its queue; once
    one does, a job still untaken past its limit was lost (its message, say, with a Redis that keeps
    nothing) and is retried. A worker's take restarts the attempt's clock."""
    (waiting,) = queue_jobs(db, tmp_path, {})
    settings = Settings.model_validate(
        {
            "jobs": {
                "executor": "celery",
                "timeout_base_seconds": 30,
                "watchdog_grace_seconds": 10,
                "distributed": {"secret": SECRET, "heartbeat_seconds": 5},
            }
        }
    )
    store = JobStore(db, settings.jobs)
    executor = CeleryExecutor(ExecutorContext(settings, store, Spool(tmp_path), lambda: None))
    claim = store.claim()
    assert claim is not None
    queue = executor.queue_for(claim.spec)
    started_long_ago(db, waiting, 3600)
    record_worker(db, "other", {"queues": ["ainode.model.fundus"]})  # alive, without the model
    assert watch(store, executor) == 0
    assert (job(db).status, job(db).attempts) == (JobStatus.RUNNING, 1)

    record_worker(db, "has-it", {"queues": [queue]})
    assert store.take(waiting, 1, "has-it") is not None  # taken: the limit counts from now
    assert watch(store, executor) == 0 and job(db).status == JobStatus.RUNNING

    with db.session() as session:  # as if nobody had taken it, with a live worker consuming its queue
        session.execute(update(Job).where(Job.id == waiting).values(deliveries=0, worker=""))
    started_long_ago(db, waiting, 3600)
    assert watch(store, executor) == 1
    lost = job(db)
    assert (lost.status, lost.attempts) == (JobStatus.QUEUED, 1) and "was not running it" in lost.error


# --- Routing on the whole package set --------------------------------------------------------------


def test_a_job_with_a_companion_goes_to_the_queue_of_its_package_set(db: Database, tmp_path: Path) -> None:
    plain = Route(name="chest", handler="chest_xray", model="chest-xray")
    assert needs([plain, SKIN, SKIN.model_copy(update={"name": "again"})]) == [
        Need("skin-lesion", None, ("skin-lesion-segmentation",))
    ]
    assert needs([plain]) == []
    set_queue = SKIN_QUEUE
    assert queue_name("skin-lesion", companions=["skin-lesion-segmentation"]) == set_queue
    assert queue_name("m", "1.0", True, ["b", "a", "m"]) == "ainode.model.m@1.0+a+b.gpu"
    settings = distributed()
    executor = CeleryExecutor(
        ExecutorContext(settings, JobStore(db, settings.jobs), Spool(tmp_path), lambda: None)
    )
    spec = JobSpec(1, "skin_lesion", "skin-lesion", companions={"segmentation": "skin-lesion-segmentation"})
    assert executor.queue_for(spec) == set_queue
    assert executor.queue_for(JobSpec(2, "chest_xray", "chest-xray")) == "ainode.model.chest-xray"


def test_a_worker_consumes_a_package_sets_queue_only_when_it_holds_it_whole(tmp_path: Path) -> None:
    needed = needs([SKIN])
    set_queue = needed[0].queue()

    def queues(models: list[str]) -> list[str]:
        folder = only(models, tmp_path / "+".join(models))
        settings = Settings.model_validate(
            {"node": {"models_dir": str(folder)}, "jobs": {"distributed": {"devices": ["cpu"]}}}
        )
        return serves(settings, "w", needed).queues

    main_only = queues(["skin-lesion"])
    assert set_queue not in main_only
    assert "ainode.model.skin-lesion" in main_only  # its jobs without a companion
    assert set_queue in queues(["skin-lesion", "skin-lesion-segmentation"])
    assert set_queue not in queues(["skin-lesion-segmentation", "chest-xray"])


def test_the_node_tells_workers_which_package_sets_its_routes_need(db: Database, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from node.web.app import create_app

    settings = Settings.model_validate(
        {"jobs": {"distributed": {"secret": SECRET}}, "routes": [SKIN.model_dump()]}
    )
    client = TestClient(create_app(db, Spool(tmp_path), settings))
    assert client.get("/internal/needs").status_code == 401
    answer = client.get("/internal/needs", headers={"Authorization": f"Bearer {SECRET}"})
    assert answer.json() == [
        {"model": "skin-lesion", "version": None, "companions": ["skin-lesion-segmentation"]}
    ]


# --- Which worker ran what -------------------------------------------------------------------------


def test_workers_and_the_worker_of_each_job_are_shown(db: Database, tmp_path: Path) -> None:
    settings = distributed("celery", heartbeat_seconds=10)
    spool = Spool(tmp_path)
    info = {
        "host": "gpu-1",
        "models": ["chest-xray 1.0.0"],
        "devices": ["cpu", "gpu"],
        "queues": ["q1"],
        "concurrency": 2,
    }
    record_worker(db, "alive-one", info)
    record_worker(db, "gone-one", {**info, "host": "old"})
    with db.session() as session:
        session.execute(
            update(Worker)
            .where(Worker.name == "gone-one")
            .values(last_seen_at=utcnow() - timedelta(minutes=5))
        )
    queued_job(db, tmp_path, model="ct-hemorrhage")
    jobs = JobStore(db, settings.jobs)
    claim = jobs.claim()
    assert claim is not None and jobs.take(claim.spec.job_id, 1, "alive-one") is not None
    viewer = logged_in(db, spool, "viewer", settings)

    listed = {w["name"]: w for w in viewer.get("/api/workers").json()}
    assert (listed["alive-one"]["alive"], listed["gone-one"]["alive"]) == (True, False)
    alive = listed["alive-one"]
    assert (alive["host"], alive["devices"], alive["concurrency"], alive["jobs_running"]) == (
        "gpu-1",
        ["cpu", "gpu"],
        2,
        1,
    )
    assert alive["models"] == ["chest-xray 1.0.0"] and alive["queues"] == ["q1"]
    page = viewer.get("/workers").text
    assert (
        'id="worker-alive-one"' in page and "gpu-1" in page and "stale" in page and "chest-xray 1.0.0" in page
    )
    overview = viewer.get("/api/overview").json()
    assert overview["workers"] == {
        "alive": 1,
        "stale": 1,
        "jobs_waiting_for_a_worker": 0,
        "queues_without_a_worker": [],
    }
    assert "distributed workers alive" in viewer.get("/").text

    with db.session() as session:
        study_uid = session.scalars(select(Job)).one().series.study.study_uid
    (series,) = viewer.get(f"/api/studies/{study_uid}").json()["series"]
    assert series["jobs"][0]["worker"] == "alive-one"

    with db.session() as session:  # as if nobody had taken it: the live worker has not its model
        session.execute(update(Job).values(deliveries=0, worker=""))
    overview = viewer.get("/api/overview").json()
    assert overview["workers"]["queues_without_a_worker"] == ["ainode.model.ct-hemorrhage"]
    assert (
        "1 job(s) wait at the broker: no live worker consumes ainode.model.ct-hemorrhage"
        " (start one holding those models)" in overview["problems"]
    )

    with db.session() as session:  # every worker silent: the overview says so
        session.execute(update(Worker).values(last_seen_at=utcnow() - timedelta(minutes=5)))
    assert (
        "no distributed worker is alive: jobs wait at the broker"
        in viewer.get("/api/overview").json()["problems"]
    )
    local = logged_in(db, spool, "admin", Settings())
    assert local.get("/api/overview").json()["workers"] is None  # the local pool: nothing to show


# --- A node restarted under its jobs ---------------------------------------------------------------


def test_a_node_started_again_leaves_a_distributed_executors_jobs_running(
    database_url: str, tmp_path: Path
) -> None:
    """The local pool's processes die with the node, so its running jobs are queued again; a broker
    keeps a distributed executor's, so they stay running (the watchdog is the backstop)."""
    base = {
        "node": {"database_url": database_url, "data_dir": str(tmp_path / "var"), "dicom_port": free_port()},
        "jobs": {"distributed": {"secret": SECRET}},
    }
    db = open_database(database_url)
    try:
        queued_job(db, tmp_path, model="ct-hemorrhage")
        assert JobStore(db, Settings().jobs).claim() is not None
        for executor in ("celery", "local"):
            node = Node(Settings.model_validate({**base, "jobs": {**base["jobs"], "executor": executor}}))
            node.start()
            node.stop()
            if executor == "celery":
                assert job(db).status == JobStatus.RUNNING
        assert [e.detail["requeued_jobs"] for e in actions(db, "node.started")] == [0, 1]
        assert len(actions(db, "job.requeued")) == 1
    finally:
        db.dispose()


@pytest.mark.slow
def test_a_node_restarted_mid_job_the_job_completes_once(cluster: Cluster) -> None:
    """The node is killed while a worker runs its job and comes back after the worker finished: the
    worker's outcome waits for it (retried), is recorded once, under the same attempt."""
    cluster.start()
    cluster.worker("w", nap=6)
    cluster.send(1)
    taken = wait_for(
        lambda: [j for j in cluster.jobs() if j.worker == "w"], 120, "the worker to take the job"
    )
    cluster.node.kill()
    time.sleep(8)  # the nap is over: the worker is trying to record the outcome with a node that is away
    cluster.node.start()
    (done,) = cluster.wait_done(1, timeout=240)
    assert (done.id, done.worker, done.attempts) == (taken[0].id, "w", 1)
    assert cluster.finished_events() == {done.id: 1}
    assert cluster.db is not None
    assert not actions(cluster.db, "job.requeued")
    assert [e.detail["requeued_jobs"] for e in actions(cluster.db, "node.started")] == [0, 0]


# --- Workers that die --------------------------------------------------------------------------------


@pytest.fixture
def clusters(tmp_path: Path, vhost: str, pg_url: str) -> Iterator[Callable[[dict[str, Any]], Cluster]]:
    """A cluster whose node runs with the settings given (see tests.cluster.chest_settings)."""
    made: list[Cluster] = []

    def make(settings: dict[str, Any]) -> Cluster:
        made.append(Cluster(tmp_path / "cluster", vhost, pg_url, settings=settings))
        return made[-1]

    yield make
    for each in made:
        each.stop()


@pytest.mark.slow
def test_a_job_that_kills_its_worker_is_not_delivered_forever(
    clusters: Callable[[dict[str, Any]], Cluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose output kills the worker process (os._exit): the broker delivers it again each time;
    the node refuses it past max_deliveries and fails the attempt as crashed, then the job for good
    after max_attempts. The worker itself lives on."""
    monkeypatch.setenv("AINODE_NODE__PLUGINS", f'["{PLUGIN}", "tests.crash_output"]')  # node and workers
    settings = chest_settings()
    settings["routes"][0]["outputs"] = ["crash"]
    cluster = clusters(settings)
    cluster.node.settings["jobs"].update(max_attempts=2)
    cluster.node.settings["jobs"]["distributed"].update(max_deliveries=2)
    cluster.node.config.write_bytes(tomli_w.dumps(cluster.node.settings).encode())
    cluster.start()
    worker = cluster.worker("w")
    cluster.send(1)

    def failed() -> Job | None:
        jobs = cluster.jobs()
        return jobs[0] if jobs and jobs[0].status == JobStatus.FAILED else None

    ended = wait_for(failed, 300, "the job to fail for good")
    assert ended.attempts == 2 and "took attempt 2 2 times" in ended.error
    assert cluster.db is not None
    assert len(actions(cluster.db, "job.taken")) == 4  # 2 deliveries of each attempt ran
    assert [
        e.detail["kind"] for e in actions(cluster.db, "job.retry") + actions(cluster.db, "job.failed")
    ] == [
        "crashed",
        "crashed",
    ]
    assert not cluster.finished_events()
    assert worker.poll() is None  # its pool processes died, not the worker
    wait_for(lambda: "'stale'" in cluster.log("w"), 60, "the refused delivery to be dropped")


@pytest.mark.slow
def test_a_worker_whose_main_process_is_killed_its_job_completes_once_elsewhere(cluster: Cluster) -> None:
    """SIGKILL to the worker's main process only: its pool processes go with it (they die with their
    parent), the broker delivers the message again, and the job completes once on the other worker,
    which the job names."""
    cluster.start()
    first = cluster.worker("first", nap=8)
    cluster.send(1)
    taken = wait_for(
        lambda: [j for j in cluster.jobs() if j.worker == "first"], 120, "the first worker to take it"
    )
    cluster.worker("second")
    os.kill(first.pid, signal.SIGKILL)  # the main process only: not its process group
    first.wait(timeout=30)

    def group_gone() -> bool:
        try:
            os.killpg(first.pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_for(group_gone, 30, "the first worker's pool processes to end with it")
        (done,) = cluster.wait_done(1, timeout=240)
        assert (done.id, done.worker, done.attempts, done.deliveries) == (taken[0].id, "second", 1, 2)
        assert cluster.finished_events() == {done.id: 1}
        assert cluster.db is not None
        assert [e.detail["worker"] for e in actions(cluster.db, "job.finished")] == ["second"]
    finally:
        if not group_gone():
            os.killpg(first.pid, signal.SIGKILL)


# --- Companion models ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_goes_only_to_a_worker_holding_its_companion_model(
    clusters: Callable[[dict[str, Any]], Cluster], tmp_path: Path
) -> None:
    """A route whose handler needs a companion model (a segmenter beside the classifier): a worker with
    the main model alone never receives its job; one holding both runs it."""
    settings = chest_settings()
    settings["routes"].append(SKIN.model_dump(mode="json", exclude_none=True))
    cluster = clusters(settings)
    cluster.start()
    cluster.worker("main-only", models_dir=only(["skin-lesion"], tmp_path / "main-only"))
    send_dermoscopy(cluster, tmp_path / "photos")
    wait_for(
        lambda: [j for j in cluster.jobs() if j.status == JobStatus.RUNNING], 60, "the job at the broker"
    )
    time.sleep(5)  # time enough for a wrong delivery
    (waiting,) = cluster.jobs()
    assert (waiting.status, waiting.worker) == (JobStatus.RUNNING, "")
    cluster.worker("whole", models_dir=only(["skin-lesion", "skin-lesion-segmentation"], tmp_path / "whole"))
    (done,) = cluster.wait_done(1, timeout=240)
    assert (done.worker, done.attempts, done.deliveries) == ("whole", 1, 1)
    assert "Task ainode.run_job[" not in cluster.log("main-only")
    assert cluster.db is not None
    with cluster.db.session() as session:
        queues = {w.name: w.queues for w in session.scalars(select(Worker))}
    assert SKIN_QUEUE in queues["whole"]
    assert SKIN_QUEUE not in queues["main-only"]


@pytest.mark.slow
def test_a_worker_follows_the_routes_of_a_node_started_again(
    clusters: Callable[[dict[str, Any]], Cluster], tmp_path: Path
) -> None:
    """A worker that holds a package set no route needed when it started consumes its queue once the
    node comes back with a route that needs it, without a restart of its own."""
    cluster = clusters(chest_settings())
    cluster.start()
    cluster.worker("whole", models_dir=only(["skin-lesion", "skin-lesion-segmentation"], tmp_path / "whole"))
    assert SKIN_QUEUE not in worker_queues(cluster, "whole")
    cluster.node.stop()
    cluster.node.settings["routes"].append(SKIN.model_dump(mode="json", exclude_none=True))
    cluster.node.config.write_bytes(tomli_w.dumps(cluster.node.settings).encode())
    cluster.node.start()
    wait_for(lambda: SKIN_QUEUE in worker_queues(cluster, "whole"), 60, "the worker to take up the new queue")
    send_dermoscopy(cluster, tmp_path / "photos")
    (done,) = cluster.wait_done(1, timeout=120)
    assert (done.worker, done.attempts) == ("whole", 1)
    assert f"Started consuming from {SKIN_QUEUE}" in cluster.log("whole")


def worker_queues(cluster: Cluster, name: str) -> list[str]:
    assert cluster.db is not None
    with cluster.db.session() as session:
        return list(session.scalars(select(Worker.queues).where(Worker.name == name)).one())


def send_dermoscopy(cluster: Cluster, folder: Path) -> None:
    """One dermoscopy photograph to the node over DICOM (the skin route's study)."""
    photo = write_dermoscopy(folder, "mel", seed=11, shape=(240, 320))
    profile = folder / "dermoscopy.cfg"  # storescu proposes only the SOP classes dcmtk knows
    profile.write_text(
        "[[TransferSyntaxes]]\n[Explicit]\nTransferSyntax1 = LittleEndianExplicit\n"
        f"[[PresentationContexts]]\n[Skin]\nPresentationContext1 = {DERMOSCOPY}\\Explicit\n"
        "[[Profiles]]\n[Skin]\nPresentationContexts = Skin\n"
    )
    run = storescu(cluster.node.dicom_port, [photo], extra=["-xf", str(profile), "Skin"])
    assert run.returncode == 0, run.stderr
