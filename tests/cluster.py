"""A distributed node for tests and benchmarks: ``ainode serve`` (executor ``celery``, PostgreSQL) and
``ainode worker`` processes, each its own process group, on a broker of their own — a RabbitMQ
virtual host or a Redis database — so that nothing left by another run can reach them.

Used by tests/test_distributed*.py and benchmarks/distributed.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
import tomli_w
from sqlalchemy import select

from node.db import AuditEvent, Database, Job, JobStatus, Worker, open_database, utcnow
from tests.peers import REPO, NodeProcess, OrthancServer, free_port, storescu, wait_for
from training.chest_phantom import NORMAL, chest_dicom, sample

SECRET = "a-test-worker-secret"
PLUGIN = "tests.slow_output"
RABBITMQ = ("127.0.0.1", 5672)
REDIS = ("127.0.0.1", 6379)
REDIS_DATABASES = 16  # Redis's default "databases"


def _open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"rabbitmqctl {' '.join(args)}: {run.stdout}{run.stderr}"
    return run


@dataclass(frozen=True)
class Broker:
    """A broker of a run's own: a RabbitMQ virtual host (``where`` its name) or a Redis database
    (``where`` its number). ``visibility_seconds``: Redis's wait before it delivers again a message
    that nobody acknowledged (a killed worker's); None: the node's default. ``server``: a broker
    started by the run itself (:func:`redis_server`); None: the machine's."""

    kind: Literal["rabbitmq", "redis"]
    where: str
    visibility_seconds: float | None = None
    server: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.server or (RABBITMQ if self.kind == "rabbitmq" else REDIS)

    def url(self, address: str = "") -> str:
        """The broker URL, through ``address`` ("host:port", e.g. a relay's) if given."""
        host = address or "{}:{}".format(*self.address)
        if self.kind == "rabbitmq":
            return f"amqp://guest:guest@{host}/{quote(self.where, safe='')}"
        return f"redis://{host}/{self.where}"


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[Broker]:
    """A virtual host of its own on the local RabbitMQ (``rabbitmqctl``), deleted afterwards."""
    name = f"ainode-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield Broker("rabbitmq", name)
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=120)


CLAIM = "ainode-test-claim"


@contextlib.contextmanager
def redis_database(visibility_seconds: float | None = None) -> Iterator[Broker]:
    """An empty database of the local Redis, claimed with a key of this run's (the Redis may be
    shared: a database another run holds is left alone), flushed afterwards."""
    import redis

    token = uuid.uuid4().hex
    for number in random.sample(range(1, REDIS_DATABASES), REDIS_DATABASES - 1):
        client = redis.Redis(*REDIS, db=number)
        if client.dbsize() == 0 and client.set(CLAIM, token, nx=True) and client.dbsize() == 1:
            break
        client.close()
    else:
        raise RuntimeError(f"no empty Redis database at {REDIS[0]}:{REDIS[1]}")
    try:
        yield Broker("redis", str(number), visibility_seconds)
    finally:
        if client.get(CLAIM) == token.encode():
            client.flushdb()
        client.close()


class RedisServer:
    """A ``redis-server`` of the run's own on a free loopback port, keeping its data in ``folder`` the
    way a Redis broker must for queued jobs to outlive a restart: every write appended to its log and
    fsynced before Redis answers (``appendonly yes``, ``appendfsync always``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def broker(self, visibility_seconds: float | None = None) -> Broker:
        return Broker("redis", "0", visibility_seconds, ("127.0.0.1", self.port))

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=open(self.folder / "redis.log", "ab"),  # noqa: SIM115 - kept open for the process
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: _open("127.0.0.1", self.port), 30, "redis-server to listen")
        return self

    def stop(self) -> None:
        """SIGTERM: Redis closes its log and exits, as a broker's service stopped by systemd."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None


class Relay:
    """A TCP relay from ``listen`` to ``target``: how a worker in another network namespace reaches
    services that listen on 127.0.0.1 only (the broker, the node)."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((listen_host, 0))
        self.port = self.server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.server.close()


def chest_settings(pacs: OrthancServer | None = None) -> dict[str, Any]:
    """The tests' node: chest radiographs to chest-xray, with the "nap" output (a job as long as a
    worker's ``nap``), results sent to ``pacs`` if given."""
    settings: dict[str, Any] = {
        "node": {"plugins": [PLUGIN]},
        "study": {"stable_seconds": 0},
        "routes": [
            {
                "name": "chest",
                "match": {"Modality": "DX", "BodyPartExamined": "CHEST"},
                "handler": "chest_xray",
                "model": "chest-xray",
                "outputs": ["sc", "sr", "nap"],
                "destinations": ["pacs"] if pacs else [],
            }
        ],
    }
    if pacs is not None:
        settings["destinations"] = [
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ]
        settings["send"] = {"first_delay_seconds": 0.5, "backoff_factor": 1.5, "max_delay_seconds": 2}
    return settings


@dataclass(frozen=True)
class Counts:
    """What became of a cluster's jobs: each submitted one completed exactly once, none lost."""

    submitted: int
    completed_once: int
    completed_twice: int
    lost: int

    def __str__(self) -> str:
        return (
            f"submitted {self.submitted}, completed once {self.completed_once},"
            f" more than once {self.completed_twice}, lost {self.lost}"
        )


class Cluster:
    """A node and its workers, each its own process, as ``ainode serve`` and ``ainode worker``.

    ``vhost``: a RabbitMQ virtual host's name, or a :class:`Broker`. ``settings``: the node's (routes,
    destinations...; :func:`chest_settings` by default), to which the cluster adds the database and
    the executor: ``executor = "local"`` runs the same node on its own process pool, for comparison."""

    def __init__(
        self,
        folder: Path,
        vhost: str | Broker,
        database_url: str,
        pacs: OrthancServer | None = None,
        settings: dict[str, Any] | None = None,
        executor: Literal["celery", "local"] = "celery",
    ) -> None:
        self.folder = folder
        self.broker = vhost if isinstance(vhost, Broker) else Broker("rabbitmq", vhost)
        self.vhost = self.broker.where
        self.database_url = database_url
        settings = settings if settings is not None else chest_settings(pacs)
        settings.setdefault("node", {})["database_url"] = database_url
        settings.setdefault("jobs", {}).update(executor=executor, distributed=self.distributed())
        self.node = NodeProcess(folder / "node", settings)
        self.db: Database | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.sent = 0

    def distributed(self, broker: str = "", node_url: str = "") -> dict[str, Any]:
        """``[jobs.distributed]``, reaching the broker through ``broker`` ("host:port") if given."""
        table: dict[str, Any] = {
            "broker_url": self.broker.url(broker),
            "secret": SECRET,
            "node_url": node_url,
            "heartbeat_seconds": 1.0,
        }
        if self.broker.visibility_seconds is not None:
            table["visibility_seconds"] = self.broker.visibility_seconds
        return table

    def start(self) -> Cluster:
        self.node.start()
        self.db = open_database(self.database_url)
        return self

    def worker(
        self,
        name: str,
        models_dir: Path = REPO / "models",
        netns: str | None = None,
        broker: str = "",
        node_url: str = "",
        nap: float = 0.0,
        wait: bool = True,
        torch_threads: int = 2,
    ) -> subprocess.Popen[bytes]:
        """Start ``ainode worker`` with a data folder of its own; wait until the node hears from it.
        It skips the ONNX Runtime trial of every model before its first job (about 13 s here):
        test_deploy's worker runs it."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "node": {
                "data_dir": str(folder / "var"),
                "models_dir": str(models_dir),
                "workers": 1,
                "torch_threads": torch_threads,
                "plugins": [PLUGIN],
            },
            "jobs": {
                "onnx_runtime": "never",
                "distributed": self.distributed(broker, node_url or self.node.url),
            },
        }
        path = folder / "worker.toml"
        path.write_bytes(tomli_w.dumps(config).encode())
        command = [sys.executable, "-m", "node.cli", "worker", "--config", str(path), "--name", name]
        if netns:
            command = ["ip", "netns", "exec", netns, *command]
        log = open(folder / "worker.log", "ab")  # noqa: SIM115 - kept open for the process
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,  # its own process group: killed whole, as a host going away
            env={**os.environ, "TEST_NAP_SECONDS": str(nap)},
        )
        self.workers[name] = process
        if wait:
            self.wait_up(name)
        return process

    def wait_up(self, *names: str) -> None:
        """Until the node has heard from each of the workers ``names`` (those started with ``wait``
        False load their models at the same time)."""
        wait_for(lambda: all(self._alive(name) for name in names), 300, f"workers {names} to say they are up")

    def _alive(self, name: str) -> bool:
        process = self.workers[name]
        if process.poll() is not None:
            raise RuntimeError(f"worker {name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")
        assert self.db is not None
        with self.db.session() as session:
            worker = session.scalar(select(Worker).where(Worker.name == name))
            return worker is not None and (utcnow() - worker.last_seen_at).total_seconds() < 5

    def log(self, name: str) -> str:
        return (self.folder / name / "worker.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL the worker and its processes, as a host that goes away."""
        process = self.workers.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def send(self, count: int) -> list[str]:
        """``count`` chest radiographs, each its own study, sent to the node over DICOM."""
        files, studies = [], []
        for _ in range(count):
            self.sent += 1
            ds = chest_dicom(sample(np.random.default_rng(self.sent), 400, NORMAL), f"dist{self.sent}")
            path = self.folder / "studies" / f"{self.sent}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
            studies.append(str(ds.StudyInstanceUID))
        run = storescu(self.node.dicom_port, files)
        assert run.returncode == 0, run.stderr
        return studies

    def jobs(self) -> list[Job]:
        assert self.db is not None
        with self.db.session() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def wait_done(self, count: int, timeout: float = 300) -> list[Job]:
        def done() -> list[Job] | None:
            jobs = self.jobs()
            failed = [job for job in jobs if job.status == JobStatus.FAILED]
            assert not failed, [(job.id, job.error) for job in failed]
            finished = [job for job in jobs if job.status == JobStatus.DONE]
            return jobs if len(finished) >= count else None

        return wait_for(done, timeout, f"{count} jobs done", interval=0.5)  # type: ignore[no-any-return]

    def finished_events(self) -> dict[int, int]:
        """How many times each job was recorded as finished: once, whatever happened."""
        assert self.db is not None
        with self.db.session() as session:
            events = session.scalars(select(AuditEvent).where(AuditEvent.action == "job.finished")).all()
        counts: dict[int, int] = {}
        for event in events:
            counts[int(event.detail["job"])] = counts.get(int(event.detail["job"]), 0) + 1
        return counts

    def counts(self) -> Counts:
        """Every study sent is a job submitted; one done and recorded finished once completed once;
        one not done is lost (call it once the jobs had their time)."""
        jobs, finished = self.jobs(), self.finished_events()
        done = [job for job in jobs if job.status == JobStatus.DONE]
        once = sum(1 for job in done if finished.get(job.id) == 1)
        twice = sum(1 for job in jobs if finished.get(job.id, 0) > 1)
        return Counts(max(self.sent, len(jobs)), once, twice, max(self.sent, len(jobs)) - len(done))

    def stop(self) -> None:
        for name in list(self.workers):
            process = self.workers.pop(name)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.node.stop()
        if self.db is not None:
            self.db.dispose()


def only(models: list[str], folder: Path) -> Path:
    """A models folder holding only ``models`` (links to the bundled packages)."""
    folder.mkdir(parents=True)
    for name in models:
        (folder / name).symlink_to(REPO / "models" / name, target_is_directory=True)
    return folder
