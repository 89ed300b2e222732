"""Who runs jobs: the :class:`Executor` protocol, the registry of executors, and the dispatcher.

The node claims queued jobs from the store (:mod:`node.jobs.store`) as long as the executor has room
and submits them; the executor runs them — in local worker processes (``local``, the embedded
default), or wherever another implementation sends them — and records each outcome through the store.
An executor registers itself by name with :func:`register_executor`; ``[jobs] executor`` chooses one.

Each claim carries its time limit, which the executor enforces. :func:`watch`, the watchdog, is the
backstop for what an executor cannot see: a job left running in the database that nobody runs any more
(its slot died, recording its outcome failed, the executor lost it), or one whose stop never came.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from node.config import Settings
from node.jobs.run import Task
from node.jobs.store import Claim, JobFailed, JobStore
from node.spool import Spool

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs claimed jobs. An executor whose jobs run on when the node stops (a broker keeps them, its
    workers are elsewhere) says so with a class attribute ``jobs_outlive_the_node = True``: a node that
    starts again then leaves the jobs its last run left running alone instead of queueing them again.
    Without it, they are queued again (the local pool's processes died with the node)."""

    def start(self) -> None: ...

    def capacity(self) -> int:
        """How many more jobs it takes now."""
        ...

    def submit(self, claim: Claim) -> None:
        """Run a claimed job; its outcome is recorded through the store (finish, fail or hand back)."""
        ...

    def cancel(self, job_id: int) -> bool:
        """Stop running a job if it runs here; returns whether it did (False: not here, or it cannot be
        stopped). Its outcome is not recorded: the caller decides it."""
        ...

    def waiting(self, job_ids: Collection[int]) -> set[int]:
        """Those of ``job_ids`` (running in the database, past their time limit) that are neither
        running nor lost but wait for a runner that can take them, such as a worker holding their
        model: the watchdog leaves them alone."""
        ...

    def shutdown(self) -> None:
        """Stop; jobs it had not finished are handed back to the store uncounted."""
        ...


@dataclass(frozen=True)
class ExecutorContext:
    """What an executor is built with."""

    settings: Settings
    store: JobStore
    spool: Spool  # where the claimed files lie, and where results go
    ended: Callable[[], None]  # to call after recording an outcome: wakes the dispatcher and the sender

    def task(self, claim: Claim) -> Task:
        """A claimed job to run on this machine: the spool's files, results into the spool, the
        configured model packages."""
        out_dir = self.spool.result_dir(claim.spec.job_id)
        return Task(claim.spec, claim.files, str(out_dir), str(self.settings.node.models_dir))


ExecutorFactory = Callable[[ExecutorContext], Executor]
_EXECUTORS: dict[str, ExecutorFactory] = {}


def register_executor(name: str) -> Callable[[ExecutorFactory], ExecutorFactory]:
    """Make ``factory`` (an Executor class, say) the executor ``name``: a decorator."""

    def add(factory: ExecutorFactory) -> ExecutorFactory:
        known = _EXECUTORS.get(name)
        if known is not None and known is not factory:
            raise ValueError(f"executor {name!r} is registered twice")
        _EXECUTORS[name] = factory
        return factory

    return add


def create_executor(context: ExecutorContext) -> Executor:
    name = context.settings.jobs.executor
    try:
        factory = _EXECUTORS[name]
    except KeyError:
        raise LookupError(f"jobs.executor: no executor {name!r}; known: {sorted(_EXECUTORS)}") from None
    return factory(context)


def dispatch(store: JobStore, executor: Executor) -> int:
    """Claim queued jobs while the executor has room, and submit them. Returns how many."""
    submitted = 0
    while executor.capacity() > 0:
        claim = store.claim()
        if claim is None:
            break
        try:
            executor.submit(claim)
        except Exception:  # the job must not stay running with nobody running it
            log.exception("submitting job %d failed", claim.spec.job_id)
            store.hand_back(claim.spec.job_id, "the executor did not take the job")
            break
        submitted += 1
    return submitted


def watch(store: JobStore, executor: Executor) -> int:
    """The watchdog: fail every job running past its time limit plus the grace, and stop it where it
    still runs. One the executor still ran has outrun its limit (a ``timeout``); one it did not run was
    lost (``lost``, retried like a crash); one that waits for a runner able to take it is left to wait.
    Returns how many it failed."""
    overdue = store.overdue()
    waiting = executor.waiting([job.job_id for job in overdue]) if overdue else set()
    overdue = [job for job in overdue if job.job_id not in waiting]
    for job in overdue:
        said = f"running {job.running:.0f} s, past its limit of {job.time_limit:.0f} s"
        if executor.cancel(job.job_id):
            store.fail(job.job_id, JobFailed("timeout", f"{said}; stopped by the watchdog"))
        else:
            store.fail(job.job_id, JobFailed("lost", f"{said}, and the executor was not running it"))
    return len(overdue)
