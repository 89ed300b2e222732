"""What the node makes sure of in a data set before it answers Success, reading only what it needs.

The data set is walked element by element with every value skipped, not loaded, so memory stays flat
however large an instance is; a deflated data set is inflated as a stream, with a cap, never whole
(a few hundred kilobytes can inflate to gigabytes). The walk proves that every element lies within
the data set, that native pixel data holds every frame the header announces and that encapsulated
pixel data is well framed: a sender whose instance was cut short hears so at once and can send it
again, instead of the node acknowledging data that no job can read. The header (every element before
the pixel data) comes back parsed, with values over :data:`HEADER_VALUE_LIMIT` left out, and those
past :data:`HEADER_LIMIT` in all, since routes and the index only need the small ones.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from node.config import NodeSettings

HEADER_VALUE_LIMIT = 1024 * 1024  # a header element larger than this is left out of the parsed header
# The parsed header as a whole: what follows once it is this large is left out too, so that a data set of
# many elements just under the one limit is not held (three times over, while parsed) in memory.
HEADER_LIMIT = 4 * 1024 * 1024
_CHUNK = 1024 * 1024  # what is read or inflated at a time
# What is read at a time of a data set that is not deflated: a header's worth, so that the pixel data
# after it is mostly skipped by a seek, not read (on the acknowledgement path, for every instance).
_PLAIN_READ = 64 * 1024
_MAX_DEPTH = 32  # sequences nested deeper than this are not a real instance's
_META_LIMIT = 64 * 1024  # a file meta information group larger than this is not one
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_BYTES = {0x7FE00010: 0, 0x7FE00008: 4, 0x7FE00009: 8}  # Pixel Data (Bits Allocated), Float, Double
# A Part 10 file's first bytes up to its meta information group length's value: preamble, prefix, and
# (0002,0000) UL of length 4 (explicit VR little endian).
_OWN_META_START = b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


class Unreadable(ValueError):
    """A data set that is not well formed: the sender must not send it again as it is."""


class Incomplete(Unreadable):
    """A data set cut short: an element, the pixel data or the deflate stream ends early."""


class TooLarge(Unreadable):
    """An instance over the configured size, or a deflated one that inflates beyond its cap."""


class _Reader:
    """Forward-only reading of a data set from ``fp``'s position on, inflating it on the way when it is
    deflated. While ``capture`` is a bytearray, what is read is also appended to it, up to
    :data:`HEADER_VALUE_LIMIT`; past that it becomes None (the element is left out)."""

    def __init__(self, fp: BinaryIO, deflated: bool, inflated_limit: int) -> None:
        self._fp = fp
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._limit = inflated_limit
        self._produced = 0
        self._buffer = bytearray()
        self.capture: bytearray | None = None

    def _more(self) -> bytes:
        """The next piece of the data set; b"" at its end."""
        if self._inflater is None:
            return self._fp.read(_PLAIN_READ)
        while not self._inflater.eof:
            data = self._inflater.unconsumed_tail or self._fp.read(_CHUNK)
            # With all input given, what zlib still holds is a few bytes' worth: flush() is bounded.
            try:
                piece = self._inflater.decompress(data, _CHUNK) if data else self._inflater.flush()
            except zlib.error as exc:
                raise Unreadable(f"the deflate stream is damaged: {exc}") from None
            self._produced += len(piece)
            if self._produced > self._limit:
                raise TooLarge(f"the deflated data set inflates beyond {self._limit // 2**20} MB")
            if piece:
                return piece
            if not data and not self._inflater.eof:
                raise Incomplete("the deflated data set is cut short")
        return b""

    def available(self, size: int) -> int:
        """How many of the next ``size`` bytes there are (fewer only at the data set's end)."""
        while len(self._buffer) < size and (piece := self._more()):
            self._buffer += piece
        return min(len(self._buffer), size)

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            piece = self._more()
            if not piece:
                raise Incomplete("the data set ends inside an element")
            self._buffer += piece
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        if self.capture is not None:
            self.capture += data
            if len(self.capture) > HEADER_VALUE_LIMIT:
                self.capture = None
        return data

    def skip(self, size: int) -> None:
        if self.capture is not None or self._inflater is not None:
            while size > 0:
                size -= len(self.read(min(size, _CHUNK)))
            return
        held = min(size, len(self._buffer))  # dropped, not copied out: a pixel data value may be in it
        del self._buffer[:held]
        size -= held
        if not size:
            return
        here = self._fp.tell()
        end = self._fp.seek(0, 2)
        if here + size > end:
            raise Incomplete("the data set ends inside an element")
        self._fp.seek(here + size)


class _Walk:
    """One pass over a data set in a given encoding: its header bytes, and what its pixel data is."""

    def __init__(self, reader: _Reader, implicit: bool, little: bool, encapsulated: bool) -> None:
        self.reader = reader
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.encapsulated = encapsulated
        self.header = bytearray()  # every top-level element before the pixel data, as encoded
        self.pixel_tag: int | None = None
        self.pixel_length = 0  # native: the value's length; encapsulated: how many fragments

    def _head(self, implicit: bool) -> tuple[int, bytes, int]:
        """Tag, VR (b"" when implicit, or for an item or delimiter) and value length of the next element."""
        raw = self.reader.read(8)
        group, element = struct.unpack(self.order + "HH", raw[:4])
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            return tag, b"", struct.unpack(self.order + "L", raw[4:])[0]
        vr = raw[4:6]
        if not (vr.isalpha() and vr.isupper()):
            raise Unreadable(f"element ({group:04X},{element:04X}) has no valid VR")
        if vr in _LONG_VRS:
            return tag, vr, struct.unpack(self.order + "L", self.reader.read(4))[0]
        return tag, vr, struct.unpack(self.order + "H", raw[6:])[0]

    def _skip_value(self, tag: int, vr: bytes, length: int, implicit: bool, depth: int) -> None:
        if length != _UNDEFINED:
            self.reader.skip(length)
        elif tag == 0x7FE00010:  # an icon's, encapsulated (PS3.5 A.4)
            self._skip_fragments()
        elif vr in (b"SQ", b"UN") or implicit:  # UN of undefined length holds implicit VR items (PS3.5 6.2.2)
            self._skip_items(implicit or vr == b"UN", depth + 1)
        else:
            raise Unreadable(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has an undefined length")

    def _skip_items(self, implicit: bool, depth: int) -> None:
        """Skip a sequence of undefined length, up to and including its delimiter."""
        if depth > _MAX_DEPTH:
            raise Unreadable("sequences nested too deep")
        while True:
            tag, _, length = self._head(implicit)
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise Unreadable("a sequence holds something other than items")
            if length != _UNDEFINED:
                self.reader.skip(length)
                continue
            while (item := self._head(implicit))[0] != _ITEM_END:
                self._skip_value(*item, implicit, depth)

    def _skip_fragments(self) -> int:
        """Skip encapsulated pixel data up to its delimiter; how many fragments (after the offset
        table) it holds."""
        items = 0
        while True:
            tag, _, length = self._head(True)
            if tag == _SEQUENCE_END:
                return max(items - 1, 0)
            if tag != _ITEM or length == _UNDEFINED:
                raise Unreadable("encapsulated pixel data holds something other than fragments")
            self.reader.skip(length)
            items += 1

    def run(self) -> None:
        """Walk the whole data set: an element that does not fit in it raises Incomplete."""
        # After the pixel data, a tail too short for an element is padding, as pydicom reads it.
        while self.reader.available(8) >= (8 if self.pixel_tag is not None else 1):
            before_pixels = self.pixel_tag is None
            self.reader.capture = bytearray() if before_pixels else None
            tag, vr, length = self._head(self.implicit)
            if before_pixels and tag in _PIXEL_BYTES:
                self.reader.capture = None
                self.pixel_tag = tag
                if self.encapsulated and tag == 0x7FE00010:
                    if length != _UNDEFINED:
                        raise Unreadable("encapsulated pixel data has a defined length")
                    self.pixel_length = self._skip_fragments()
                elif length == _UNDEFINED:
                    raise Unreadable("native pixel data has an undefined length")
                else:
                    self.pixel_length = length
                    self.reader.skip(length)
                continue
            if length != _UNDEFINED and length > HEADER_VALUE_LIMIT:
                self.reader.capture = None
            self._skip_value(tag, vr, length, self.implicit, 0)
            captured = self.reader.capture
            if before_pixels and captured is not None and len(self.header) + len(captured) <= HEADER_LIMIT:
                self.header += captured
        self.reader.capture = None


def _count(header: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An IS or US value of the header; a value no reader could make a number of is refused here."""
    value = header.get(keyword, default)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        raise Unreadable(f"{keyword} {str(value)[:20]!r} is not a number") from None


def _check_pixels(walk: _Walk, header: Dataset) -> None:
    """Native pixel data must hold every frame the header announces; encapsulated, a fragment for
    each frame at least (each frame begins a fragment, PS3.5 A.4). Pixel data whose size the header
    does not say (no Rows, Columns or Bits Allocated) is left to the reader of the file."""
    if walk.pixel_tag is None:
        return
    frames = _count(header, "NumberOfFrames", 1) or 1
    if walk.encapsulated and walk.pixel_tag == 0x7FE00010:
        if walk.pixel_length < frames:
            raise Incomplete(
                f"encapsulated pixel data holds {walk.pixel_length} fragments for {frames} frames"
            )
        return
    rows, columns = _count(header, "Rows"), _count(header, "Columns")
    samples = _count(header, "SamplesPerPixel", 1) or 1
    if samples == 3 and str(header.get("PhotometricInterpretation", "")).endswith("_422"):
        samples = 2  # two pixels share one Cb and one Cr (PS3.3 C.7.6.3.1.2)
    bits = 8 * _PIXEL_BYTES[walk.pixel_tag] or _count(header, "BitsAllocated")
    if rows is None or columns is None or bits is None:
        return
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if walk.pixel_length < expected:
        raise Incomplete(f"pixel data holds {walk.pixel_length} of {expected} bytes")


def inspect(body: BinaryIO, meta: FileMetaDataset, node: NodeSettings) -> Dataset:
    """Check the data set from ``body``'s position to its end, encoded as ``meta`` says, and return its
    header (pixel data and values over :data:`HEADER_VALUE_LIMIT` left out) with ``meta`` as its
    file meta information. Raises :class:`Unreadable` (or a subclass) for what must be refused."""
    start = body.tell()
    size = body.seek(0, 2) - start
    body.seek(start)
    if size > node.max_instance_mb * 2**20:
        raise TooLarge(f"the data set is over {node.max_instance_mb} MB")
    syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    if not syntax.is_transfer_syntax:
        raise Unreadable(f"unknown transfer syntax {str(syntax)[:64]!r}")
    reader = _Reader(body, syntax.is_deflated, node.max_inflated_mb * 2**20)
    walk = _Walk(reader, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_encapsulated)
    walk.run()
    implicit = syntax.is_implicit_VR
    header = read_dataset(BytesIO(bytes(walk.header)), implicit, syntax.is_little_endian)
    _check_pixels(walk, header)
    parsed = FileDataset("", header, preamble=b"\x00" * 128, file_meta=meta)
    parsed.set_original_encoding(implicit, syntax.is_little_endian, header._character_set)
    return parsed


def read_meta(fp: BinaryIO) -> FileMetaDataset:
    """The file meta information of the Part 10 file ``fp``, which is left at its data set's start."""
    fp.seek(0)
    if len(fp.read(128)) != 128 or fp.read(4) != b"DICM":
        raise Unreadable("not a DICOM file: no preamble and DICM prefix")
    encoded = bytearray()
    while (head := fp.read(8))[:2] == b"\x02\x00" and len(head) == 8:  # group 0002, explicit VR LE
        long = head[4:6] in _LONG_VRS
        extra = fp.read(4) if long else b""
        length = struct.unpack("<L", extra)[0] if long else struct.unpack("<H", head[6:])[0]
        if len(encoded) + length > _META_LIMIT:
            raise Unreadable("the file meta information is malformed")
        value = fp.read(length)
        if len(extra) + len(value) != 4 * long + length:
            raise Incomplete("the file ends inside its meta information")
        encoded += head + extra + value
    fp.seek(-len(head), 1)
    try:  # pydicom converts values as they are read: an unknown VR, a bad length for one
        meta = FileMetaDataset(read_dataset(BytesIO(bytes(encoded)), False, True))
        for element in meta:
            element.value  # noqa: B018 - converted here, where it can be refused
    except Exception as exc:
        raise Unreadable(f"the file meta information is malformed: {type(exc).__name__}") from None
    return meta


def skip_own_meta(fp: BinaryIO) -> bool:
    """Whether ``fp``, a Part 10 file the node wrote itself, begins with a meta information group
    length; it is then left at its data set's start, found by that length without a parse (the
    listener's files, on the acknowledgement path). Else nothing is said of the file."""
    fp.seek(0)
    head = fp.read(len(_OWN_META_START) + 4)
    if len(head) != len(_OWN_META_START) + 4 or not head.startswith(_OWN_META_START):
        return False
    fp.seek(len(head) + struct.unpack("<L", head[-4:])[0])
    return True


def read_header(path: Path, node: NodeSettings) -> Dataset:
    """The checked header of the spool file ``path`` (see :func:`inspect`): what reconciliation reads,
    so that a deflated file is never inflated whole."""
    with path.open("rb") as fp:
        return inspect(fp, read_meta(fp), node)
