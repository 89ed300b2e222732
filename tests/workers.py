"""Job bodies that misbehave, for the worker-isolation tests (imported by spawned processes)."""

import os
import time

from node.jobs.run import JobOutput, Task
from node.runtime.identity import ModelIdentity
from node.runtime.package import ModelRefused


def crash(task: Task) -> JobOutput:
    os._exit(3)


def hang(task: Task) -> JobOutput:
    time.sleep(600)
    raise AssertionError("unreachable")


def fail(task: Task) -> JobOutput:
    raise ValueError(f"bad input for job {task.spec.job_id}")


def refuse(task: Task) -> JobOutput:
    raise ModelRefused("weights.pt: sha256 mismatch")


def pid(task: Task) -> JobOutput:
    raise RuntimeError(f"pid={os.getpid()}")


def nap(task: Task) -> JobOutput:
    """Sleeps as long as the job's ``sleep`` option says (a slow series), then gives an empty result."""
    time.sleep(float(task.spec.options.get("sleep", 0)))
    identity = ModelIdentity(task.spec.model, "1.0", "0" * 64, "test model")
    return JobOutput(identity, [], "napped", {"analysed": True})
