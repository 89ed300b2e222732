"""Distributed workers (issue 14): the node (``ainode serve``, executor ``celery``, PostgreSQL) hands
jobs through a broker to ``ainode worker`` processes, which fetch the files over the node's internal
endpoints and return the results the same way.

Needs RabbitMQ at 127.0.0.1:5672 with ``rabbitmqctl`` (each test gets its own virtual host), Redis at
127.0.0.1:6379 for the tests run on either broker (a database of the test's own), the PostgreSQL of the
other tests, dcmtk's storescu; the network namespace test needs root (``ip netns``). The failure tests
print what became of their jobs (``-s``): submitted, completed once, lost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import Settings
from node.db import Database, Job, JobStatus, Send, SendStatus, Worker
from node.jobs import JobFailed, JobStore
from node.jobs.distributed import output_from_json, output_to_json, safe_name, spec_from_json, spec_to_json
from node.jobs.run import JobOutput, WrittenResult
from node.runtime.identity import ModelIdentity
from node.spool import Spool
from node.web.app import create_app
from tests.cluster import (
    RABBITMQ,
    REDIS,
    SECRET,
    Broker,
    Cluster,
    RedisServer,
    Relay,
    _open,
    only,
    rabbitmq_vhost,
    rabbitmqctl,
    redis_database,
)
from tests.conftest import postgres_database
from tests.peers import OrthancServer, wait_for
from tests.test_jobs import job, queued_job

pytestmark = pytest.mark.distributed


@pytest.fixture
def vhost() -> Iterator[str]:
    """A RabbitMQ virtual host of the test's own: queues left by another test cannot reach it."""
    pytest.importorskip("celery")
    if shutil.which("rabbitmqctl") is None or not _open(*RABBITMQ):
        pytest.skip("needs RabbitMQ at 127.0.0.1:5672 and rabbitmqctl")
    with rabbitmq_vhost() as broker:
        yield broker.where


# A killed worker's message comes back from Redis after this long: longer than the time from its
# delivery to the kill, and than a whole job (else Redis would hand a running job to a second worker).
REDIS_VISIBILITY_SECONDS = 30.0


@pytest.fixture(params=["rabbitmq", "redis"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """Each broker the node supports, a virtual host or database of the test's own."""
    if request.param == "rabbitmq":
        yield Broker("rabbitmq", request.getfixturevalue("vhost"))
        return
    pytest.importorskip("celery")
    pytest.importorskip("redis")
    if not _open(*REDIS):
        pytest.skip("needs Redis at 127.0.0.1:6379")
    with redis_database(REDIS_VISIBILITY_SECONDS) as database:
        yield database


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def cluster(tmp_path: Path, vhost: str, pg_url: str) -> Iterator[Cluster]:
    made = Cluster(tmp_path, vhost, pg_url)
    yield made
    made.stop()


@pytest.mark.slow
def test_a_study_goes_to_the_worker_with_the_model_and_its_results_are_sent(
    tmp_path: Path, broker: Broker, pg_url: str
) -> None:
    """The vertical slice: node → broker → the worker that has the model fetches the files over HTTP,
    runs the job, uploads the results → the node records them and sends them to the PACS. A worker
    without the model is running all the while and never receives a job."""
    pacs = OrthancServer(tmp_path / "orthanc").start()
    cluster = Cluster(tmp_path / "cluster", broker, pg_url, pacs=pacs)
    try:
        cluster.start()
        cluster.worker("has-model")
        cluster.worker("no-model", models_dir=only(["fundus"], tmp_path / "fundus-only"))
        studies = cluster.send(4)
        jobs = cluster.wait_done(4)
        assert {job.worker for job in jobs} == {"has-model"}
        assert all(job.attempts == 1 for job in jobs)
        assert set(cluster.finished_events().values()) == {1}
        assert "Task ainode.run_job[" not in cluster.log("no-model")  # never received one
        counts = cluster.counts()
        print(f"\n{broker.kind}, a worker without the model: {counts}")
        assert (counts.completed_once, counts.lost) == (4, 0)

        def all_sent() -> bool:
            assert cluster.db is not None
            with cluster.db.session() as session:
                statuses = session.scalars(select(Send.status)).all()
            return bool(statuses) and all(status == SendStatus.SENT for status in statuses)

        wait_for(all_sent, 120, "every result sent to the PACS")
        for study in studies:
            assert pacs.series_in_study(study)  # the image and the node's results
        # Each worker said what it serves; the one without the model has no queue for it.
        assert cluster.db is not None
        with cluster.db.session() as session:
            workers = {w.name: w for w in session.scalars(select(Worker))}
        assert "ainode.model.chest-xray" in workers["has-model"].queues
        assert not [q for q in workers["no-model"].queues if "chest-xray" in q]
    finally:
        cluster.stop()
        pacs.stop()


@pytest.mark.slow
def test_a_worker_killed_mid_job_the_job_completes_once_elsewhere(
    tmp_path: Path, broker: Broker, pg_url: str
) -> None:
    """RabbitMQ delivers the message again as soon as the killed worker's connection drops; Redis once
    it has gone unacknowledged for ``visibility_seconds``. Either way the same attempt runs again."""
    cluster = Cluster(tmp_path, broker, pg_url)
    try:
        cluster.start()
        cluster.worker("first", nap=20)
        studies = cluster.send(1)
        assert studies

        def taken() -> Job | None:
            jobs = cluster.jobs()
            return jobs[0] if jobs and jobs[0].worker == "first" else None

        job = wait_for(taken, 120, "the first worker to take the job")
        cluster.worker("second", nap=0)  # started now: the first worker surely took the job
        time.sleep(2)  # within its nap
        assert cluster.jobs()[0].status == JobStatus.RUNNING and cluster.jobs()[0].worker == "first"
        cluster.kill("first")
        killed = time.monotonic()
        (done,) = cluster.wait_done(1, timeout=240)
        assert done.id == job.id and done.worker == "second"
        assert done.attempts == 1  # delivered again by the broker: the same attempt, not a retry
        assert cluster.finished_events() == {job.id: 1}
        counts = cluster.counts()
        print(f"\n{broker.kind}, kill -9 mid-job: {counts}; done {time.monotonic() - killed:.0f} s after")
        assert (counts.completed_once, counts.lost) == (1, 0)
    finally:
        cluster.stop()


def broker_restarted_mid_queue(cluster: Cluster, restart: Callable[[], None], broker: str) -> None:
    """Three jobs claimed and waiting at the broker (no worker yet), ``restart``, then a worker: each
    job runs after it, once."""
    cluster.start()
    cluster.send(3)
    wait_for(
        lambda: len([j for j in cluster.jobs() if j.status == JobStatus.RUNNING]) == 3,
        60,
        "3 jobs at the broker",
    )
    restart()
    cluster.worker("after-restart")
    jobs = cluster.wait_done(3)
    assert {job.worker for job in jobs} == {"after-restart"}
    assert set(cluster.finished_events().values()) == {1}
    counts = cluster.counts()
    print(f"\n{broker}, broker restarted mid-queue: {counts}")
    assert (counts.completed_once, counts.lost) == (3, 0)


@pytest.mark.slow
def test_queued_jobs_survive_a_broker_restart(cluster: Cluster) -> None:
    if os.environ.get("TEST_NO_BROKER_RESTART"):
        pytest.skip("TEST_NO_BROKER_RESTART is set: the broker is shared")

    def restart() -> None:
        rabbitmqctl("stop_app")
        try:
            assert not _open(*RABBITMQ)
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")

    broker_restarted_mid_queue(cluster, restart, "rabbitmq")


@pytest.mark.slow
def test_queued_jobs_survive_a_restart_of_a_redis_that_keeps_its_log(tmp_path: Path, pg_url: str) -> None:
    """The machine's Redis keeps nothing on disk, so a Redis of the test's own, set as the README says
    a Redis broker must be (``appendonly yes``, ``appendfsync always``), stopped and started again."""
    pytest.importorskip("celery")
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    redis = RedisServer(tmp_path / "redis").start()
    cluster = Cluster(tmp_path / "cluster", redis.broker(REDIS_VISIBILITY_SECONDS), pg_url)

    def restart() -> None:
        redis.stop()
        assert not _open("127.0.0.1", redis.port)
        redis.start()

    try:
        broker_restarted_mid_queue(cluster, restart, "redis (its own, appendonly)")
    finally:
        cluster.stop()
        redis.stop()


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: its name and this side's address."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    name, host_end, ns_end = f"ainode-{tag}", f"vh{tag}", f"vn{tag}"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    added = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (needs root or CAP_NET_ADMIN): {added.stderr}")
    try:
        for command in (
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end],
            ["ip", "link", "set", ns_end, "netns", name],
            ["ip", "addr", "add", f"{subnet}.1/30", "dev", host_end],
            ["ip", "link", "set", host_end, "up"],
            ["ip", "netns", "exec", name, "ip", "addr", "add", f"{subnet}.2/30", "dev", ns_end],
            ["ip", "netns", "exec", name, "ip", "link", "set", ns_end, "up"],
            ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
        ):
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                pytest.skip(f"cannot set up the veth pair: {' '.join(command)}: {run.stderr}")
        yield name, f"{subnet}.1"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the veth pair along
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)


@pytest.mark.slow
def test_a_worker_in_its_own_network_namespace(cluster: Cluster, netns: tuple[str, str]) -> None:
    """A worker that shares neither the node's loopback nor its data folder: the broker and the node
    reach it only through the veth pair (relays stand in for their listening on a network address)."""
    name, address = netns
    cluster.start()
    node_port = int(cluster.node.url.rsplit(":", 1)[1])
    broker, node = Relay(address, RABBITMQ), Relay(address, ("127.0.0.1", node_port))
    try:
        cannot = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-c",
                "import socket; socket.create_connection(('127.0.0.1', 5672), 2)",
            ],
            capture_output=True,
        )
        assert cannot.returncode != 0  # the namespace's loopback has no broker
        cluster.worker(
            "isolated",
            netns=name,
            broker=f"{address}:{broker.port}",
            node_url=f"http://{address}:{node.port}",
        )
        cluster.send(2)
        jobs = cluster.wait_done(2)
        assert {job.worker for job in jobs} == {"isolated"}
        assert set(cluster.finished_events().values()) == {1}
        assert not list((cluster.folder / "isolated" / "var").glob("work/*"))  # fetched files cleaned up
    finally:
        broker.close()
        node.close()


@pytest.mark.slow
def test_the_internal_endpoints_want_the_secret(cluster: Cluster) -> None:
    import httpx

    cluster.start()
    url = f"{cluster.node.url}/internal/workers/w/heartbeat"
    assert httpx.post(url, json={}).status_code == 401
    assert httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.post(url, json={"models": ["x 1.0.0"]}, headers={"Authorization": f"Bearer {SECRET}"})
    assert ok.status_code == 204
    stale = httpx.post(
        f"{cluster.node.url}/internal/jobs/999/take",
        json={"attempt": 1, "worker": "w"},
        headers={"Authorization": f"Bearer {SECRET}"},
    )
    assert stale.status_code == 409


IDENTITY = ModelIdentity("ct-hemorrhage", "1.0.0", "ab" * 32, "ResNet50 classifier")
SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_an_outcome_is_recorded_only_for_the_attempt_still_running(db: Database, tmp_path: Path) -> None:
    """Compare-and-set on (job, attempt): a late or repeated outcome of an attempt that was decided is
    never recorded, so a job runs to completion once whatever the broker delivers twice."""
    queued_job(db, tmp_path, model="ct-hemorrhage")
    jobs = JobStore(db, Settings().jobs)
    claim = jobs.claim()
    assert claim is not None and claim.attempt == 1
    job_id = claim.spec.job_id
    assert jobs.take(job_id, 2, "w") is None  # not the attempt that runs
    taken = jobs.take(job_id, 1, "w")
    assert taken is not None and (taken.spec, taken.files, taken.attempt) == (claim.spec, claim.files, 1)
    assert job(db).worker == "w"
    assert jobs.fail(job_id, JobFailed("crashed", "late"), attempt=2) is False
    assert job(db).status == JobStatus.RUNNING
    assert jobs.fail(job_id, JobFailed("crashed", "died"), attempt=1) is True  # queued again
    again = jobs.claim()
    assert again is not None and again.attempt == 2
    output = JobOutput(IDENTITY, [], "nothing", {"analysed": False}, {})
    assert jobs.finish(job_id, output, attempt=1) is False  # the first attempt's late result
    assert jobs.files(job_id, 1) is None and jobs.files(job_id, 2) == claim.files
    assert jobs.finish(job_id, output, attempt=2) is True
    assert jobs.finish(job_id, output, attempt=2) is False  # delivered twice: recorded once
    assert (job(db).status, job(db).attempts) == (JobStatus.DONE, 2)


def test_what_crosses_the_broker_and_the_endpoints_round_trips(tmp_path: Path) -> None:
    from node.config import OutputSpec
    from node.jobs.run import JobSpec

    spec = JobSpec(
        7, "chest_xray", "chest-xray", "1.0.0", {"segmenter": "x"}, {"k": 1}, [OutputSpec(writer="sr")]
    )
    assert spec_from_json(spec_to_json(spec)) == spec
    output = JobOutput(
        IDENTITY, [WrittenResult("SR", "1.2.3", SR, "/w/out/SR-1.2.3.dcm")], "s", {"a": 1}, {"t": 1.5}
    )
    back = output_from_json(output_to_json(output), tmp_path)
    assert back.results[0].path == str(tmp_path / "SR-1.2.3.dcm")
    assert (back.model, back.summary, back.outcome, back.timings) == (IDENTITY, "s", {"a": 1}, {"t": 1.5})
    for bad in ("../x.dcm", "a/b.dcm", "..", ""):
        with pytest.raises(ValueError):
            safe_name(bad)


def test_the_internal_endpoints_hand_out_files_and_take_results(db: Database, tmp_path: Path) -> None:
    """A worker's side of a job, over HTTP: take, fetch, upload, finish; the wrong secret or a stale
    attempt is refused."""
    from fastapi.testclient import TestClient

    settings = Settings.model_validate({"jobs": {"distributed": {"secret": SECRET}}})
    spool = Spool(tmp_path)
    queued_job(db, tmp_path, model="ct-hemorrhage")
    claim = JobStore(db, settings.jobs).claim()
    assert claim is not None
    job_id, auth = claim.spec.job_id, {"Authorization": f"Bearer {SECRET}"}
    off = TestClient(create_app(db, spool, Settings()))  # no secret: the endpoints are off
    assert off.post(f"/internal/jobs/{job_id}/take", json={"attempt": 1}, headers=auth).status_code == 404
    client = TestClient(create_app(db, spool, settings))
    assert client.post(f"/internal/jobs/{job_id}/take", json={"attempt": 1}).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert client.post(f"/internal/jobs/{job_id}/take", json={"attempt": 1}, headers=bad).status_code == 401
    assert client.post(f"/internal/jobs/{job_id}/take", json={"attempt": 2}, headers=auth).status_code == 409
    taken = client.post(f"/internal/jobs/{job_id}/take", json={"attempt": 1, "worker": "w1"}, headers=auth)
    assert taken.status_code == 200
    assert taken.json()["files"] == len(claim.files) and "paths" not in taken.json()
    assert spec_from_json(taken.json()["spec"]) == claim.spec
    fetched = client.get(f"/internal/jobs/{job_id}/files/0?attempt=1", headers=auth)
    assert fetched.status_code == 200 and fetched.content == Path(claim.files[0]).read_bytes()
    assert client.get(f"/internal/jobs/{job_id}/files/0?attempt=2", headers=auth).status_code == 409
    assert client.get(f"/internal/jobs/{job_id}/files/99?attempt=1", headers=auth).status_code == 404
    put = client.put(f"/internal/jobs/{job_id}/results/SR-1.2.3.dcm?attempt=1", content=b"DICM", headers=auth)
    assert put.status_code == 204
    assert (spool.result_dir(job_id) / "SR-1.2.3.dcm").read_bytes() == b"DICM"
    output = JobOutput(IDENTITY, [WrittenResult("SR", "1.2.3", SR, "/w/SR-1.2.3.dcm")], "fine", {}, {})
    finish = f"/internal/jobs/{job_id}/finish?attempt=1"
    assert client.post(finish, json=output_to_json(output), headers=auth).status_code == 200
    assert client.post(finish, json=output_to_json(output), headers=auth).status_code == 409  # once
    done = job(db)
    assert (done.status, done.worker, done.summary) == (JobStatus.DONE, "w1", "fine")
    with db.session() as session:
        (result,) = session.scalars(select(Job).where(Job.id == job_id)).one().results
        assert result.path == str(spool.result_dir(job_id) / "SR-1.2.3.dcm")
