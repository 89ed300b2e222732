"""An instance's header kept in the database, so that routing reads the tags it matches on from there
instead of from the file again: the data set as received, pixel data left out, in its own transfer
syntax — every value exactly as the sender wrote it."""

from __future__ import annotations

import logging
from io import BytesIO

from pydicom import Dataset, dcmread

log = logging.getLogger(__name__)


def encode(header: Dataset) -> bytes | None:
    """``header`` (read without its pixel data) as a DICOM file; None when pydicom cannot write it
    back, and routing then reads the instance's file instead."""
    buffer = BytesIO()
    try:
        header.save_as(buffer, enforce_file_format=True)
    except Exception as exc:
        log.warning("a header could not be kept for routing: %s", type(exc).__name__)
        return None
    return buffer.getvalue()


def decode(stored: bytes) -> Dataset:
    return dcmread(BytesIO(stored))
