"""The embedded executor: jobs run in worker processes on this machine, one per slot.

Each slot is a thread of the node driving its own process: a job that crashes its process, runs past
its time limit (scaled to its series: :func:`node.jobs.store.time_limit`) or raises fails alone, and the
slot starts a fresh process. Processes are started with ``spawn`` (no fork of a threaded parent) and
keep their models loaded between jobs.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from node.config import load_plugins
from node.jobs.executor import ExecutorContext, register_executor
from node.jobs.run import JobOutput, Task, run_job
from node.jobs.store import Claim, JobFailed
from node.runtime.model import set_threads
from node.runtime.package import ModelMissing, ModelRefused

log = logging.getLogger(__name__)

Work = Callable[[Task], JobOutput]


def _worker_main(conn: Connection, torch_threads: int, plugins: Sequence[str], work: Work) -> None:
    """A worker process: run tasks until the parent closes the pipe."""
    set_threads(torch_threads)
    load_plugins(plugins)  # output writers a plug-in registers run here
    while True:
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
    """One worker process, started on first use and after a crash or a timeout."""

    def __init__(self, torch_threads: int, work: Work = run_job, plugins: Sequence[str] = ()) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._torch_threads = torch_threads
        self._plugins = list(plugins)
        self._work = work  # a module-level function, so the spawned process can import it
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._interrupted = False  # by interrupt(), until clear_interrupt() before the next job

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self.close()
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=_worker_main,
                args=(child, self._torch_threads, self._plugins, self._work),
                daemon=True,
                name="ainode-worker",
            )
            try:  # kept only once started: closing a process never started would raise, not fail the job
                process.start()
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            self._process, self._conn = process, parent
        return self._conn

    def run(self, task: Task, timeout: float) -> JobOutput:
        conn = self._ensure()
        if self._interrupted:  # interrupted while its process was starting
            self.interrupt()
        try:
            conn.send(task)
            ready = conn.poll(timeout)
            reply = conn.recv() if ready else None
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
        node = context.settings.node
        self._slots = [WorkerSlot(node.torch_threads, work, node.plugins) for _ in range(node.workers)]
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

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            for slot in self._running.values():
                slot.interrupt()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        for slot in self._slots:
            slot.close()

    def _loop(self, slot: WorkerSlot) -> None:
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
