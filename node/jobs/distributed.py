"""The distributed executor (``[jobs] executor = "celery"``): jobs run on ``ainode worker`` processes on
any host, handed to them through a Celery broker (RabbitMQ, or Redis).

What stays with the node: the job state machine, in its database (PostgreSQL when distributed), and
the spool. The broker carries only "run attempt *n* of job *j*" — no result backend; a worker fetches
the claimed files over the node's internal HTTP endpoints (:mod:`node.web.internal`), or reads them
from a shared spool, and returns results the same way; the node records them through the store and the
outbox exactly as the local pool does.

Routing: one durable queue per set of model packages a job needs (``ainode.model.<name>``, ``…@<version>``
for a route that pins one, ``…+<companion>`` for each companion model of the route, ``….gpu`` for GPU
workers); a worker consumes only the queues of the sets it holds whole (it asks the node which sets its
routes need: :func:`needs`), so a worker without the model, or without a companion, never receives the
job.

Failure semantics: a message is acknowledged only after the worker has recorded the outcome with the
node (``acks_late``), and given back when the worker's process dies (``task_reject_on_worker_lost``);
a worker killed whole (kill -9, host gone) drops its broker connection and the broker delivers the
message again to another worker. Every outcome names the attempt it belongs to, and the store records
it only while the job still runs that attempt (compare-and-set), so a message delivered twice runs to
completion once at most; the node's watchdog stays the backstop for a message nobody runs.

Celery is imported only when this executor or a worker starts (``pip install -e .[distributed]``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from node.config import DistributedSettings, OutputSpec, Route
from node.db import Database, Job, JobStatus, Worker, utcnow
from node.jobs.executor import ExecutorContext, register_executor
from node.jobs.run import JobOutput, JobSpec, WrittenResult
from node.jobs.store import Claim
from node.runtime.identity import ModelIdentity

log = logging.getLogger(__name__)

TASK = "ainode.run_job"
EXCHANGE = "ainode"
QUEUE_PREFIX = "ainode.model."
ALIVE_HEARTBEATS = 3  # a worker silent for this many heartbeats is taken for gone


def queue_name(
    model: str, version: str | None = None, gpu: bool = False, companions: Iterable[str] = ()
) -> str:
    """The queue of jobs for ``model`` (pinned to ``version`` if given) that also need the model
    packages ``companions``, on a GPU if ``gpu``."""
    pinned = f"@{version}" if version else ""
    also = "".join(f"+{name}" for name in sorted(set(companions) - {model}))
    return f"{QUEUE_PREFIX}{model}{pinned}{also}{'.gpu' if gpu else ''}"


@dataclass(frozen=True)
class Need:
    """The model packages a route's jobs run on: what a worker must hold whole to receive them."""

    model: str
    version: str | None
    companions: tuple[str, ...]  # sorted, without the main model

    def queue(self, gpu: bool = False) -> str:
        return queue_name(self.model, self.version, gpu, self.companions)


def needs(routes: Iterable[Route]) -> list[Need]:
    """The package sets of the node's routes that have companion models (a job without one goes to
    its model's own queue, which every worker holding the model consumes), each once."""
    found = {
        Need(route.model, route.model_version, tuple(sorted(set(route.models.values()) - {route.model})))
        for route in routes
        if set(route.models.values()) - {route.model}
    }
    return sorted(found, key=lambda need: need.queue())


def task_id(job_id: int, attempt: int) -> str:
    return f"ainode-job-{job_id}-{attempt}"


def celery_app(settings: DistributedSettings, name: str) -> Any:
    """A Celery app for the node or a worker: JSON only, no result backend, persistent messages,
    acknowledged after the outcome is recorded, one message per worker process at a time."""
    from celery import Celery

    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    transport: dict[str, Any] = {}
    if settings.broker_url.startswith(("redis", "rediss")):
        # Redis has no connection-bound acknowledgement: a message unacknowledged this long is
        # delivered again, so it must be longer than the longest job.
        transport["visibility_timeout"] = settings.visibility_seconds
        # kombu looks for such messages only every interval x throttle (10 x 10 s by default): look
        # every few seconds instead, so a killed worker's message comes back within visibility + 10 s.
        transport["unacked_restore_throttle"] = 1
        transport["unacked_restore_interval"] = max(1, min(10, int(settings.visibility_seconds / 3)))
    else:
        transport["confirm_publish"] = True  # submit returns once the broker has the message
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # a failure is recorded with the node before it is acked
        worker_prefetch_multiplier=1,
        task_default_delivery_mode="persistent",
        task_default_exchange=EXCHANGE,
        task_default_exchange_type="direct",
        task_create_missing_queues=True,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_proc_alive_timeout=300.0,  # a worker process loads its models before it says it is up
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def declared_queue(name: str) -> Any:
    """A durable queue bound to the durable ``ainode`` exchange under its own name."""
    from kombu import Exchange, Queue

    return Queue(name, Exchange(EXCHANGE, type="direct", durable=True), routing_key=name, durable=True)


# What crosses the broker and the internal endpoints: JSON.


def spec_to_json(spec: JobSpec) -> dict[str, Any]:
    return {
        "job_id": spec.job_id,
        "handler": spec.handler,
        "model": spec.model,
        "model_version": spec.model_version,
        "companions": dict(spec.companions),
        "options": dict(spec.options),
        "outputs": [output.model_dump(mode="json") for output in spec.outputs],
    }


def spec_from_json(data: dict[str, Any]) -> JobSpec:
    return JobSpec(
        job_id=int(data["job_id"]),
        handler=str(data["handler"]),
        model=str(data["model"]),
        model_version=data.get("model_version") or None,
        companions=dict(data.get("companions") or {}),
        options=dict(data.get("options") or {}),
        outputs=[OutputSpec.model_validate(output) for output in data.get("outputs") or []],
    )


def output_to_json(output: JobOutput) -> dict[str, Any]:
    """A job's output with each result named by its file name only (where it lies is the receiver's)."""
    return {
        "model": asdict(output.model),
        "results": [
            {
                "kind": result.kind,
                "sop_uid": result.sop_uid,
                "sop_class_uid": result.sop_class_uid,
                "name": Path(result.path).name,
            }
            for result in output.results
        ],
        "summary": output.summary,
        "outcome": output.outcome,
        "timings": output.timings,
        "models_loaded": list(output.models_loaded),
    }


def safe_name(name: str) -> str:
    """A result file's name as a worker sends it: one plain name, never a path."""
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


def output_from_json(data: dict[str, Any], result_dir: Path) -> JobOutput:
    """The output a worker sent, its results where the node keeps them (``result_dir``)."""
    results = [
        WrittenResult(
            str(item["kind"]),
            str(item["sop_uid"]),
            str(item["sop_class_uid"]),
            str(result_dir / safe_name(str(item["name"]))),
        )
        for item in data["results"]
    ]
    return JobOutput(
        ModelIdentity(**data["model"]),
        results,
        str(data["summary"]),
        dict(data["outcome"]),
        {str(k): float(v) for k, v in dict(data.get("timings") or {}).items()},
        tuple(str(name) for name in data.get("models_loaded") or ()),
    )


# Workers as they advertise themselves.


def record_worker(db: Database, name: str, info: dict[str, Any]) -> None:
    """A worker's heartbeat: create or refresh its row."""
    now = utcnow()
    with db.session() as session:
        worker = session.scalar(select(Worker).where(Worker.name == name))
        if worker is None:
            worker = Worker(name=name, started_at=now)
            session.add(worker)
        worker.host = str(info.get("host", ""))[:255]
        worker.models = [str(model) for model in info.get("models", [])]
        worker.devices = [str(device) for device in info.get("devices", [])]
        worker.queues = [str(queue) for queue in info.get("queues", [])]
        worker.concurrency = int(info.get("concurrency", 1))
        worker.last_seen_at = now


def silent_after(settings: DistributedSettings) -> timedelta:
    """How long a worker may go unheard before it is taken for gone: a few heartbeats."""
    return timedelta(seconds=settings.heartbeat_seconds * ALIVE_HEARTBEATS)


def live_workers(db: Database, settings: DistributedSettings) -> list[Worker]:
    """Workers heard from within the last few heartbeats."""
    since = utcnow() - silent_after(settings)
    with db.session() as session:
        return list(session.scalars(select(Worker).where(Worker.last_seen_at >= since).order_by(Worker.name)))


def awaiting_a_worker(
    db: Database, settings: DistributedSettings, job_ids: Collection[int] | None = None
) -> dict[int, str]:
    """Running jobs (of ``job_ids``, else all) that no worker has taken while no live worker consumes
    their queue, CPU or GPU: job id → the queue they wait in."""
    consumed = {queue for worker in live_workers(db, settings) for queue in worker.queues}
    query = select(Job).where(Job.status == JobStatus.RUNNING, Job.deliveries == 0)
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    waiting = {}
    with db.session() as session:
        for job in session.scalars(query):
            cpu, gpu = (
                queue_name(job.model, job.model_version or None, on_gpu, job.companions.values())
                for on_gpu in (False, True)
            )
            if cpu not in consumed and gpu not in consumed:
                waiting[job.id] = cpu
    return waiting


@register_executor("celery")
class CeleryExecutor:
    """Hands claimed jobs to the broker, into the queue of their model packages; workers record
    outcomes through the node's internal endpoints. Holds no job in memory: what runs is what the
    database says — and the broker keeps the messages, so jobs running when the node stops run on
    (``jobs_outlive_the_node``): a restarted node does not queue them again."""

    jobs_outlive_the_node = True

    def __init__(self, context: ExecutorContext) -> None:
        self.context = context
        self.settings = context.settings.jobs.distributed
        if not self.settings.resolved_secret():
            raise ValueError("jobs.distributed: set secret or secret_file: workers need it to reach the node")
        self._app: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._app is None:
                self._app = celery_app(self.settings, "ainode-node")

    def capacity(self) -> int:
        with self.context.store.db.session() as session:
            running = session.scalar(select(func.count(Job.id)).where(Job.status == JobStatus.RUNNING)) or 0
        return max(0, self.settings.max_in_flight - int(running))

    def queue_for(self, spec: JobSpec) -> str:
        """The job's GPU queue where a live GPU worker serves it, else its CPU queue."""
        companions = spec.companions.values()
        gpu = queue_name(spec.model, spec.model_version, True, companions)
        if self.settings.prefer_gpu:
            for worker in live_workers(self.context.store.db, self.settings):
                if "gpu" in worker.devices and gpu in worker.queues:
                    return gpu
        return queue_name(spec.model, spec.model_version, False, companions)

    def submit(self, claim: Claim) -> None:
        self.start()
        spec = claim.spec
        name = self.queue_for(spec)
        queue = declared_queue(name)
        self._app.send_task(
            TASK,
            kwargs={
                "job_id": spec.job_id,
                "attempt": claim.attempt,
                "spec": spec_to_json(spec),
                "time_limit": claim.time_limit,
            },
            task_id=task_id(spec.job_id, claim.attempt),
            queue=queue,
            exchange=queue.exchange,
            routing_key=name,
            declare=[queue],  # the queue holds the job until a worker with the model comes
            soft_time_limit=claim.time_limit,
            time_limit=claim.time_limit + 30,
            retry=True,
        )
        log.info("job %d attempt %d sent to %s", spec.job_id, claim.attempt, name)

    def cancel(self, job_id: int) -> bool:
        """Stop the job where a live worker took its current attempt (the message is revoked and the
        worker's process running it killed); False where none did: the message is lost or waits."""
        db = self.context.store.db
        with db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.status != JobStatus.RUNNING or not job.worker:
                return False
            attempt, worker = job.attempts, job.worker
        if worker not in {w.name for w in live_workers(db, self.settings)}:
            return False
        self.start()
        self._app.control.revoke(task_id(job_id, attempt), terminate=True, signal="SIGKILL")
        return True

    def waiting(self, job_ids: Collection[int]) -> set[int]:
        """Jobs that wait at the broker for a worker holding their package set, however long that takes
        (:func:`awaiting_a_worker`). A job whose queue a live worker consumes but that nobody took past
        its limit was lost (the broker lost its message, or the node stopped between claiming and
        sending it): the watchdog retries it."""
        return set(awaiting_a_worker(self.context.store.db, self.settings, job_ids))

    def shutdown(self) -> None:
        """Jobs at the broker or on workers stay there: their outcomes are recorded when the node is
        back (a worker retries for a while), or the watchdog fails them."""
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None
