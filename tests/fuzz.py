"""Seeded generators of malformed DICOM input for the bounded fuzzing run of issue 11 (Proof): upper-layer
PDUs (PS3.8) and C-STORE data sets (PS3.5), and a raw-socket client that plays them against a node.

Every case starts from a VALID message and breaks it in one to three named ways, so it gets past the
first check and reaches the code behind it; random bytes alone die at the first length field. A case is
a function of its seed alone: a finding is replayed with ``pdu_case(seed)`` or ``dataset_case(seed)``.
"""

from __future__ import annotations

import random
import socket
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    UltrasoundImageStorage,
    generate_uid,
)

# --- upper-layer PDUs (PS3.8 9.3) -----------------------------------------------------------------------

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
TERMINAL = {"A-ASSOCIATE-RJ", "A-ABORT", "A-RELEASE-RP"}  # the node has nothing more to say after these
RELEASE_RQ = b"\x05\x00" + struct.pack(">L", 4) + b"\x00" * 4
ABORT = b"\x07\x00" + struct.pack(">L", 4) + b"\x00\x00\x00\x00"
COMMAND, LAST = 0x01, 0x02  # message control header bits of a PDV


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body) & 0xFFFF) + body


def uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii")


def presentation_context(context_id: int, abstract: str, transfer_syntaxes: Sequence[str]) -> bytes:
    body = bytes([context_id, 0, 0, 0]) + item(0x30, uid_bytes(abstract))
    return item(0x20, body + b"".join(item(0x40, uid_bytes(ts)) for ts in transfer_syntaxes))


def user_information(max_pdu: int = 16384, implementation: bytes = b"1.2.826.0.1.3680043.9.7433.1") -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, implementation))


def associate_rq(
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    called: bytes = b"AINODE",
    calling: bytes = b"FUZZER",
    version: int = 1,
    user_info: bytes | None = None,
    application_context: bytes = APPLICATION_CONTEXT,
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``(context id, abstract syntax, transfer syntaxes)`` each."""
    body = struct.pack(">HH", version, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + b"\x00" * 32
    body += item(0x10, application_context)
    body += b"".join(presentation_context(*context) for context in contexts)
    body += user_information() if user_info is None else user_info
    return pdu(0x01, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF of PDVs, each ``(presentation context id, message control header, fragment)``."""
    return pdu(
        0x04,
        b"".join(
            struct.pack(">LBB", len(data) + 2, context, control) + data for context, control, data in pdvs
        ),
    )


def accepted_contexts(ac: bytes) -> dict[int, str]:
    """Context id → transfer syntax of each presentation context an A-ASSOCIATE-AC accepted."""
    accepted: dict[int, str] = {}
    offset = 6 + 68
    while offset + 4 <= len(ac):
        item_type, length = ac[offset], struct.unpack(">H", ac[offset + 2 : offset + 4])[0]
        body = ac[offset + 4 : offset + 4 + length]
        if item_type == 0x21 and len(body) >= 8 and body[2] == 0:
            accepted[body[0]] = body[8:].decode("ascii", "replace").rstrip("\x00 ")
        offset += 4 + length
    return accepted


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set, Implicit VR Little Endian as PS3.7 requires."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    return command_bytes(command)


def command_bytes(command: Dataset) -> bytes:
    body = encode(command, implicit=True, little=True)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def command_status(fragment: bytes) -> int | None:
    """The Status (0000,0900) of a response command set, or None where it has none."""
    try:
        command = read_dataset(BytesIO(fragment), is_implicit_VR=True, is_little_endian=True)
        return int(command.Status)
    except Exception:  # a reply the fuzzer cannot read is recorded as such, not raised
        return None


# --- data sets (PS3.5 7) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    transfer_syntax: str
    implicit: bool = False
    little: bool = True
    deflated: bool = False


ENCODINGS = {
    "explicit": Encoding(ExplicitVRLittleEndian),
    "implicit": Encoding(ImplicitVRLittleEndian, implicit=True),
    "big-endian": Encoding(ExplicitVRBigEndian, little=False),
    "deflated": Encoding(DeflatedExplicitVRLittleEndian, deflated=True),
    "jpeg": Encoding(JPEGBaseline8Bit),
    "rle": Encoding(RLELossless),
}


def encode(ds: Dataset, implicit: bool, little: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflate(data: bytes) -> bytes:
    """Deflated Explicit VR Little Endian: a raw deflate stream, no zlib header (PS3.5 A.5)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def base_dataset(rng: random.Random, kind: str) -> Dataset:
    """A small valid instance with fresh UIDs: ``kind`` picks the SOP class and how pixels are held."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = {"dx": DigitalXRayImageStorageForPresentation, "jpeg": UltrasoundImageStorage}.get(
        kind, UltrasoundImageStorage if kind == "rle" else CTImageStorage
    )
    entropy = [str(rng.getrandbits(64))]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "sop"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[*entropy, "frame"])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "FUZZ^CASE", f"FZ{rng.randrange(10**6)}", "19700101"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "A1"
    ds.Modality = {"dx": "DX", "jpeg": "US", "rle": "US"}.get(kind, "CT")
    ds.SeriesNumber, ds.InstanceNumber = rng.randrange(1, 100), rng.randrange(1, 500)
    ds.SeriesDescription, ds.StudyDescription = "FUZZ SERIES", "FUZZ STUDY"
    reference = Dataset()
    reference.ReferencedSOPClassUID = CTImageStorage
    reference.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "reference"])
    ds.ReferencedImageSequence = DicomSequence([reference])
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if kind in ("jpeg", "rle"):
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.NumberOfFrames = 2
        frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(8, 40))) for _ in range(2)]
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.PixelData = bytes(rng.randrange(256) for _ in range(8 * 8 * 2))
        ds["PixelData"].VR = "OW"
    return ds


@dataclass(frozen=True)
class Element:
    """Where one data element lies in encoded bytes (offsets from the data set's start)."""

    offset: int
    tag: int
    vr: str
    length_at: int
    length_size: int
    value_at: int
    length: int  # 0xFFFFFFFF: undefined
    end: int
    depth: int


UNDEFINED = 0xFFFFFFFF
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def walk(data: bytes, encoding: Encoding) -> list[Element]:
    """Every element of an encoded data set, nested ones included. Meant for the generator's valid bases;
    on bytes an earlier mutation broke it still ends (every step moves forward, each byte is read once),
    and a wrong map there only makes the next mutation stranger."""
    found: list[Element] = []
    _walk(data, 0, len(data), encoding, 0, found)
    return found


def _tag(data: bytes, offset: int, little: bool) -> int:
    group, element = struct.unpack("<HH" if little else ">HH", data[offset : offset + 4])
    return int(group << 16 | element)


def _walk(data: bytes, offset: int, end: int, encoding: Encoding, depth: int, found: list[Element]) -> int:
    """Read elements from ``offset`` until ``end`` or a delimiter; returns where it stopped."""
    order = "<" if encoding.little else ">"
    while offset < end:
        tag = _tag(data, offset, encoding.little)
        if tag in (ITEM_END, SEQUENCE_END):
            return offset
        if encoding.implicit:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
            length_at, length_size = offset + 4, 4
        else:
            vr = data[offset + 4 : offset + 6].decode("ascii")
            length_at, length_size = (offset + 8, 4) if vr in LONG_VRS else (offset + 6, 2)
        length = struct.unpack(
            order + ("L" if length_size == 4 else "H"), data[length_at : length_at + length_size]
        )[0]
        value_at = length_at + length_size
        element_end = value_at + length
        if length == UNDEFINED or vr == "SQ":  # a sequence's items, or encapsulated pixel data's fragments
            nested = found if vr == "SQ" else None
            stop = _items(
                data, value_at, end if length == UNDEFINED else element_end, encoding, depth + 1, nested
            )
            element_end = stop + 8 if length == UNDEFINED else element_end
        found.append(Element(offset, tag, vr, length_at, length_size, value_at, length, element_end, depth))
        offset = element_end
    return offset


def _items(
    data: bytes, offset: int, end: int, encoding: Encoding, depth: int, found: list[Element] | None
) -> int:
    """Read items until ``end`` or the sequence delimiter (whose offset it returns); the elements of
    a sequence's items go to ``found``, fragments of pixel data nowhere."""
    order = "<" if encoding.little else ">"
    while offset + 8 <= end:
        tag = _tag(data, offset, encoding.little)
        (length,) = struct.unpack(order + "L", data[offset + 4 : offset + 8])
        if tag == SEQUENCE_END:
            return offset
        if found is not None and length == UNDEFINED:
            offset = _walk(data, offset + 8, end, encoding, depth, found) + 8
        elif found is not None:
            _walk(data, offset + 8, offset + 8 + length, encoding, depth, found)
            offset += 8 + length
        else:
            offset += 8 + (0 if length == UNDEFINED else length)
    return offset


@dataclass(frozen=True)
class DatasetCase:
    """One C-STORE to send: the data set bytes as they go on the wire, and what the request announces."""

    seed: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    mutations: tuple[str, ...] = field(default=())

    @property
    def request_readable(self) -> bool:
        """Whether pynetdicom can read the C-STORE request as one: an Affected SOP Instance UID that is
        there and no longer than a UI value may be (64). Else the request has no status to get."""
        return 0 < len(self.sop_instance_uid) <= 64

    def meta(self) -> FileMetaDataset:
        """The meta information a receiver builds from the request (what Ingest.accept is given)."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(self.sop_class_uid)
        meta.MediaStorageSOPInstanceUID = UID(self.sop_instance_uid)
        meta.TransferSyntaxUID = UID(self.transfer_syntax)
        return meta


# What a broken value may be: empty, a non-UID, path escapes, NUL, escape sequences, over-long text.
BAD_UIDS = [
    b"",
    b"1.2.3.",
    b"1..2",
    b"01.2",
    b"../../../etc/passwd",
    b"1.2\x00.3",
    b"1." * 40 + b"1",
    b"\xff\xfe",
    b" 1.2.3",
    b"1.2.840.10008.5.1.4.1.1.2\x00",
]
BAD_VALUES = [
    b"",
    b"\x00" * 7,
    b"\x1b$)C\x1b$)C\xff\xff",
    b"\xc3\x28\xed\xa0\x80",
    b"A" * 4099,
    b"-1e999",
    b"NaN\\inf\\",
    b"\\\\\\\\",
    b"\x00\xff" * 64,
]
VR_SWAPS = ["SQ", "UN", "OB", "OW", "UT", "US", "FD", "AT", "PN", "DA", "XX", "\x00\x00", "ob"]


class Mutator:
    """Breaks one encoded data set; each method is one named way and returns the new bytes."""

    def __init__(self, rng: random.Random, data: bytes, encoding: Encoding) -> None:
        self.rng = rng
        self.data = data
        self.encoding = encoding
        self.order = "<" if encoding.little else ">"
        self.elements = walk(data, encoding)

    def pick(self, predicate: Callable[[Element], bool] = lambda e: True) -> Element | None:
        choices = [e for e in self.elements if predicate(e)]
        return self.rng.choice(choices) if choices else None

    def with_length(self, element: Element, length: int) -> bytes:
        size = element.length_size
        packed = struct.pack(
            self.order + ("L" if size == 4 else "H"), length & (0xFFFFFFFF if size == 4 else 0xFFFF)
        )
        return self.data[: element.length_at] + packed + self.data[element.length_at + size :]

    def with_value(self, element: Element, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        if element.length_size == 2 and len(value) > 0xFFFF:
            value = value[:0xFFFE]
        data = self.with_length(element, len(value))
        return data[: element.value_at] + value + data[element.end :]

    def length_huge(self) -> bytes:
        element = self.pick(lambda e: e.length != UNDEFINED)
        assert element is not None
        big = (
            [0xFFFFFFFE, 0x7FFFFFFF, 0x10000000, len(self.data) * 4] if element.length_size == 4 else [0xFFFE]
        )
        return self.with_length(element, self.rng.choice(big))

    def length_off(self) -> bytes:
        element = self.pick(lambda e: e.length not in (UNDEFINED, 0))
        assert element is not None
        return self.with_length(element, max(0, element.length + self.rng.choice([-3, -2, -1, 1, 2, 7, 64])))

    def length_undefined(self) -> bytes:
        element = self.pick(lambda e: e.length != UNDEFINED)
        assert element is not None
        return self.with_length(element, UNDEFINED)

    def wrong_vr(self) -> bytes:
        assert not self.encoding.implicit, "no VR to get wrong"
        element = self.pick()
        assert element is not None
        vr = self.rng.choice(VR_SWAPS).encode("latin-1")
        return self.data[: element.offset + 4] + vr + self.data[element.offset + 6 :]

    def bad_uid(self) -> bytes:
        element = self.pick(lambda e: e.vr == "UI" and e.depth == 0) or self.pick(lambda e: e.vr == "UI")
        assert element is not None
        return self.with_value(element, self.rng.choice(BAD_UIDS))

    def bad_value(self) -> bytes:
        element = self.pick(lambda e: e.vr not in ("SQ", "OB", "OW") and e.length != UNDEFINED)
        assert element is not None
        return self.with_value(element, self.rng.choice(BAD_VALUES))

    def bad_charset(self) -> bytes:
        data = self.data
        name = self.pick(lambda e: e.tag == 0x00100010)
        if name is not None:
            data = self.with_value(name, self.rng.choice(BAD_VALUES[2:4]) + b"^\x1b(J\x8e")
        charset = next(e for e in self.elements if e.tag == 0x00080005)
        value = self.rng.choice(
            [b"ISO 2022 IR 999", b"\\\\ISO 2022 IR 87", b"\x00\x00", b"ISO_IR 192\\GB18030"]
        )
        self.data = data  # the name lies after the character set: its offset still holds
        return self.with_value(charset, value)

    def remove(self) -> bytes:
        element = self.pick(lambda e: e.depth == 0)
        assert element is not None
        return self.data[: element.offset] + self.data[element.end :]

    def duplicate(self) -> bytes:
        element = self.pick(lambda e: e.depth == 0)
        assert element is not None
        copy = self.data[element.offset : element.end]
        at = self.rng.choice(self.elements).offset
        return self.data[:at] + copy + self.data[at:]

    def deep_sequence(self) -> bytes:
        """A sequence nested deeper than any sense (undefined lengths: no length to check up front)."""
        depth = self.rng.choice([40, 400, 1200, 5000])
        tag = struct.pack(self.order + "HH", 0x0040, 0xA730)
        sequence = (
            tag
            + (b"" if self.encoding.implicit else b"SQ\x00\x00")
            + struct.pack(self.order + "L", UNDEFINED)
        )
        item_start = struct.pack(self.order + "HHL", 0xFFFE, 0xE000, UNDEFINED)
        item_end = struct.pack(self.order + "HHL", 0xFFFE, 0xE00D, 0)
        sequence_end = struct.pack(self.order + "HHL", 0xFFFE, 0xE0DD, 0)
        nested = (sequence + item_start) * depth + (item_end + sequence_end) * depth
        at = next(e.offset for e in self.elements if e.tag > 0x0040A730 and e.depth == 0)
        return self.data[:at] + nested + self.data[at:]

    def huge_private(self) -> bytes:
        """A private element announcing far more than the data set holds."""
        if self.encoding.implicit:
            header = struct.pack(self.order + "HHL", 0x0009, 0x1010, 0x7FFFFFF0)
        else:
            header = (
                struct.pack(self.order + "HH", 0x0009, 0x1010)
                + b"OB\x00\x00"
                + struct.pack(self.order + "L", 0x7FFFFFF0)
            )
        at = next(e.offset for e in self.elements if e.tag > 0x00091010 and e.depth == 0)
        return self.data[:at] + header + self.rng.randbytes(self.rng.randrange(0, 64)) + self.data[at:]

    def bad_fragments(self) -> bytes:
        """Encapsulated pixel data framed wrongly: an item tag that is not one, a fragment longer than
        the file, or no sequence delimiter (PS3.5 A.4)."""
        pixels = self.pick(lambda e: e.tag == 0x7FE00010)
        assert pixels is not None
        if pixels.length != UNDEFINED:
            return self.with_value(pixels, self.rng.randbytes(self.rng.randrange(0, 40)))
        items = pixels.value_at
        how = self.rng.choice(["tag", "length", "no-delimiter", "odd", "nested"])
        if how == "tag":
            return self.data[:items] + b"\xfe\xff\x0d\xe0" + self.data[items + 4 :]
        if how == "length":
            fragment = items + 8 + struct.unpack("<L", self.data[items + 4 : items + 8])[0]
            return self.data[: fragment + 4] + struct.pack("<L", 0x7FFFFFF0) + self.data[fragment + 8 :]
        if how == "no-delimiter":
            return self.data[: pixels.end - 8]
        if how == "odd":
            return self.data[: items + 4] + struct.pack("<L", 3) + self.data[items + 8 :]
        return self.data[:items] + struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED) + self.data[items:]


STRUCTURAL = [
    "length_huge",
    "length_off",
    "length_undefined",
    "wrong_vr",
    "bad_uid",
    "bad_value",
    "bad_charset",
    "remove",
    "duplicate",
    "deep_sequence",
    "huge_private",
]


def flip(rng: random.Random, data: bytes) -> bytes:
    changed = bytearray(data)
    for _ in range(rng.randrange(1, 9) if changed else 0):
        changed[rng.randrange(len(changed))] = rng.randrange(256)
    return bytes(changed)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def tail(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randrange(1, 300))


def empty(rng: random.Random, data: bytes) -> bytes:
    return b"" if rng.random() < 0.5 else b"\x00" * rng.randrange(1, 12)


# Last, on the bytes as the others left them: they need no element to hold on to.
FINAL: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "flip": flip,
    "truncate": truncate,
    "tail": tail,
    "empty": empty,
}
STREAM = ["deflate_truncated", "deflate_garbage", "deflate_bomb", "deflate_not_deflated", "wrong_encoding"]


def dataset_case(seed: int) -> DatasetCase:
    """The case numbered ``seed``: a valid base, then one to three mutations (sometimes none, so the
    run also shows valid instances stored among the broken ones)."""
    rng = random.Random(seed)
    kind = rng.choice(["explicit", "explicit", "implicit", "big-endian", "deflated", "jpeg", "rle"])
    encoding = ENCODINGS[kind]
    ds = base_dataset(rng, kind if kind in ("jpeg", "rle") else rng.choice(["ct", "dx"]))
    data = encode(ds, encoding.implicit, encoding.little)
    transfer_syntax = encoding.transfer_syntax
    mutations: list[str] = []
    draw = rng.random()
    if 0.05 <= draw < 0.12 or (0.05 <= draw < 0.2 and encoding.deflated):
        mutations.append(rng.choice(STREAM))
        transfer_syntax, data = _stream(rng, mutations[0], ds, encoding)
    else:
        if draw >= 0.05:  # else left valid
            data = _mutate(rng, data, encoding, kind, mutations)
        if encoding.deflated:
            data = deflate(data)
    announced = str(ds.SOPInstanceUID)
    if rng.random() < 0.05:  # the request names another instance, or no valid one
        mutations.append("announced_uid")
        other = generate_uid(entropy_srcs=[str(rng.getrandbits(64))])
        announced = rng.choice([other, *(uid.decode("latin-1") for uid in BAD_UIDS)])
    return DatasetCase(
        seed=seed,
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=announced,
        transfer_syntax=transfer_syntax,
        data=data,
        mutations=tuple(mutations),
    )


def _mutate(rng: random.Random, data: bytes, encoding: Encoding, kind: str, applied: list[str]) -> bytes:
    """One to three structural mutations, then perhaps one on the bytes; their names go to ``applied``."""
    fragments = ["bad_fragments"] * 3 if kind in ("jpeg", "rle") else []
    names = rng.sample(STRUCTURAL + fragments, rng.choice([1, 1, 2, 3]))
    names.sort(key=lambda n: n in ("deep_sequence", "huge_private"))  # those two insert: last
    for name in names:
        try:
            data = getattr(Mutator(rng, data, encoding), name)()
        except (AssertionError, StopIteration, struct.error, UnicodeDecodeError, IndexError, RecursionError):
            continue  # an earlier mutation left nothing this one can hold on to: one fewer
        applied.append(name)
    if rng.random() < 0.4:
        name = rng.choice(sorted(FINAL))
        data = FINAL[name](rng, data)
        applied.append(name)
    return data


def _stream(rng: random.Random, how: str, ds: Dataset, encoding: Encoding) -> tuple[str, bytes]:
    """The transfer syntax announced and the bytes sent for a stream that is not what it says."""
    if how == "wrong_encoding" and ds["PixelData"].is_undefined_length:  # encapsulated, announced native
        return ExplicitVRLittleEndian, encode(ds, False, True)
    if how == "wrong_encoding":  # announced one way, encoded another
        little = encoding.little if encoding.implicit else rng.random() < 0.5
        return encoding.transfer_syntax, encode(ds, not encoding.implicit, little)
    if how == "deflate_truncated":
        return DeflatedExplicitVRLittleEndian, deflate(encode(ds, False, True))[: rng.randrange(1, 200)]
    if how == "deflate_garbage":
        return DeflatedExplicitVRLittleEndian, rng.randbytes(rng.randrange(1, 2000))
    if how == "deflate_not_deflated":
        return DeflatedExplicitVRLittleEndian, encode(ds, False, True)
    # A bomb: a few kB that inflate to tens of MB (issue 11, fault 6).
    ds.add_new(0x00090010, "LO", "FUZZ")
    ds.add_new(0x00091010, "OB", bytes(rng.choice([8, 32, 64]) << 20))
    return DeflatedExplicitVRLittleEndian, deflate(encode(ds, False, True))


# --- PDU cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One thing the client does: ``send`` bytes, ``expect`` one PDU back, ``pause``, ``trickle`` bytes
    one at a time, or ``close`` the socket (``rst``: with a reset, as a crashed sender's kernel does)."""

    action: str
    data: bytes = b""
    seconds: float = 0.0
    rst: bool = False


def send(data: bytes) -> Step:
    return Step("send", data)


EXPECT = Step("expect")


@dataclass(frozen=True)
class PduCase:
    seed: int
    kind: str
    steps: tuple[Step, ...]


STORAGE_CONTEXTS = [
    (1, VERIFICATION, [ImplicitVRLittleEndian]),
    (3, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
]


def _valid_rq() -> bytes:
    return associate_rq(STORAGE_CONTEXTS)


def _store_pdus(rng: random.Random, context_id: int = 3) -> list[bytes]:
    """A whole C-STORE of a small CT instance as P-DATA PDUs: the command, then the data set in
    fragments."""
    ds = base_dataset(rng, "ct")
    ds_bytes = encode(ds, False, True)
    fragments = [ds_bytes[i : i + 256] for i in range(0, len(ds_bytes), 256)]
    command = c_store_rq(rng.randrange(1, 65535), CTImageStorage, str(ds.SOPInstanceUID))
    pdus = [p_data([(context_id, COMMAND | LAST, command)])]
    pdus += [
        p_data([(context_id, LAST if i == len(fragments) - 1 else 0, f)]) for i, f in enumerate(fragments)
    ]
    return pdus


def _rq_mutations(rng: random.Random) -> tuple[str, bytes]:
    """A broken A-ASSOCIATE-RQ, and the name of how it is broken."""
    rq = bytearray(_valid_rq())
    how = rng.choice(
        [
            "pdu-length-short",
            "pdu-length-long",
            "item-length",
            "unknown-item",
            "oversize-item",
            "version",
            "bad-ae",
            "application-context",
            "no-contexts",
            "context-ids",
            "max-pdu",
            "user-info",
            "flip",
            "many-contexts",
        ]
    )
    if how == "pdu-length-short":
        rq[2:6] = struct.pack(">L", rng.randrange(0, len(rq) - 6))
    elif how == "pdu-length-long":
        rq[2:6] = struct.pack(">L", len(rq) - 6 + rng.choice([1, 100, 70000]))
    elif how == "item-length":
        items = [
            i
            for i in range(74, len(rq) - 4)
            if rq[i] in (0x10, 0x20, 0x30, 0x40, 0x50, 0x51, 0x52) and rq[i + 1] == 0
        ]
        at = rng.choice(items)
        rq[at + 2 : at + 4] = struct.pack(">H", rng.choice([0, 1, 3, 0xFFFF, len(rq)]))
    elif how == "unknown-item":
        rq += item(rng.choice([0x00, 0x11, 0x21, 0x99, 0xFF]), rng.randbytes(rng.randrange(0, 80)))
        rq[2:6] = struct.pack(">L", len(rq) - 6)
    elif how == "oversize-item":
        rq = bytearray(
            associate_rq(
                [(1, VERIFICATION, [ImplicitVRLittleEndian] * rng.choice([1, 2000]))],
                user_info=item(0x50, item(0x55, b"V" * 0xFFF0)),
            )
        )
    elif how == "version":
        rq[6:8] = struct.pack(">H", rng.choice([0, 2, 0x8000, 0xFFFF]))
    elif how == "bad-ae":
        ae = rng.choice([b"\x00" * 16, b" " * 16, "ÄÖÜ".encode() + b"\x1b", b"\\AINODE", b"  AINODE"])
        rq = bytearray(associate_rq(STORAGE_CONTEXTS, called=rng.choice([b"AINODE", ae]), calling=ae))
    elif how == "application-context":
        rq = bytearray(
            associate_rq(STORAGE_CONTEXTS, application_context=rng.choice([b"", b"1.2.3", b"\xff" * 70]))
        )
    elif how == "no-contexts":
        rq = bytearray(associate_rq([]))
    elif how == "context-ids":
        rq = bytearray(
            associate_rq([(rng.choice([0, 2, 255, 1]), CTImageStorage, [ExplicitVRLittleEndian])] * 3)
        )
    elif how == "max-pdu":
        rq = bytearray(
            associate_rq(STORAGE_CONTEXTS, user_info=user_information(rng.choice([0, 1, 6, 0xFFFFFFFF])))
        )
    elif how == "user-info":
        rq = bytearray(
            associate_rq(
                STORAGE_CONTEXTS,
                user_info=rng.choice(
                    [
                        b"",
                        item(0x50, b""),
                        item(0x50, item(0x51, b"\x00")),
                        item(0x50, item(0x52, b"9" * 200)),
                        item(0x50, item(0x54, b"\x00\x05" + b"1.2.3")),  # role selection, lengths wrong
                        item(0x50, item(0x58, b"\x01\x00\xff\xff" + b"u")),  # user identity, length past end
                        item(0x50, item(0x56, b"\x00\x10" + b"1.2")),  # extended negotiation
                    ]
                ),
            )
        )
    elif how == "flip":
        for _ in range(rng.randrange(1, 6)):
            rq[rng.randrange(6, len(rq))] = rng.randrange(256)
    else:
        rq = bytearray(
            associate_rq([(2 * i + 1, CTImageStorage, [ExplicitVRLittleEndian]) for i in range(128)])
        )
    return how, bytes(rq)


def pdu_case(seed: int) -> PduCase:
    """The case numbered ``seed``: one scenario of the upper layer, malformed or at an odd moment."""
    rng = random.Random(seed)
    kind = rng.choice(
        [
            "rq-mutated",
            "rq-mutated",
            "rq-mutated",
            "rq-truncated",
            "first-pdu",
            "huge-length",
            "after-ac",
            "after-ac",
            "release-abort",
            "abrupt-close",
            "slow",
            "valid",
        ]
    )
    steps: list[Step]
    if kind == "rq-mutated":
        how, rq = _rq_mutations(rng)
        kind = f"rq-{how}"
        steps = [send(rq)]
    elif kind == "rq-truncated":
        rq = _valid_rq()
        steps = [send(rq[: rng.randrange(1, len(rq))])]
        if rng.random() < 0.5:
            steps.append(Step("close", rst=rng.random() < 0.5))
    elif kind == "first-pdu":
        pdu_type = rng.choice([0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7F, 0xFF])
        body = _store_pdus(rng)[0][6:] if pdu_type == 0x04 else rng.randbytes(rng.choice([0, 4, 10, 300]))
        kind = f"first-pdu-{pdu_type:02x}"
        steps = [send(pdu(pdu_type, body))]
    elif kind == "huge-length":
        pdu_type = rng.choice([0x01, 0x04, 0x07])
        head = struct.pack(">BBL", pdu_type, 0, rng.choice([0xFFFFFFFF, 0x80000000, 0x10000000]))
        steps = [send(head + rng.randbytes(rng.randrange(0, 2000)))]
        if rng.random() < 0.4:
            steps.append(Step("close", rst=rng.random() < 0.5))
    elif kind == "after-ac":
        kind, steps = _after_ac(rng)
    elif kind == "release-abort":
        kind, steps = _release_abort(rng)
    elif kind == "abrupt-close":
        stream = b"".join([_valid_rq(), *_store_pdus(rng)])
        steps = [send(stream[: rng.randrange(1, len(stream))]), Step("close", rst=rng.random() < 0.7)]
    elif kind == "slow":
        rq = _valid_rq()
        cut = rng.randrange(1, len(rq))
        if rng.random() < 0.5:
            kind = "slow-partial"  # part of a PDU, then silence
            steps = [send(rq[:cut])]
        else:
            kind = "slow-trickle"  # a 4 GB PDU announced, then one byte every second (issue 11, fault 5)
            steps = [send(b"\x04\x00\xff\xff\xff\xf0"), Step("trickle", rng.randbytes(60), seconds=1.0)]
    else:
        steps = [send(_valid_rq()), EXPECT, *[send(p) for p in _store_pdus(rng, 3)], EXPECT, send(RELEASE_RQ)]
    return PduCase(seed, kind, tuple(steps))


def _after_ac(rng: random.Random) -> tuple[str, list[Step]]:
    """An association the node accepted, then P-DATA it must not take as it is."""
    store = _store_pdus(rng)
    command = c_store_rq(7, CTImageStorage, generate_uid(entropy_srcs=[str(rng.getrandbits(64))]))
    how = rng.choice(
        [
            "wrong-context",
            "pdv-length",
            "data-before-command",
            "never-last",
            "garbage-command",
            "other-command",
            "second-rq",
            "empty-p-data",
            "control-bits",
            "oversize",
        ]
    )
    if how == "wrong-context":
        context = rng.choice([0, 2, 5, 255])
        body = [p_data([(context, COMMAND | LAST, command)])] + [
            p[:10] + bytes([context]) + p[11:] for p in store[1:]
        ]
    elif how == "pdv-length":
        broken = bytearray(store[0])
        broken[6:10] = struct.pack(">L", rng.choice([0, 1, 2, len(broken), 0xFFFFFFFF]))
        body = [bytes(broken), *store[1:]]
    elif how == "data-before-command":
        body = [*store[1:], store[0]]
    elif how == "never-last":
        body = [p_data([(3, COMMAND, command[:20])]), p_data([(3, COMMAND, command[20:])])] + [
            p[:11] + b"\x00" + p[12:] for p in store[1:]
        ]
    elif how == "garbage-command":
        body = [p_data([(3, COMMAND | LAST, rng.randbytes(rng.randrange(0, 200)))]), *store[1:]]
    elif how == "other-command":  # a C-FIND or N-ACTION the node offers no service for, or a C-ECHO
        field_value = rng.choice([0x0020, 0x0130, 0x0FFF, 0x0030])
        other = Dataset()
        other.AffectedSOPClassUID, other.CommandField, other.MessageID = CTImageStorage, field_value, 9
        other.CommandDataSetType = 0x0101
        body = [p_data([(3, COMMAND | LAST, command_bytes(other))])]
    elif how == "second-rq":
        body = [_valid_rq()]
    elif how == "oversize":  # a P-DATA-TF longer than the node's largest, really sent
        body = [store[0], p_data([(3, LAST, rng.randbytes(rng.choice([1 << 20, 3 << 20])))])]
    elif how == "empty-p-data":
        body = [pdu(0x04, b""), *store]
    else:
        body = [p[:11] + bytes([rng.choice([0x04, 0xFF, 0x03])]) + p[12:] for p in store]
    return f"after-ac-{how}", [send(_valid_rq()), EXPECT, *[send(p) for p in body]]


def _release_abort(rng: random.Random) -> tuple[str, list[Step]]:
    """A-RELEASE and A-ABORT where the state machine does not expect them."""
    store = _store_pdus(rng)
    how = rng.choice(
        ["release-first", "abort-first", "release-twice", "release-mid-store", "abort-mid-store", "rp"]
    )
    steps: list[Step]
    if how == "release-first":
        steps = [send(RELEASE_RQ)]
    elif how == "abort-first":
        steps = [send(ABORT[:-2] + bytes([rng.randrange(3), rng.randrange(7)]))]
    elif how == "release-twice":
        steps = [send(_valid_rq()), EXPECT, send(RELEASE_RQ), send(RELEASE_RQ)]
    elif how == "release-mid-store":
        steps = [send(_valid_rq()), EXPECT, send(store[0]), send(RELEASE_RQ)]
    elif how == "abort-mid-store":
        steps = [send(_valid_rq()), EXPECT, *[send(p) for p in store[:2]], send(ABORT)]
    else:
        steps = [send(_valid_rq()), EXPECT, send(b"\x06\x00" + struct.pack(">L", 4) + b"\x00" * 4)]
    return f"release-{how}", steps


# --- playing cases against a node -----------------------------------------------------------------------


@dataclass
class Outcome:
    """What the node did with one connection."""

    seed: int
    kind: str
    answers: list[str] = field(default_factory=list)
    ended: str = ""  # "answered", "closed by node", "closed by us", "hung"
    seconds: float = 0.0
    statuses: list[int | None] = field(default_factory=list)  # of DIMSE responses, in order

    @property
    def unanswered(self) -> bool:
        """Neither answered nor closed by the node in time, or not even connected."""
        return self.ended == "hung" or self.ended.startswith("no connection")


class Connection:
    """A raw TCP connection to the node that reads whole PDUs against a deadline."""

    def __init__(self, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.closed_by_node = False

    def send(self, data: bytes) -> bool:
        """False where the node has already closed the connection (an answer, too)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed_by_node = True
            return False

    def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_by_node = True
                return False
            self.buffer += chunk
        return True

    def read_pdu(self) -> bytes | None:
        """The next whole PDU; None when the node closed or the deadline passed."""
        if not self._fill(6):
            return None
        (length,) = struct.unpack(">L", self.buffer[2:6])
        if not self._fill(6 + length):
            return None
        whole, self.buffer = self.buffer[: 6 + length], self.buffer[6 + length :]
        return whole

    def close(self, rst: bool = False) -> None:
        if rst:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def connect(port: int, deadline: float, outcome: Outcome) -> Connection | None:
    """A connection to the node; None, noted in ``outcome``, when the node does not take one at all."""
    try:
        return Connection(port, deadline)
    except OSError as exc:
        outcome.ended = f"no connection: {type(exc).__name__}"
        return None


def pdu_name(data: bytes) -> str:
    """The PDU's name; a rejection's result/source/reason and an abort's source/reason after it."""
    name = PDU_NAMES.get(data[0], f"unknown 0x{data[0]:02x}")
    if data[0] == 0x03 and len(data) >= 10:
        return f"{name} {data[7]}/{data[8]}/{data[9]}"
    if data[0] == 0x07 and len(data) >= 10:
        return f"{name} {data[8]}/{data[9]}"
    return name


def terminal(answer: str) -> bool:
    return answer.split(" ")[0] in TERMINAL


def play(case: PduCase, port: int, deadline_seconds: float) -> Outcome:
    """Run one case; then wait for the node's last word (a terminal PDU or its closing the connection)
    until ``deadline_seconds`` after the start. A case still open then has hung."""
    start = time.monotonic()
    outcome = Outcome(case.seed, case.kind)
    connection = connect(port, start + deadline_seconds, outcome)
    if connection is None:
        return outcome
    try:
        for step in case.steps:
            if step.action == "send" and not connection.send(step.data):
                break
            if step.action == "expect":
                reply = connection.read_pdu()
                if reply is None:
                    break
                _record(reply, outcome)
                if terminal(outcome.answers[-1]):
                    break
            if step.action == "trickle":
                for byte in step.data:
                    if connection.closed_by_node or time.monotonic() > connection.deadline:
                        break
                    if not connection.send(bytes([byte])):
                        break
                    time.sleep(step.seconds)
            if step.action == "close":
                connection.close(step.rst)
                outcome.ended = "closed by us"
                break
        if not outcome.ended:
            outcome.ended = _last_word(connection, outcome)
            connection.close()
    finally:
        outcome.seconds = time.monotonic() - start
    return outcome


def _last_word(connection: Connection, outcome: Outcome) -> str:
    if outcome.answers and terminal(outcome.answers[-1]):
        return "answered"
    while not connection.closed_by_node:
        reply = connection.read_pdu()
        if reply is None:
            break
        _record(reply, outcome)
        if terminal(outcome.answers[-1]):
            return "answered"
    return "closed by node" if connection.closed_by_node else "hung"


def _record(reply: bytes, outcome: Outcome) -> None:
    """Note a PDU the node sent, and the status of a response command it carries whole."""
    outcome.answers.append(pdu_name(reply))
    if reply[0] == 0x04 and len(reply) > 12 and reply[11] & COMMAND and reply[11] & LAST:
        outcome.statuses.append(command_status(reply[12:]))


def store_raw(case: DatasetCase, port: int, deadline_seconds: float, max_fragment: int = 16000) -> Outcome:
    """One association that proposes the case's SOP class in its transfer syntax, sends the data set
    bytes as they are in one C-STORE, reads the status and releases."""
    start = time.monotonic()
    outcome = Outcome(case.seed, case.kind)
    connection = connect(port, start + deadline_seconds, outcome)
    if connection is None:
        return outcome
    try:
        connection.send(associate_rq([(1, case.sop_class_uid, [case.transfer_syntax])]))
        ac = connection.read_pdu()
        outcome.answers.append(pdu_name(ac) if ac else "nothing")
        if ac is None or ac[0] != 0x02 or 1 not in accepted_contexts(ac):
            outcome.ended = "answered" if ac else ("closed by node" if connection.closed_by_node else "hung")
            return outcome
        connection.send(
            p_data([(1, COMMAND | LAST, c_store_rq(1, case.sop_class_uid, case.sop_instance_uid))])
        )
        fragments = [case.data[i : i + max_fragment] for i in range(0, len(case.data), max_fragment)] or [b""]
        for index, fragment in enumerate(fragments):
            if not connection.send(p_data([(1, LAST if index == len(fragments) - 1 else 0, fragment)])):
                break
        status = _response_status(connection, outcome)
        outcome.statuses.append(status)
        if status is None and terminal(outcome.answers[-1]):  # the node ended the association instead
            outcome.ended = "answered"
            return outcome
        if status is None:
            outcome.ended = "closed by node" if connection.closed_by_node else "hung"
            return outcome
        connection.send(RELEASE_RQ)
        reply = connection.read_pdu()
        outcome.answers.append(pdu_name(reply) if reply else "nothing")
        outcome.ended = "answered"
        return outcome
    finally:
        connection.close()
        outcome.seconds = time.monotonic() - start


def _response_status(connection: Connection, outcome: Outcome) -> int | None:
    """The C-STORE-RSP's status; None when the node ended the association instead (recorded)."""
    command = b""
    while True:
        reply = connection.read_pdu()
        if reply is None:
            return None
        outcome.answers.append(pdu_name(reply))
        if reply[0] != 0x04:
            return None
        offset = 6
        while offset + 6 <= len(reply):
            (length,) = struct.unpack(">L", reply[offset : offset + 4])
            control = reply[offset + 5]
            if control & COMMAND:
                command += reply[offset + 6 : offset + 4 + length]
                if control & LAST:
                    return command_status(command)
            offset += 4 + length
