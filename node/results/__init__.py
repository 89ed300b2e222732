"""DICOM result writers: Secondary Capture overlays and the TID 1500 Structured Report."""

from node.results.sc import secondary_captures
from node.results.sr import structured_report

__all__ = ["secondary_captures", "structured_report"]
