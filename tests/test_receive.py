"""The DICOM listener against real dcmtk senders: every transfer syntax, access control, refusals."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless
from sqlalchemy import select

from node.db import AuditEvent, Database, Instance
from tests.peers import NodeProcess, echoscu, storescu, wait_for
from training.ct_phantom import write_head_ct_series

# name: (bits stored of the unsigned source it needs, or 0 for the signed 16-bit CT; command)
COMPRESSORS = {
    "jpeg-lossless": (0, ["dcmcjpeg"]),
    "jpeg-baseline": (8, ["dcmcjpeg", "+eb"]),
    "jpeg-extended": (12, ["dcmcjpeg", "+ee"]),
    "jpeg-ls": (0, ["dcmcjpls"]),
    "jpeg-ls-near": (12, ["dcmcjpls", "+en"]),
    "rle": (0, ["dcmcrle"]),
    "deflated": (0, ["dcmconv", "+td"]),
    "big-endian": (0, ["dcmconv", "+tb"]),
    "implicit": (0, ["dcmconv", "+ti"]),
}
# storescu proposes one extra transfer syntax per run, chosen by a flag
PROPOSE = {
    "explicit": "-xe",
    "jpeg-lossless": "-xs",
    "jpeg-baseline": "-xy",
    "jpeg-extended": "-xx",
    "jpeg-ls": "-xt",
    "jpeg-ls-near": "-xu",
    "rle": "-xr",
    "deflated": "-xd",
    "big-endian": "-xb",
    "implicit": "-xi",
    "jpeg2000": "-xv",
}


def unsigned(source: Path, bits: int, target: Path) -> Path:
    """The slice rescaled to unsigned ``bits``-bit pixels (lossy codecs take only those)."""
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array.astype(np.float64)
    scaled = (pixels - pixels.min()) / max(np.ptp(pixels), 1) * (2**bits - 1)
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, bits, bits - 1
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.PixelData = scaled.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.save_as(target, enforce_file_format=True)
    return target


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small CT slice in each transfer syntax the listener accepts."""
    folder = tmp_path_factory.mktemp("sources")
    files = write_head_ct_series(folder / "plain", 12, hemorrhage=False, seed=101, size=128)
    out = {"explicit": files[0]}
    for n, (name, (bits, command)) in enumerate(COMPRESSORS.items(), start=1):
        source = unsigned(files[n], bits, folder / f"{name}-u{bits}.dcm") if bits else files[n]
        target = folder / f"{name}.dcm"
        subprocess.run([*command, str(source), str(target)], check=True, capture_output=True)
        out[name] = target
    ds = pydicom.dcmread(files[len(COMPRESSORS) + 1])
    ds.compress(JPEG2000Lossless)
    ds.save_as(folder / "j2k.dcm", enforce_file_format=True)
    out["jpeg2000"] = folder / "j2k.dcm"
    return out


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(
        tmp_path / "node", {"node": {"allowed_calling_aets": ["STORESCU", "ECHOSCU"]}}
    ).start()
    yield process
    process.stop()


def database(node: NodeProcess) -> Database:
    return Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")


def indexed(node: NodeProcess, count: int) -> dict[str, Instance]:
    """The node's instances once ``count`` are indexed (the index follows the acknowledgement)."""

    def read() -> dict[str, Instance]:
        db = database(node)
        with db.session() as session:
            found = {i.sop_uid: i for i in session.scalars(select(Instance))}
        db.dispose()
        return found if len(found) >= count else {}

    return wait_for(read, 30, f"{count} indexed instances")  # type: ignore[no-any-return]


def audited(node: NodeProcess, action: str) -> bool:
    """Wait until the node's audit log has ``action`` (events may follow the DICOM answer)."""

    def read() -> bool:
        db = database(node)
        with db.session() as session:
            found = session.scalar(select(AuditEvent.id).where(AuditEvent.action == action).limit(1))
        db.dispose()
        return found is not None

    return bool(wait_for(read, 10, f"audit event {action}"))


def test_every_transfer_syntax_is_stored_as_sent(node: NodeProcess, sources: dict[str, Path]) -> None:
    for name, source in sources.items():
        run = storescu(node.dicom_port, [source], extra=[PROPOSE[name]])
        assert run.returncode == 0, f"{name}: {run.stdout}{run.stderr}"
    stored = indexed(node, len(sources))
    assert len(stored) == len(sources)
    for name, source in sources.items():
        sent = pydicom.dcmread(source)
        kept = stored[sent.SOPInstanceUID]
        on_disk = pydicom.dcmread(kept.path)
        assert kept.transfer_syntax == sent.file_meta.TransferSyntaxUID, name
        assert on_disk.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, name
        # the bytes as they came: compressed pixel data is never decoded and re-encoded
        assert on_disk.PixelData == sent.PixelData, name
        assert Path(kept.path).parent.name == sent.SeriesInstanceUID


def test_same_instance_twice_is_idempotent(node: NodeProcess, sources: dict[str, Path]) -> None:
    for _ in range(2):
        assert storescu(node.dicom_port, [sources["explicit"]]).returncode == 0
    wait_for(
        lambda: [i.times_received for i in indexed(node, 1).values()] == [2], 30, "the duplicate indexed"
    )


def test_echo(node: NodeProcess) -> None:
    run = echoscu(node.dicom_port)
    assert run.returncode == 0, run.stderr


def test_calling_ae_not_allowed_is_rejected_and_audited(node: NodeProcess, sources: dict[str, Path]) -> None:
    run = storescu(node.dicom_port, [sources["explicit"]], calling="INTRUDER")
    assert run.returncode != 0
    assert "Rejected" in run.stdout + run.stderr
    assert audited(node, "association.rejected")


def test_wrong_called_ae_is_rejected(node: NodeProcess, sources: dict[str, Path]) -> None:
    run = storescu(node.dicom_port, [sources["explicit"]], called="SOMEONE")
    assert run.returncode != 0
    assert audited(node, "association.rejected")


def test_disk_below_floor_answers_out_of_resources(tmp_path: Path, sources: dict[str, Path]) -> None:
    node = NodeProcess(tmp_path / "full", {"node": {"min_free_disk_mb": 10**9}}).start()
    try:
        run = storescu(node.dicom_port, [sources["explicit"]])
        assert "refused: outofresources" in (run.stdout + run.stderr).lower()  # 0xA700
        assert not list((node.folder / "var" / "incoming").rglob("*.dcm"))
        assert audited(node, "instance.refused")
    finally:
        node.stop()


def test_invalid_uid_is_refused_not_stored(
    node: NodeProcess, tmp_path: Path, sources: dict[str, Path]
) -> None:
    ds = pydicom.dcmread(sources["explicit"])
    ds.SeriesInstanceUID = "1.2.3.4/../../../etc"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    run = storescu(node.dicom_port, [bad])
    assert "cannotunderstand" in (run.stdout + run.stderr).lower()  # 0xC000
    assert not list((node.folder / "var").rglob("*etc*"))
    assert echoscu(node.dicom_port).returncode == 0  # the listener is still up
