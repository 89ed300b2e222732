"""The embedded executor: jobs run in worker processes on this machine, one per slot.

Each slot is a thread of the node driving its own process: a job that crashes its process, runs past
its time limit (scaled to its series: :func:`node.jobs.store.time_limit`) or raises fails alone, and the
slot starts a fresh process. Processes are started with ``spawn`` (no fork of a threaded parent) when
the pool starts and again after a crash; each loads every model package the routes name before it
takes a job (so no job waits seconds for its model), and keeps them loaded between jobs.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from node import audit
from node.config import Settings, load_plugins
from node.jobs.executor import ExecutorContext, register_executor
from node.jobs.run import (
    JobOutput,
    PackageRef,
    Preloaded,
    Task,
    prefer_faster_runtime,
    preload,
    run_job,
    try_faster_runtime,
)
from node.jobs.store import Claim, JobFailed
from node.runtime.model import DEFAULT_BATCH, set_batch, set_threads
from node.runtime.package import ModelMissing, ModelRefused

log = logging.getLogger(__name__)

Work = Callable[[Task], JobOutput]


@dataclass(frozen=True)
class WorkerSetup:
    """What each worker process starts with."""

    torch_threads: int
    batch_images: int = DEFAULT_BATCH
    plugins: Sequence[str] = ()
    models_dir: str = ""
    packages: Sequence[PackageRef] = ()  # loaded before the first job (the routes' models)
    ready_seconds: float = 120.0  # to start and load them; past it the process is stopped
    runtime_cache: str = ""  # ONNX exports, tried while idle where ONNX Runtime may be faster; "": never


def pool_threads(configured: int, workers: int) -> int:
    """Torch threads in each pool process: ``configured``, or for 0 the cores but one, shared by the
    processes. Torch's own default, every core in every process, oversubscribes the CPU as soon as the
    node's own process receives, indexes or sends, or another pool process runs: an intra-op thread
    that lost its core holds the whole operation up. On 2 busy cores a chest radiograph's forward and
    backward pass took 0.5-1.3 s (median) with 2 threads against 0.11-0.16 s with 1."""
    if configured:
        return configured
    return max(1, ((os.cpu_count() or 1) - 1) // workers)


def runtime_cache(settings: Settings) -> str:
    """Where a job process keeps the ONNX exports it times against torch (node.runtime.fastest); ""
    where ``[jobs] onnx_runtime`` is "never"."""
    return str(settings.node.data_dir / "runtimes") if settings.jobs.onnx_runtime == "when_faster" else ""


def routed_packages(settings: Settings) -> list[PackageRef]:
    """Every model package the routes name, main and companions, each once, in route order."""
    refs = [(route.model, route.model_version) for route in settings.routes]
    refs += [(name, None) for route in settings.routes for name in route.models.values()]
    return list(dict.fromkeys(refs))


def _worker_main(conn: Connection, setup: WorkerSetup, work: Work) -> None:
    """A worker process: load the routes' models, say what it loaded, then run tasks until the parent
    closes the pipe."""
    set_threads(setup.torch_threads)
    set_batch(setup.batch_images)
    prefer_faster_runtime(setup.runtime_cache or None)
    load_plugins(setup.plugins)  # output writers a plug-in registers run here
    conn.send(("ready", preload(setup.models_dir, setup.packages)))
    while True:
        if not conn.poll(0) and (faster := try_faster_runtime()) is not None:  # idle: no job waits
            conn.send(("runtime", faster))
            continue
        try:
            task: Task = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", work(task)))
        except ModelRefused as exc:
            conn.send(("model_refused", str(exc)))
        except ModelMissing as exc:
            conn.send(("model_missing", str(exc)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


class WorkerSlot:
    """One worker process, started by :meth:`start` (or on first use) and again after a crash or a
    timeout; each start loads the routes' models before the slot takes a job, and hands what it loaded
    to ``on_ready``."""

    def __init__(
        self,
        setup: WorkerSetup,
        work: Work = run_job,
        on_ready: Callable[[list[Preloaded]], None] = lambda _loaded: None,
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._setup = setup
        self._work = work  # a module-level function, so the spawned process can import it
        self._on_ready = on_ready
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._interrupted = False  # by interrupt(), until clear_interrupt() before the next job

    def start(self) -> Connection:
        """The running worker's pipe, starting a worker (and waiting while it loads) if none runs."""
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self.close()
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=_worker_main, args=(child, self._setup, self._work), daemon=True, name="ainode-worker"
            )
            try:  # kept only once started: closing a process never started would raise, not fail the job
                process.start()
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            self._process, self._conn = process, parent
            self._on_ready(self._ready(parent))
        return self._conn

    def _ready(self, conn: Connection) -> list[Preloaded]:
        """What a worker just started says it loaded; a worker that dies or says nothing in time is
        stopped, and the job that needed it fails as it would have."""
        try:
            reply = conn.recv() if conn.poll(self._setup.ready_seconds) else None
        except (EOFError, OSError):
            self.close()
            raise JobFailed("crashed", "worker process died while loading its models") from None
        if reply is None:
            self.close()
            raise JobFailed("timeout", f"worker not ready after {self._setup.ready_seconds:.0f} s; stopped")
        _, report = reply
        loaded: list[Preloaded] = report
        return loaded

    def run(self, task: Task, timeout: float) -> JobOutput:
        conn = self.start()
        if self._interrupted:  # interrupted while its process was starting
            self.interrupt()
        deadline = time.monotonic() + timeout
        try:
            conn.send(task)
            while True:  # what the worker did while idle (a faster runtime) comes before the reply
                ready = conn.poll(max(0.0, deadline - time.monotonic()))
                reply = conn.recv() if ready else None
                if reply is None or reply[0] != "runtime":
                    break
                self._on_ready([reply[1]])
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

    def interrupt(self) -> None:
        """Stop the job running in this slot now, even one whose process is still starting; :meth:`run`
        then fails with ``crashed``."""
        self._interrupted = True
        process = self._process
        if process is not None and process.is_alive():
            process.kill()

    def clear_interrupt(self) -> None:
        self._interrupted = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=5)
            self._process = None


@register_executor("local")
class LocalPool:
    """``node.workers`` slots; a job submitted waits in memory until a slot is free (the dispatcher
    submits no more than :meth:`capacity`)."""

    def __init__(self, context: ExecutorContext, work: Work = run_job) -> None:
        self.context = context
        settings = context.settings
        setup = WorkerSetup(
            pool_threads(settings.node.torch_threads, settings.node.workers),
            settings.jobs.batch_images,
            settings.node.plugins,
            str(settings.node.models_dir),
            routed_packages(settings),
            settings.jobs.timeout_base_seconds,
            runtime_cache(settings),
        )
        self._slots = [WorkerSlot(setup, work, self._preloaded) for _ in range(settings.node.workers)]
        self._refused: set[tuple[str, str]] = set()  # (package, error) already audited
        self._queue: queue.Queue[Claim | None] = queue.Queue()
        self._lock = threading.Lock()
        self._outstanding: set[int] = set()  # submitted and not yet ended: waiting or running
        self._running: dict[int, WorkerSlot] = {}  # job id → the slot running it
        self._cancelled: set[int] = set()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(slot,), name=f"job-slot-{i}", daemon=True)
            for i, slot in enumerate(self._slots)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def capacity(self) -> int:
        with self._lock:
            return len(self._slots) - len(self._outstanding)

    def submit(self, claim: Claim) -> None:
        with self._lock:
            self._outstanding.add(claim.spec.job_id)
        self._queue.put(claim)

    def cancel(self, job_id: int) -> bool:
        with self._lock:
            if job_id not in self._outstanding:
                return False
            self._cancelled.add(job_id)
            slot = self._running.get(job_id)
            if slot is not None:
                slot.interrupt()
            return True

    def waiting(self, job_ids: Collection[int]) -> set[int]:
        """None: every slot runs every job."""
        return set()

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            for slot in self._slots:  # running a job, or still loading its models
                slot.interrupt()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        for slot in self._slots:
            slot.close()

    def _preloaded(self, loaded: list[Preloaded]) -> None:
        """Log what a worker loaded; a package it could not load is logged and audited (once per error
        while the node runs) and fails only the jobs that need it."""
        for package in loaded:
            if not package.error:
                log.info("worker loaded %s in %.1f s: %s", package.name, package.seconds, package.runtime)
                continue
            log.error("worker could not load model package %s: %s", package.name, package.error)
            with self._lock:
                new = (package.name, package.error) not in self._refused
                self._refused.add((package.name, package.error))
            if not new:
                continue
            try:
                audit.append(
                    self.context.store.db,
                    "model.load_failed",
                    outcome="failure",
                    package=package.name,
                    error=package.error.splitlines()[0],
                )
            except Exception:  # the database is away: the log has it; the worker still takes jobs
                log.exception("auditing the failed load of %s failed", package.name)

    def _loop(self, slot: WorkerSlot) -> None:
        if not self._stopping.is_set():
            try:  # load the models now, not when the first job comes
                slot.start()
            except Exception:  # the first job starts it again, and fails as it should if it cannot
                if not self._stopping.is_set():  # not merely stopped while loading
                    log.exception("starting a worker failed")
        while (claim := self._queue.get()) is not None:
            job_id = claim.spec.job_id
            with self._lock:
                stopping, cancelled = self._stopping.is_set(), job_id in self._cancelled
                if not (stopping or cancelled):
                    slot.clear_interrupt()
                    self._running[job_id] = slot
            try:
                if not (stopping or cancelled):
                    self._run(slot, claim)
                elif not cancelled:  # submitted, never started: not the job's fault (a cancelled job's
                    # canceller decides what becomes of it)
                    self.context.store.hand_back(job_id, "node stopping before the job started")
            except Exception:  # recording the outcome failed: the job stays running; the watchdog fails it
                log.exception("job %d: recording its outcome failed", job_id)
            finally:
                with self._lock:
                    self._running.pop(job_id, None)
                    self._cancelled.discard(job_id)
                    self._outstanding.discard(job_id)
            try:
                self.context.ended()
            except Exception:  # a wake-up that failed must not take the slot down
                log.exception("waking the node after job %d failed", job_id)

    def _run(self, slot: WorkerSlot, claim: Claim) -> None:
        store, job_id = self.context.store, claim.spec.job_id
        output: JobOutput | JobFailed
        try:
            output = slot.run(self.context.task(claim), claim.time_limit)
        except JobFailed as failure:
            output = failure
        except Exception as exc:  # e.g. the worker could not start
            slot.close()
            output = JobFailed("error", f"{type(exc).__name__}: {exc}")
        if job_id in self._cancelled:  # the canceller decides what becomes of it
            return
        if isinstance(output, JobFailed):
            if self._stopping.is_set():
                store.hand_back(job_id, "node stopping while the job was running")
            else:
                store.fail(job_id, output)
            return
        try:
            store.finish(job_id, output)
        except Exception as exc:  # results written but not recorded: run again rather than lose them
            log.exception("recording job %d failed", job_id)
            store.fail(job_id, JobFailed("error", f"recording results failed: {type(exc).__name__}"))
