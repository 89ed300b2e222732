"""A test plug-in: an output writer "crash" that ends its process at once (``os._exit``), as a job that
kills the worker running it (a segfault in a native library, the kernel's OOM killer) —
tests/test_distributed_faults.py."""

from __future__ import annotations

import os

from pydicom import Dataset

from node.outputs import OutputContext, register_output


@register_output("crash", kind="CRASH", series_number=9021, series_description="nothing: {task}")
def crash(context: OutputContext) -> list[Dataset]:
    os._exit(70)
