"""A distributed worker (``ainode worker --config FILE``): a Celery worker that runs the node's jobs
for the model packages in its own ``models_dir``, on any host that reaches the broker and the node.

It consumes only the queues of the packages it has (:func:`node.jobs.distributed.queue_name`), and of
the package sets the node's routes need with companion models that it holds whole (asked of the node as
it starts; the ``.gpu`` ones too where it has a GPU), ``node.workers`` processes at a time, each loading
every package before its first job. For each message it takes the attempt from the node (409: the attempt was
decided already — dropped), fetches the files into its own ``data_dir`` (or reads them from a shared
spool), runs :func:`node.jobs.run.run_job`, uploads the results and records the outcome; only then is
the message acknowledged. A heartbeat tells the node what it serves and that it is alive.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from node.config import Settings, load_plugins
from node.jobs.distributed import (
    EXCHANGE,
    TASK,
    Need,
    celery_app,
    declared_queue,
    output_to_json,
    queue_name,
    spec_from_json,
)
from node.jobs.local import pool_threads, runtime_cache
from node.jobs.run import PackageRef, Task, prefer_faster_runtime, preload, run_job, try_faster_runtime
from node.runtime.model import set_batch, set_threads
from node.runtime.package import ModelMissing, ModelRefused, discover

log = logging.getLogger(__name__)

RETRY_SECONDS = 120.0  # how long a call to the node is retried while the node cannot be reached
CHUNK = 1024 * 1024


class Stale(Exception):
    """The node no longer runs this attempt: the message is dropped."""


@dataclass(frozen=True)
class Serves:
    """What a worker runs: its packages, devices and the queues that follow from them."""

    name: str
    models: list[str]  # "name version"
    packages: list[PackageRef]  # the newest of each, loaded before the first job
    devices: list[str]
    queues: list[str]
    held: frozenset[tuple[str, str]] = frozenset()  # (name, version) of every package it has

    def queues_for(self, needed: Sequence[Need]) -> list[str]:
        """The queues of its packages, and of each of the ``needed`` package sets (the node's routes
        with companion models) that it holds whole."""
        names = {model for model, _ in self.held}
        whole = [
            need
            for need in needed
            if (need.model, need.version) in self.held or (need.version is None and need.model in names)
            if set(need.companions) <= names
        ]
        queues: list[str] = []
        for gpu in [g for g, device in ((False, "cpu"), (True, "gpu")) if device in self.devices]:
            for model, version in sorted(self.held):
                queues += [queue_name(model, gpu=gpu), queue_name(model, version, gpu)]
            queues += [need.queue(gpu) for need in whole]
        return list(dict.fromkeys(queues))


def devices(settings: Settings) -> list[str]:
    configured = settings.jobs.distributed.devices
    if configured:
        return list(dict.fromkeys(configured))
    # Asked through NVML: initialising CUDA in the parent would break it in the forked worker processes.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch

        gpu = bool(torch.cuda.is_available())
    except Exception:
        gpu = False
    return ["cpu", "gpu"] if gpu else ["cpu"]


def serves(settings: Settings, name: str = "", needed: Sequence[Need] = ()) -> Serves:
    """What the worker runs: every package in its models_dir, and each of the ``needed`` package sets
    that it holds whole (:meth:`Serves.queues_for`)."""
    found = discover(settings.node.models_dir)
    newest = {package.manifest.name: package.manifest.version for package in found}  # sorted: newest last
    what = Serves(
        name=name or settings.jobs.distributed.worker_name or f"ainode@{socket.gethostname()}",
        models=[f"{p.manifest.name} {p.manifest.version}" for p in found],
        packages=[(model, version) for model, version in newest.items()],
        devices=devices(settings),
        queues=[],
        held=frozenset((p.manifest.name, p.manifest.version) for p in found),
    )
    return replace(what, queues=what.queues_for(needed))


class NodeClient:
    """The node's internal endpoints, with the shared secret; calls are retried while the node cannot
    be reached (it restarts, the network blinks), up to :data:`RETRY_SECONDS`."""

    def __init__(self, settings: Settings) -> None:
        distributed = settings.jobs.distributed
        self.base = distributed.node_url.rstrip("/")
        self._secret = distributed.resolved_secret()
        self._context: ssl.SSLContext | None = None
        if self.base.startswith("https://"):
            self._context = ssl.create_default_context(
                cafile=str(distributed.ca_file) if distributed.ca_file else None
            )

    def _request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> Any:
        deadline, delay = time.monotonic() + RETRY_SECONDS, 0.5
        while True:
            request = urllib.request.Request(self.base + path, data=body, method=method)
            request.add_header("Authorization", f"Bearer {self._secret}")
            if body is not None:
                request.add_header("Content-Type", content_type)
            try:
                return urllib.request.urlopen(request, timeout=60, context=self._context)
            except urllib.error.HTTPError as exc:
                if exc.code == 409:
                    raise Stale(path) from None
                if exc.code < 500 or time.monotonic() > deadline:
                    raise
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def call(self, method: str, path: str, data: Any = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        with self._request(method, path, body) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def fetch(self, path: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._request("GET", path) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, CHUNK)

    def upload(self, path: str, source: Path) -> None:
        with self._request("PUT", path, source.read_bytes(), "application/dicom"):
            pass

    def needs(self) -> list[Need]:
        """The package sets the node's routes need with companion models."""
        return [
            Need(str(need["model"]), need.get("version") or None, tuple(need["companions"]))
            for need in self.call("GET", "/internal/needs")
        ]


def execute(settings: Settings, worker: str, job_id: int, attempt: int) -> str:
    """Run one attempt of a job and record its outcome with the node (the job as the node's database
    has it: the message names only the job and the attempt). Returns what became of it."""
    from celery.exceptions import SoftTimeLimitExceeded

    client = NodeClient(settings)
    job = f"/internal/jobs/{job_id}"
    try:
        taken = client.call("POST", f"{job}/take", {"attempt": attempt, "worker": worker})
    except Stale:
        log.info("job %d attempt %d: no longer running on the node; dropped", job_id, attempt)
        return "stale"
    work = settings.node.data_dir / "work" / f"{job_id}-{attempt}-{os.getpid()}"
    shared = "paths" in taken
    try:
        if shared:
            files = [str(path) for path in taken["paths"]]
            out_dir = Path(taken["result_dir"])
        else:
            files = []
            for index in range(int(taken["files"])):
                target = work / "in" / f"{index:06d}.dcm"
                client.fetch(f"{job}/files/{index}?attempt={attempt}", target)
                files.append(str(target))
            out_dir = work / "out"
        task = Task(spec_from_json(taken["spec"]), files, str(out_dir), str(settings.node.models_dir))
        failure: tuple[str, str] | None = None
        try:
            output = run_job(task)
        except SoftTimeLimitExceeded:
            failure = ("timeout", "the job ran past its time limit on the worker")
        except ModelRefused as exc:
            failure = ("model_refused", str(exc))
        except ModelMissing as exc:
            failure = ("model_missing", str(exc))
        except Exception as exc:
            failure = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
        mine = f"attempt={attempt}&worker={quote(worker, safe='')}"
        if failure is not None:
            client.call("POST", f"{job}/fail?{mine}", {"kind": failure[0], "message": failure[1]})
            return failure[0]
        if not shared:
            for written in output.results:
                name = quote(Path(written.path).name, safe="")
                client.upload(f"{job}/results/{name}?attempt={attempt}", Path(written.path))
        client.call("POST", f"{job}/finish?{mine}", output_to_json(output))
        return "done"
    except Stale:
        log.info("job %d attempt %d was decided on the node meanwhile; dropped", job_id, attempt)
        return "stale"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _follow_routes(client: NodeClient, what: Serves, app: Any, consuming: list[str]) -> None:
    """Consume the queue of each package set the node's routes need now (the node restarted with new
    routes) that the worker holds whole, through Celery's remote control (the worker's own loop runs
    it). Adds to ``consuming``."""
    from celery.utils.nodenames import default_nodename

    for name in [q for q in what.queues_for(client.needs()) if q not in consuming]:
        queue = declared_queue(name)
        app.control.add_consumer(
            name,
            exchange=EXCHANGE,
            exchange_type="direct",
            routing_key=name,
            destination=[default_nodename(what.name)],
            options={"queue_durable": queue.durable, "exchange_durable": queue.exchange.durable},
        )
        consuming.append(name)
        log.info("now consuming %s: the node's routes need it", name)


def _heartbeat(settings: Settings, what: Serves, app: Any, stop: threading.Event) -> None:
    """Follow the node's routes, and tell the node that the worker is alive and what it serves."""
    client = NodeClient(settings)
    consuming = list(what.queues)
    while True:
        try:
            _follow_routes(client, what, app, consuming)
        except Exception as exc:  # the node is away, or could not say: the queues stay as they are
            log.warning("asking %s what its routes need failed: %s", client.base, exc)
        info = {
            "host": socket.gethostname(),
            "models": what.models,
            "devices": what.devices,
            "queues": consuming,
            "concurrency": settings.node.workers,
        }
        try:
            client.call("POST", f"/internal/workers/{quote(what.name, safe='')}/heartbeat", info)
        except Exception as exc:  # the node is away: say so, keep running jobs, try again
            log.warning("heartbeat to %s failed: %s", client.base, exc)
        if stop.wait(settings.jobs.distributed.heartbeat_seconds):
            return


def build(settings: Settings, what: Serves) -> Any:
    """The worker's Celery app: the one task, the model queues, a heartbeat, models loaded in each
    worker process before its first job."""
    from celery import signals

    app = celery_app(settings.jobs.distributed, "ainode-worker")
    app.conf.task_queues = [declared_queue(name) for name in what.queues]
    stop = threading.Event()

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True)
    def run_task(job_id: int, attempt: int, spec: dict[str, Any], time_limit: float = 0.0) -> str:
        return execute(settings, what.name, job_id, attempt)

    @signals.worker_process_init.connect(weak=False)
    def load(**_: Any) -> None:
        set_threads(pool_threads(settings.node.torch_threads, settings.node.workers))  # the cores, shared
        set_batch(settings.jobs.batch_images)
        load_plugins(settings.node.plugins)
        for package in preload(settings.node.models_dir, what.packages):
            if package.error:
                log.error("could not load %s: %s", package.name, package.error)
        # A worker has no idle moments to spare for this, as the local pool does: the broker hands it
        # the next message as soon as one is acknowledged. So every package ONNX Runtime may run
        # faster is measured now, before the process takes its first job (the exports are cached in
        # data_dir/runtimes: a restarted worker only times them again; each choice is logged).
        prefer_faster_runtime(runtime_cache(settings) or None)
        while try_faster_runtime() is not None:
            pass

    @signals.worker_ready.connect(weak=False)
    def ready(**_: Any) -> None:
        threading.Thread(
            target=_heartbeat, args=(settings, what, app, stop), name="heartbeat", daemon=True
        ).start()

    @signals.worker_shutdown.connect(weak=False)
    def shutdown(**_: Any) -> None:
        stop.set()

    return app


def serve(settings: Settings, name: str = "", argv: Sequence[str] = ()) -> int:
    """Run the worker until it is stopped (SIGTERM: warm shutdown, running jobs finish first)."""
    what = serves(settings, name, NodeClient(settings).needs())
    if not what.queues:
        log.error("no model package in %s: this worker would never receive a job", settings.node.models_dir)
        return 1
    log.info("worker %s serves %s on %s", what.name, ", ".join(what.models), ", ".join(what.devices))
    app = build(settings, what)
    app.worker_main(
        [
            "worker",
            f"--hostname={what.name}",
            f"--concurrency={settings.node.workers}",
            "--pool=prefork",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=INFO",
            *argv,
        ]
    )
    return 0
