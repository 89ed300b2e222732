"""DICOM output writers: Secondary Capture overlays, the TID 1500 Structured Report, and whatever a
plug-in registers (see :mod:`node.outputs.registry`). Importing this package registers the built-ins."""

from node.outputs import sc, seg, sr
from node.outputs.registry import (
    OutputContext,
    check_output,
    output_writer,
    register_output,
    write_outputs,
)

__all__ = [
    "OutputContext",
    "check_output",
    "output_writer",
    "register_output",
    "sc",
    "seg",
    "sr",
    "write_outputs",
]
