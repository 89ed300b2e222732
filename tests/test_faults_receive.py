"""Issue 11, faults 6 and 7: the listener's memory grew with each instance's size (a 512 kB deflate bomb
took a node from 166 MB to 1.19 GB), and an instance cut short was answered Success. Data sets are now
received to disk and checked there, a chunk at a time: memory stays flat, what is too large or cut
short is refused with a status that says so, audited, and never reaches the spool."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode, encode_file_meta
from sqlalchemy import select

from node.config import NodeSettings, Settings, StudySettings
from node.db import AuditEvent, Database, Instance
from node.ingest import checks
from node.ingest.accept import INCOMPLETE, TOO_LARGE, Ingest, Origin, Refused
from node.ingest.index import Indexer
from node.spool import Spool
from tests.peers import NodeProcess, echoscu, storescu, wait_for

pytestmark = pytest.mark.faults

ORIGIN = Origin(calling_ae="MODALITY", called_ae="AINODE", address="127.0.0.1")
MB = 2**20
FLAT = 64 * MB  # what receiving any one instance may add to the node's peak memory, at most


def ct(rows: int = 32, frames: int = 1, bits: int = 16, samples: int = 1) -> Dataset:
    """A CT instance with native pixel data of the given geometry, and its meta information."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "FAULT-7", "Fault^Seven", "CT"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.NumberOfFrames = samples, frames
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    pixels = rows * rows * samples * frames
    if bits == 1:
        ds.PixelData = np.packbits(np.arange(pixels) % 3 == 0).tobytes()
    else:
        ds.PixelData = (np.arange(pixels * bits // 8) % 251).astype(np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def part10(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rle(frames: int, announced: int | None = None) -> Dataset:
    """An RLE Lossless CT, one fragment a frame as PS3.5 G requires; ``announced`` frames in its header."""
    ds = ct(rows=8, frames=announced or frames, bits=8)
    frame = struct.pack("<16L", 1, 64, *[0] * 14) + b"\x87\x00" * 8  # one segment: 8 rows of 8 zeros
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def with_icon(ds: Dataset) -> Dataset:
    """An Icon Image Sequence whose pixel data is encapsulated as the instance's is (PS3.5 A.4)."""
    icon = Dataset()
    icon.Rows = icon.Columns = 8
    icon.SamplesPerPixel, icon.BitsAllocated = 1, 8
    icon.PixelData = ds.PixelData
    icon["PixelData"].VR = "OB"
    icon["PixelData"].is_undefined_length = True
    ds.IconImageSequence = [icon]
    return ds


def float_pixels(count: int) -> Dataset:
    """A parametric map style instance: Float Pixel Data of ``count`` values for 32 × 32."""
    ds = ct()
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.zeros(count, dtype=np.float32).tobytes()
    return ds


def ybr_422(pixels_kept: float = 1.0) -> Dataset:
    """Native YBR_FULL_422: two samples a pixel on average, not three (PS3.3 C.7.6.3.1.2)."""
    ds = ct(samples=3, bits=8)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = ds.PixelData[: int(32 * 32 * 2 * pixels_kept)]
    return ds


def cut(fraction: float) -> Callable[[bytes], bytes]:
    return lambda data: data[: int(len(data) * fraction)]


def halved_pixels(ds: Dataset) -> Dataset:
    """Well formed, whole elements, but half the pixel data the header announces."""
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


def no_delimiter(data: bytes) -> bytes:
    """Encapsulated pixel data whose sequence delimiter was lost: a transfer cut at an item's end."""
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return data[:-8]


def bad_item(data: bytes) -> bytes:
    """The second item tag of the encapsulated pixel data (the first fragment's) overwritten."""
    first = data.index(b"\xfe\xff\x00\xe0")
    second = data.index(b"\xfe\xff\x00\xe0", first + 4)
    return data[:second] + b"\x08\x00\x20\x00" + data[second + 4 :]


def long_element(data: bytes) -> bytes:
    """PatientName's length field claims more bytes than the whole file holds."""
    at = data.index(b"\x10\x00\x10\x00PN")
    return data[: at + 6] + b"\xff\x7f" + data[at + 8 :]


def bad_block(data: bytes) -> bytes:
    """The deflate stream's first block given the reserved block type (RFC 1951 3.2.3)."""
    body = BytesIO(data)
    checks.read_meta(body)
    at = body.tell()
    return data[:at] + bytes([data[at] | 0x06]) + data[at + 1 :]


def bad_meta_vr(data: bytes) -> bytes:
    """The Transfer Syntax UID of the file meta information under a VR no reader knows."""
    at = data.index(b"\x02\x00\x10\x00UI")
    return data[: at + 4] + b"XX" + data[at + 6 :]


VALID = {
    "explicit": lambda: part10(ct()),
    "implicit": lambda: part10(ct(), ImplicitVRLittleEndian),
    "big endian": lambda: part10(ct(), ExplicitVRBigEndian),
    "deflated": lambda: part10(ct(), DeflatedExplicitVRLittleEndian),
    "rle, 3 frames": lambda: part10(rle(3)),
    "rle, with an icon": lambda: part10(with_icon(rle(1))),
    "1 bit, 7 frames of 13 x 13": lambda: part10(ct(rows=13, frames=7, bits=1)),
    "rgb": lambda: part10(ct(samples=3, bits=8)),
    "float pixel data": lambda: part10(float_pixels(32 * 32)),
    "ybr full 422": lambda: part10(ybr_422()),
}
DAMAGED: dict[str, tuple[Callable[[], bytes], type[checks.Unreadable]]] = {
    "cut to a third": (lambda: cut(1 / 3)(part10(ct(rows=64))), checks.Incomplete),
    "cut in the header": (lambda: cut(0.05)(part10(ct(rows=64))), checks.Incomplete),
    "half the pixel data": (lambda: part10(halved_pixels(ct())), checks.Incomplete),
    "a frame missing": (lambda: part10(halved_pixels(ct(frames=2))), checks.Incomplete),
    "1 bit, half the frames": (lambda: part10(halved_pixels(ct(frames=8, bits=1))), checks.Incomplete),
    "ybr full 422, half": (lambda: part10(ybr_422(0.5)), checks.Incomplete),
    "float pixel data short": (lambda: part10(float_pixels(32 * 31)), checks.Incomplete),
    "deflated, cut short": (
        lambda: cut(0.9)(part10(ct(), DeflatedExplicitVRLittleEndian)),
        checks.Incomplete,
    ),
    "rle, no delimiter": (lambda: no_delimiter(part10(rle(3))), checks.Incomplete),
    "rle, a fragment missing": (lambda: part10(rle(3, announced=4)), checks.Incomplete),
    "rle, not an item": (lambda: bad_item(part10(rle(3))), checks.Unreadable),
    "a length past the end": (lambda: long_element(part10(ct())), checks.Incomplete),
    "not dicom": (lambda: b"\x00" * 128 + b"NOPE" + bytes(64), checks.Unreadable),
    "deflate stream damaged": (
        lambda: bad_block(part10(ct(), DeflatedExplicitVRLittleEndian)),
        checks.Unreadable,
    ),
    "meta information with an unknown vr": (lambda: bad_meta_vr(part10(ct())), checks.Unreadable),
}


def inspected(data: bytes, node: NodeSettings | None = None) -> Dataset:
    body = BytesIO(data)
    return checks.inspect(body, checks.read_meta(body), node or NodeSettings())


@pytest.mark.parametrize("make", VALID.values(), ids=VALID.keys())
def test_well_formed_instances_pass_with_their_header(make: Callable[[], bytes]) -> None:
    header = inspected(make())
    assert str(header.PatientName) == "Fault^Seven"
    assert header.Rows in (8, 13, 32)
    assert not {"PixelData", "FloatPixelData"} & set(header.dir())  # the header only


@pytest.mark.parametrize(("make", "error"), DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_instances_are_caught(make: Callable[[], bytes], error: type[checks.Unreadable]) -> None:
    with pytest.raises(error) as caught:
        inspected(make())
    assert type(caught.value) is error


def test_an_instance_over_the_size_cap_is_too_large() -> None:
    with pytest.raises(checks.TooLarge, match="over 1 MB"):
        inspected(part10(ct(rows=1024)), NodeSettings(max_instance_mb=1))


def test_a_header_of_many_large_elements_is_read_in_flat_memory() -> None:
    ds = ct()
    ds.add_new(0x00290010, "LO", "FAULT 7")
    for i in range(100):  # each just under the per-element limit: 100 MB before the pixel data
        ds.add_new(0x00291000 + i, "OB", bytes(checks.HEADER_VALUE_LIMIT - 16))
    data = part10(ds)
    tracemalloc.start()
    try:
        header = inspected(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(header.PatientName) == "Fault^Seven" and header.Rows == 32
    assert peak < FLAT  # before the fix every such element was kept: 300 MB for this 100 MB header


def deflate_bomb(path: Path, inflated_mb: int) -> Path:
    """A deflated CT instance whose private OB element of zeros inflates to ``inflated_mb`` MB, written
    without ever holding it: 512 MB of it is half a megabyte on the wire."""
    ds = ct()
    del ds.PixelData
    ds.add_new(0x00290010, "LO", "FAULT 6")
    header = encode(ds, False, True)
    assert header is not None
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(MB)
    with path.open("wb") as file:
        file.write(b"\x00" * 128 + b"DICM" + encode_file_meta(ds.file_meta))
        file.write(
            deflater.compress(header + struct.pack("<HH2sHL", 0x29, 0x1010, b"OB", 0, inflated_mb * MB))
        )
        for _ in range(inflated_mb):
            file.write(deflater.compress(zeros))
        file.write(deflater.flush())
    return path


def test_a_deflate_bomb_is_read_as_a_capped_stream(tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 512)
    assert bomb.stat().st_size < MB
    tracemalloc.start()
    try:
        with pytest.raises(checks.TooLarge, match="inflates beyond 256 MB"):
            checks.read_header(bomb, NodeSettings(max_inflated_mb=256))
        header = checks.read_header(bomb, NodeSettings())  # under the default cap: read, and flat
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(header.PatientName) == "Fault^Seven"
    assert 0x00291010 not in header  # 512 MB of value is no header's
    assert peak < 16 * MB


# --- accept: refused, audited, nothing spooled ----------------------------------------------------


@pytest.fixture
def ingest(db: Database, tmp_path: Path) -> Ingest:
    indexer = Indexer(db, StudySettings(stable_seconds=0), on_ready=lambda: None)
    return Ingest(Settings(), db, Spool(tmp_path / "data"), indexer)


def spooled(spool: Spool) -> list[Path]:
    return [path for path in spool.incoming.rglob("*") if path.is_file()]


def test_a_cut_instance_is_refused_audited_and_not_spooled(ingest: Ingest, tmp_path: Path) -> None:
    ds = ct(rows=64)
    received = tmp_path / "received.dcm"
    received.write_bytes(cut(1 / 3)(part10(ds)))
    with pytest.raises(Refused) as refused:
        ingest.accept(ds.file_meta, received, ORIGIN)
    assert refused.value.status == INCOMPLETE
    assert spooled(ingest.spool) == []  # not even a temporary file
    with ingest.db.session() as session:
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.refused")).one()
    assert audit.outcome == "failure"
    assert audit.detail["status"] == "0xC001"
    assert audit.detail["reason"] == "the data set ends inside an element"
    assert audit.detail["sop_uid"] == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless])
def test_an_accepted_file_is_spooled_byte_for_byte(ingest: Ingest, tmp_path: Path, syntax: str) -> None:
    """From a Part 10 file (the listener's, an upload's): its data set copied as it is, behind the
    meta information given, with the AE titles."""
    ds = rle(2) if syntax == RLELossless else ct()
    data = part10(ds, syntax)
    received = tmp_path / "received.dcm"
    received.write_bytes(data)
    arrival = ingest.accept(ds.file_meta, received, ORIGIN)
    assert data_set(arrival.path.read_bytes()) == data_set(data)
    assert (
        checks.read_header(arrival.path, NodeSettings()).file_meta.SendingApplicationEntityTitle == "MODALITY"
    )
    assert arrival.size == arrival.path.stat().st_size
    assert spooled(ingest.spool) == [arrival.path]


def data_set(data: bytes) -> bytes:
    """A Part 10 file's data set, as encoded, behind its meta information."""
    body = BytesIO(data)
    checks.read_meta(body)
    return data[body.tell() :]


# --- the listener, a real node: received to disk, memory flat, refusals said and audited -------------


def send_as_is(port: int, path: Path, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """C-STORE the data set of the file ``path`` byte for byte, never decoded (pynetdicom's chunked
    send): how a sender hands over an instance cut short. The response's status data set."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    with path.open("rb") as file:
        meta = checks.read_meta(file)
    ae = AE(ae_title="FAULTY")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        status: Dataset = assoc.send_c_store(path)
    finally:
        assoc.release()
    return status


def peak_memory(node: NodeProcess) -> int:
    """The node process's peak resident memory so far (VmHWM), in bytes."""
    assert node.process is not None
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def refusals(node: NodeProcess) -> list[dict[str, str]]:
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    try:
        with db.session() as session:
            query = select(AuditEvent.detail).where(AuditEvent.action == "instance.refused")
            return list(session.scalars(query))
    finally:
        db.dispose()


def instances(node: NodeProcess) -> dict[str, Instance]:
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    try:
        with db.session() as session:
            return {i.sop_uid: i for i in session.scalars(select(Instance))}
    finally:
        db.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node whose last run left a transfer cut short in its receiving folder."""
    process = NodeProcess(tmp_path / "node", {"node": {"max_inflated_mb": 256}})
    receiving = process.folder / "var" / "receiving"
    receiving.mkdir(parents=True)
    (receiving / "tmpcutshort.dcm").write_bytes(b"\x00" * 128 + b"DICM")
    yield process.start()
    process.stop()


def test_a_cut_instance_is_refused_over_the_network(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not any((node.folder / "var" / "receiving").iterdir())  # the last run's leftover is gone
    ds = ct(rows=256)
    whole = tmp_path / "whole.dcm"
    whole.write_bytes(part10(ds))
    third = tmp_path / "third.dcm"
    third.write_bytes(cut(1 / 3)(whole.read_bytes()))
    status = send_as_is(node.dicom_port, third, monkeypatch)
    assert status.Status == INCOMPLETE  # 0xC001: the sender knows to send it again
    assert status.ErrorComment == "the data set ends inside an element"
    assert wait_for(lambda: refusals(node), 10, "the refusal audited")[0]["status"] == "0xC001"
    assert not list((node.folder / "var" / "incoming").rglob("*.dcm"))
    assert not any((node.folder / "var" / "receiving").iterdir())  # pynetdicom's file went too

    run = storescu(node.dicom_port, [whole])  # sent again, whole: stored
    assert run.returncode == 0, run.stdout + run.stderr
    stored = wait_for(lambda: instances(node).get(ds.SOPInstanceUID), 30, "the instance indexed")
    assert data_set(Path(stored.path).read_bytes()) == data_set(whole.read_bytes())
    assert echoscu(node.dicom_port).returncode == 0


def test_a_deflate_bomb_is_refused_in_flat_memory(
    node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = peak_memory(node)
    status = send_as_is(node.dicom_port, deflate_bomb(tmp_path / "bomb.dcm", 512), monkeypatch)
    assert status.Status == TOO_LARGE  # 0xC002: over max_inflated_mb = 256
    assert status.ErrorComment == "the deflated data set inflates beyond 256 MB"
    under_cap = deflate_bomb(tmp_path / "under.dcm", 200)
    assert send_as_is(node.dicom_port, under_cap, monkeypatch).Status == 0x0000
    wait_for(lambda: len(instances(node)) == 1, 30, "the deflated instance indexed")
    assert peak_memory(node) - before < FLAT
    assert [refusal["status"] for refusal in refusals(node)] == ["0xC002"]


def big_multiframe(path: Path, megabytes: int) -> Path:
    """A native 16-bit multi-frame CT of ``megabytes`` MB of 512 × 512 frames, written a frame at a time."""
    frames = megabytes * MB // (512 * 512 * 2)
    ds = ct(rows=512, frames=frames)
    del ds.PixelData
    header = encode(ds, False, True)
    assert header is not None
    frame = (np.arange(512 * 512) % 4000).astype("<u2").tobytes()
    with path.open("wb") as file:
        file.write(b"\x00" * 128 + b"DICM" + encode_file_meta(ds.file_meta) + header)
        file.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frames * len(frame)))
        for _ in range(frames):
            file.write(frame)
    return path


def test_a_200_mb_multiframe_is_received_in_flat_memory(node: NodeProcess, tmp_path: Path) -> None:
    source = big_multiframe(tmp_path / "multiframe.dcm", 200)
    before = peak_memory(node)
    run = storescu(node.dicom_port, [source])
    assert run.returncode == 0, run.stdout + run.stderr
    assert peak_memory(node) - before < FLAT
    [stored] = wait_for(lambda: list(instances(node).values()), 30, "the multi-frame indexed")
    assert stored.size > 200 * MB
    with Path(stored.path).open("rb") as kept, source.open("rb") as sent:
        checks.read_meta(kept)
        checks.read_meta(sent)
        while chunk := sent.read(16 * MB):
            assert kept.read(len(chunk)) == chunk
        assert kept.read(1) == b""
