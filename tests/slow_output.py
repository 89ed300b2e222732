"""A test plug-in: an output writer that writes nothing and takes ``TEST_NAP_SECONDS`` (0 by
default) — a job long enough to kill its worker halfway (tests/test_distributed.py)."""

from __future__ import annotations

import os
import time

from pydicom import Dataset

from node.outputs import OutputContext, register_output


@register_output("nap", kind="NAP", series_number=9020, series_description="nothing: {task}")
def nap(context: OutputContext) -> list[Dataset]:
    time.sleep(float(os.environ.get("TEST_NAP_SECONDS", "0")))
    return []
