"""A throw-away executor, registered from its own module as a plug-in would be: jobs run one at a time
on a thread of the node's own process (no worker processes), outcomes recorded through the store."""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection

from node.jobs import Claim, ExecutorContext, JobFailed, register_executor
from node.jobs.run import run_job

ran_on: list[str] = []  # the threads that ran jobs, for the test to see who did


@register_executor("inline")
class InlineExecutor:
    def __init__(self, context: ExecutorContext) -> None:
        self.context = context
        self._claims: queue.Queue[Claim | None] = queue.Queue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inline-executor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def capacity(self) -> int:
        return 0 if self._busy.is_set() or not self._claims.empty() else 1

    def submit(self, claim: Claim) -> None:
        self._busy.set()
        self._claims.put(claim)

    def cancel(self, job_id: int) -> bool:
        """A job on this thread cannot be stopped halfway; it simply finishes."""
        return False

    def waiting(self, job_ids: Collection[int]) -> set[int]:
        return set()

    def shutdown(self) -> None:
        self._claims.put(None)
        self._thread.join(timeout=120)

    def _loop(self) -> None:
        while (claim := self._claims.get()) is not None:
            job_id = claim.spec.job_id
            ran_on.append(threading.current_thread().name)
            try:
                output = run_job(self.context.task(claim))
            except Exception as exc:
                self.context.store.fail(job_id, JobFailed("error", f"{type(exc).__name__}: {exc}"))
            else:
                self.context.store.finish(job_id, output)
            self._busy.clear()
            self.context.ended()
