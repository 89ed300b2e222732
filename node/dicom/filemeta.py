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

from pydicom.dataset import FileMetaDataset
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
    return struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(encoded)) + encoded


def _encoded_plainly(meta: FileMetaDataset) -> bytes | None:
    """The elements after the group length, or None where pydicom's writer must decide."""
    if _VERSION_NAME not in meta or any(tag not in meta or meta[tag].is_empty for tag in _REQUIRED):
        return None
    parts = []
    for element in meta:
        tag, vr, value = int(element.tag), element.VR, element.value
        if tag == _GROUP_LENGTH:
            continue
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
