"""A Part 10 file's meta information (group 0002) encoded at the speed of the acknowledgement path.

pydicom's writer (``pynetdicom.dsutils.encode_file_meta``) costs about 0.4 ms for these seven short
elements, and every received instance needs them once (node.dicom.network writes them in front of
the data set as it arrives, node.ingest.accept checks the file begins with them). The usual meta —
every element a UID, an AE title, a short string or the version bytes, the required ones present —
is encoded here byte for byte as pydicom would (tests/test_ingest_speed.py compares the two); any
other goes to pydicom's writer, with its validation and its errors.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pydicom.dataset import FileMetaDataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import encode_file_meta

PREAMBLE = b"\x00" * 128 + b"DICM"  # what a Part 10 file begins with, before its meta information
_GROUP_LENGTH = 0x00020000
_PADDING = {"UI": b"\x00", "AE": b" ", "SH": b" ", "OB": b"\x00"}  # PS3.5 6.2: to an even length
# Present with a value, else pydicom's writer adds or refuses them (pydicom's validate_file_meta).
_REQUIRED = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012)
_VERSION_NAME = 0x00020013  # present, possibly empty, else pydicom adds its own


def encode(meta: FileMetaDataset) -> bytes:
    """``meta`` encoded (explicit VR little endian, its group length first and set in ``meta``), as
    ``encode_file_meta`` does; raises what it raises for a meta it refuses."""
    encoded = _encoded_plainly(meta)
    if encoded is None:
        return encode_file_meta(meta)
    meta.FileMetaInformationGroupLength = len(encoded)
    return _with_group_length(encoded)


def received(sop_class: str, sop_instance: str, syntax: str, titles: tuple[str, str, str]) -> bytes | None:
    """What :func:`encode` makes of the meta information pynetdicom builds for a received C-STORE
    (``pynetdicom.dsutils.create_file_meta``) with the AE titles added (source, sending, receiving), built
    without a pydicom dataset, which costs more than the encoding (the listener's fast path, node.dicom.
    store_fast_path, writes it for every instance); None where pydicom's writer must decide."""
    if not (sop_class and sop_instance and syntax):
        return None
    source, sending, receiving = titles
    encoded = _encoded_elements(
        [
            (0x00020001, "OB", b"\x00\x01"),
            (0x00020002, "UI", sop_class),
            (0x00020003, "UI", sop_instance),
            (0x00020010, "UI", syntax),
            (0x00020012, "UI", PYNETDICOM_IMPLEMENTATION_UID),
            (0x00020013, "SH", PYNETDICOM_IMPLEMENTATION_VERSION),
            (0x00020016, "AE", source),
            (0x00020017, "AE", sending),
            (0x00020018, "AE", receiving),
        ]
    )
    return None if encoded is None else _with_group_length(encoded)


def _with_group_length(encoded: bytes) -> bytes:
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(encoded)) + encoded


def _encoded_plainly(meta: FileMetaDataset) -> bytes | None:
    """The elements after the group length, or None where pydicom's writer must decide."""
    if _VERSION_NAME not in meta or any(tag not in meta or meta[tag].is_empty for tag in _REQUIRED):
        return None
    return _encoded_elements(
        (int(element.tag), element.VR, element.value) for element in meta if int(element.tag) != _GROUP_LENGTH
    )


def _encoded_elements(elements: Iterable[tuple[int, str, object]]) -> bytes | None:
    """(tag, VR, value) elements of group 0002 encoded, or None where pydicom's writer must decide."""
    parts = []
    for tag, vr, value in elements:
        if tag >> 16 != 0x0002 or vr not in _PADDING:
            return None
        if isinstance(value, str) and vr != "OB" and value.isascii():
            raw = value.encode("ascii")
        elif isinstance(value, bytes) and vr == "OB":
            raw = value
        else:
            return None
        if len(raw) % 2:
            raw += _PADDING[vr]
        if vr == "OB":
            parts.append(struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"OB", 0, len(raw)))
        elif len(raw) <= 0xFFFF:
            parts.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), len(raw)))
        else:
            return None
        parts.append(raw)
    return b"".join(parts)
