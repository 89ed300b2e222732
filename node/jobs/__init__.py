"""Jobs: the state machine in the database (:mod:`.store`), who runs them (:mod:`.executor`, with the
local process pool in :mod:`.local`, the Celery one in :mod:`.distributed`), and what one job does
(:mod:`.run`). Importing this package registers the built-in executors (Celery itself is imported
only when its executor starts)."""

from node.jobs import distributed, local
from node.jobs.executor import Executor, ExecutorContext, create_executor, dispatch, register_executor, watch
from node.jobs.store import Claim, JobFailed, JobStore

__all__ = [
    "Claim",
    "Executor",
    "ExecutorContext",
    "JobFailed",
    "JobStore",
    "create_executor",
    "dispatch",
    "distributed",
    "local",
    "register_executor",
    "watch",
]
