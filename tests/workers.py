"""Job bodies that misbehave, for the worker-isolation tests (imported by spawned processes)."""

import os
import time

from node.pipeline import JobOutput, JobSpec
from node.runtime.package import ModelRefused


def crash(spec: JobSpec) -> JobOutput:
    os._exit(3)


def hang(spec: JobSpec) -> JobOutput:
    time.sleep(600)
    raise AssertionError("unreachable")


def fail(spec: JobSpec) -> JobOutput:
    raise ValueError(f"bad input for job {spec.job_id}")


def refuse(spec: JobSpec) -> JobOutput:
    raise ModelRefused("weights.pt: sha256 mismatch")


def pid(spec: JobSpec) -> JobOutput:
    raise RuntimeError(f"pid={os.getpid()}")
