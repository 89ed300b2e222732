"""An instance's header kept in the database as DICOM JSON (PS3.18 F.2), so that routing reads the
tags it matches on from there instead of from the file again.

Bulk data (pixel data, icons, large binary values) is left out; an element pydicom cannot convert is
skipped rather than losing the whole header.
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset

_LEFT_OUT = "ainode:left-out"  # marks bulk data while converting; such elements are then removed
_BULK = 1024  # bytes: binary values longer than this are bulk data


def to_json(ds: Dataset) -> dict[str, Any]:
    """The header of ``ds`` as DICOM JSON, without bulk data."""
    converted = ds.to_json_dict(
        bulk_data_threshold=_BULK, bulk_data_element_handler=lambda _: _LEFT_OUT, suppress_invalid_tags=True
    )
    return _without_bulk(converted)


def from_json(header: dict[str, Any]) -> Dataset:
    return Dataset.from_json(header)


def _without_bulk(elements: dict[str, Any]) -> dict[str, Any]:
    kept = {}
    for tag, element in elements.items():
        if element.get("BulkDataURI") == _LEFT_OUT:
            continue
        if element.get("vr") == "SQ" and "Value" in element:
            element = {**element, "Value": [_without_bulk(item) for item in element["Value"]]}
        kept[tag] = element
    return kept
