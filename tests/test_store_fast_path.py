"""Issue 12: the listener takes C-STOREs below pynetdicom's message layer (node.dicom.store_fast_path).
What it stores is the bytes pynetdicom's path stored; a command set split over PDUs, several PDVs in a
PDU, a C-ECHO between C-STOREs, refusals with their Error Comment, an abort in the middle of a data set
and an instance over ``max_instance_mb`` all end as before. Raw PDUs are sent over a pynetdicom
association's socket, and its answers read by pynetdicom."""

from __future__ import annotations

import contextlib
import random
import struct
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE, dimse_messages
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, encode_file_meta
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from node.config import Settings, StudySettings
from node.db import Database
from node.dicom import filemeta, store_fast_path
from node.ingest import scp
from node.ingest.accept import CANNOT_UNDERSTAND, DATASET_MISMATCH, TOO_LARGE, Ingest
from node.ingest.index import Indexer
from node.ingest.scp import Receiver
from node.spool import Spool
from tests import fuzz
from tests.peers import free_port, storescu, wait_for
from tests.test_ingest_speed import ORIGIN, data_set, request_meta
from training.ct_phantom import write_head_ct_series

SUCCESS = 0x0000


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_head_ct_series(tmp_path_factory.mktemp("ct"), 6, hemorrhage=False, seed=21, size=64)


def start_listener(db: Database, folder: Path, **node: object) -> tuple[Receiver, Ingest, int]:
    port = free_port()
    settings = Settings(
        node={"dicom_host": "127.0.0.1", "dicom_port": port, "http_port": free_port(), **node}
    )
    indexer = Indexer(db, StudySettings(stable_seconds=0), on_ready=lambda: None)
    ingest = Ingest(settings, db, Spool(folder / "data"), indexer)
    receiver = Receiver(settings, db, ingest, complete=lambda series, reason: None)
    receiver.start()
    return receiver, ingest, port


@pytest.fixture
def listener(db: Database, tmp_path: Path) -> Iterator[tuple[Ingest, int]]:
    receiver, ingest, port = start_listener(db, tmp_path)
    yield ingest, port
    receiver.stop()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The DIMSE messages pynetdicom's own decoder completed (by class name)."""
    seen: list[str] = []
    real = dimse_messages.DIMSEMessage.decode_msg

    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
        done = real(self, primitive, assoc)
        if done:
            seen.append(type(self).__name__)
        return done

    monkeypatch.setattr(dimse_messages.DIMSEMessage, "decode_msg", decode_msg)
    return seen


def expected_file(source: Path) -> bytes:
    """What the node stores for ``source`` received from STORESCU: preamble, pydicom's encoding of the
    request's meta information with the AE titles, the data set as sent."""
    meta = request_meta(source)
    meta.SourceApplicationEntityTitle = Settings().node.ae_title
    meta.SendingApplicationEntityTitle = ORIGIN.calling_ae
    meta.ReceivingApplicationEntityTitle = ORIGIN.called_ae
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + data_set(source)


def stored(ingest: Ingest) -> dict[str, bytes]:
    return {
        pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path.read_bytes()
        for path in ingest.spool.incoming.rglob("*.dcm")
    }


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "pynetdicom"])
def test_storescu_instances_are_stored_as_pynetdicoms_path_stores_them(
    db: Database,
    tmp_path: Path,
    slices: list[Path],
    decoded: list[str],
    monkeypatch: pytest.MonkeyPatch,
    fast: bool,
) -> None:
    """The same bytes either way; with the fast path, pynetdicom's decoder never sees a C-STORE."""
    if not fast:
        monkeypatch.setattr(scp, "take_stores_directly", lambda assoc, on_broken: None)
    receiver, ingest, port = start_listener(db, tmp_path)
    try:
        run = storescu(port, slices, extra=["--max-send-pdu", "4096"])  # data sets over many PDUs
        assert run.returncode == 0, run.stdout + run.stderr
        files = stored(ingest)
        for source in slices:
            uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
            assert files[uid] == expected_file(source)
        assert ("C_STORE_RQ" in decoded) is not fast
        assert wait_for(lambda: not any(ingest.spool.receiving.iterdir()), 5, "receiving/ emptied")
    finally:
        receiver.stop()


@contextlib.contextmanager
def associated(port: int, source: Path, *sop_classes: str) -> Iterator[Association]:
    """An association proposing CT (and ``sop_classes``) in ``source``'s transfer syntax, and
    verification; released at the end unless the test ended it."""
    syntax = pydicom.dcmread(source).file_meta.TransferSyntaxUID
    ae = AE(ae_title="STORESCU")
    for abstract in (CTImageStorage, *sop_classes):
        ae.add_requested_context(abstract, syntax)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def context_id(assoc: Association, abstract: str) -> int:
    return next(int(cx.context_id) for cx in assoc.accepted_contexts if cx.abstract_syntax == abstract)  # type: ignore[arg-type]


def command(source: Path, message_id: int, sop_class: str = "", sop_instance: str = "") -> bytes:
    """A C-STORE-RQ's command set for ``source``, as pynetdicom encodes it; the UIDs as given."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class or ds.SOPClassUID
    request.AffectedSOPInstanceUID = sop_instance or ds.SOPInstanceUID
    request.Priority = 0
    request.DataSet = BytesIO(b"\x00")  # present: Command Data Set Type 0x0001
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return cast(bytes, encode(message.command_set, True, True))


def pdu(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, fragment) PDV items."""
    items = b"".join(struct.pack(">LBB", len(data) + 2, cx, control) + data for cx, control, data in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def split(data: bytes, parts: int) -> list[bytes]:
    step = -(-len(data) // parts)
    return [data[at : at + step] for at in range(0, len(data), step)]


def answer(assoc: Association) -> Any:
    """The response to what :func:`send` sent; the association's reactor goes on."""
    try:
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert response is not None, "no answer"
    return response


def send(assoc: Association, *pdus: bytes) -> None:
    """Raw PDUs over ``assoc``'s socket, its reactor paused first (as pynetdicom's own requests pause
    it) so that :func:`answer` gets the response."""
    assoc._reactor_checkpoint.clear()
    wait_for(lambda: assoc._is_paused, 5, "the reactor paused")
    for raw in pdus:
        assoc.dul.socket.send(raw)  # type: ignore[union-attr]


def test_a_command_over_several_pdus_and_fragments_several_to_a_pdu(
    listener: tuple[Ingest, int], slices: list[Path], decoded: list[str]
) -> None:
    ingest, port = listener
    with associated(port, slices[0]) as assoc:
        cx = context_id(assoc, CTImageStorage)
        # the command in three PDUs; the data set four fragments in one PDU, the last alone
        cmd, body = split(command(slices[0], 1), 3), split(data_set(slices[0]), 5)
        send(assoc, *(pdu((cx, 0x01, piece)) for piece in cmd[:-1]), pdu((cx, 0x03, cmd[-1])))
        send(assoc, pdu(*((cx, 0x00, piece) for piece in body[:-1])), pdu((cx, 0x02, body[-1])))
        assert answer(assoc).Status == SUCCESS
        # the command's last fragment and the whole data set in one PDU
        cmd, body = split(command(slices[1], 2), 2), split(data_set(slices[1]), 3)
        send(assoc, pdu((cx, 0x01, cmd[0])))
        send(
            assoc, pdu((cx, 0x03, cmd[1]), *((cx, 0x00, piece) for piece in body[:-1]), (cx, 0x02, body[-1]))
        )
        response = answer(assoc)
        assert (response.Status, response.MessageIDBeingRespondedTo) == (SUCCESS, 2)
    files = stored(ingest)
    for source in slices[:2]:
        assert files[pydicom.dcmread(source).SOPInstanceUID] == expected_file(source)
    assert "C_STORE_RQ" not in decoded


def test_echo_and_store_in_one_association(
    listener: tuple[Ingest, int], slices: list[Path], decoded: list[str]
) -> None:
    """C-ECHO goes to pynetdicom, C-STORE to the fast path, turn by turn in one association."""
    ingest, port = listener
    with associated(port, slices[0]) as assoc:
        for source in slices[:3]:
            assert assoc.send_c_echo().Status == SUCCESS
            assert assoc.send_c_store(source).Status == SUCCESS
        assert assoc.send_c_echo().Status == SUCCESS
    assert decoded.count("C_ECHO_RQ") == 4 and "C_STORE_RQ" not in decoded
    assert len(stored(ingest)) == 3


@pytest.mark.parametrize(
    ("change", "status", "comment"),
    [
        ({"sop_instance": "1.2.3.4"}, CANNOT_UNDERSTAND, "SOPInstanceUID differs from the request's"),
        ({"sop_class": MRImageStorage}, DATASET_MISMATCH, "SOPClassUID differs from the request's"),
    ],
)
def test_a_refused_instance_is_answered_with_its_status_and_reason(
    listener: tuple[Ingest, int], slices: list[Path], change: dict[str, str], status: int, comment: str
) -> None:
    ingest, port = listener
    with associated(port, slices[0], MRImageStorage) as assoc:
        cx = context_id(assoc, change.get("sop_class", CTImageStorage))
        send(assoc, pdu((cx, 0x03, command(slices[0], 7, **change))), pdu((cx, 0x02, data_set(slices[0]))))
        response = answer(assoc)
        assert (response.Status, response.ErrorComment, response.MessageIDBeingRespondedTo) == (
            status,
            comment,
            7,
        )
        assert assoc.send_c_store(slices[0]).Status == SUCCESS  # the association goes on
    assert len(stored(ingest)) == 1


@pytest.mark.parametrize("end", ["abort", "drop"])
def test_a_data_set_cut_by_the_connection_leaves_no_file(
    listener: tuple[Ingest, int], slices: list[Path], end: str
) -> None:
    ingest, port = listener
    with associated(port, slices[0]) as assoc:
        cx = context_id(assoc, CTImageStorage)
        send(assoc, pdu((cx, 0x03, command(slices[0], 1))), pdu((cx, 0x00, data_set(slices[0])[:1000])))
        wait_for(lambda: any(ingest.spool.receiving.iterdir()), 5, "the data set begun on disk")
        if end == "abort":
            assoc.abort()
        else:
            assoc.dul.socket.socket.close()  # type: ignore[union-attr]
            assoc.kill()
    assert wait_for(lambda: not any(ingest.spool.receiving.iterdir()), 10, "the partial file deleted")
    assert stored(ingest) == {}


def test_an_instance_over_max_instance_mb_is_refused_as_before(db: Database, tmp_path: Path) -> None:
    [large] = write_head_ct_series(tmp_path / "ct", 1, hemorrhage=False, seed=3, size=1024)  # 2 MB
    receiver, ingest, port = start_listener(db, tmp_path, max_instance_mb=1)
    try:
        with associated(port, large) as assoc:
            response = assoc.send_c_store(large)
        assert (response.Status, response.ErrorComment) == (TOO_LARGE, "the data set is over 1 MB")
        assert stored(ingest) == {}
        assert wait_for(lambda: not any(ingest.spool.receiving.iterdir()), 5, "receiving/ emptied")
    finally:
        receiver.stop()


def status_with(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment is not None:
        status.ErrorComment = comment
    return status


@pytest.mark.parametrize(
    "status",
    [
        SUCCESS,
        0xB000,
        status_with(0xA700, "the database is not keeping up"),
        status_with(0xC000, "odd"),
        status_with(0xA900),
        status_with(0x0000, "ÄRZTE"),  # not ASCII: pynetdicom encodes it
        "nonsense",  # pynetdicom's answer to a handler returning no status
    ],
)
@pytest.mark.parametrize("maximum", [0, 16_384, 40])
def test_the_response_is_encoded_as_pynetdicom_encodes_it(status: Any, maximum: int) -> None:
    """Byte for byte, split into PDUs within the peer's maximum length as pynetdicom splits it."""
    request = C_STORE()
    request.MessageID = 513
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1234567"
    assoc = SimpleNamespace(requestor=SimpleNamespace(maximum_length=maximum))
    respond: Callable[..., list[bytes]] = store_fast_path._response
    assert respond(request, status, 5, assoc) == store_fast_path._pynetdicom_response(
        request, status, 5, assoc, maximum
    )


def test_a_store_sent_right_behind_the_association_accept_is_answered(
    listener: tuple[Ingest, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quick sender's first C-STORE can be taken before the association thread has marked the
    association established (found by tests/test_fuzz.py's valid cases): it is answered all the same.
    The association thread is held back here for a moment after the A-ASSOCIATE-AC has gone."""
    real = ACSE.send_accept

    def slow_accept(self: ACSE) -> None:
        real(self)
        time.sleep(0.5)

    monkeypatch.setattr(ACSE, "send_accept", slow_accept)
    ingest, port = listener
    store = b"".join(fuzz._store_pdus(random.Random(5)))
    steps = (
        fuzz.send(fuzz._valid_rq()),
        fuzz.EXPECT,
        fuzz.send(store),
        fuzz.EXPECT,
        fuzz.send(fuzz.RELEASE_RQ),
    )
    outcome = fuzz.play(fuzz.PduCase(5, "valid", steps), port, 20)
    assert outcome.answers[:2] == ["A-ASSOCIATE-AC", "P-DATA-TF"] and outcome.statuses == [SUCCESS], outcome
    assert len(stored(ingest)) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR AE")  # the non-ASCII title, on purpose
@pytest.mark.parametrize(
    "titles", [("AINODE", "STORESCU", "AINODE"), ("AINODE", "", "AINODE"), ("A", "ÄRZTE", "A")]
)
def test_the_received_meta_is_encoded_as_pydicom_encodes_it(
    slices: list[Path], titles: tuple[str, str, str]
) -> None:
    """The fast path writes a received file's meta without building it as a pydicom dataset first
    (that cost more than the encoding): byte for byte what pydicom writes, else left to pydicom."""
    meta = request_meta(slices[0])
    uids = (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID)
    (
        meta.SourceApplicationEntityTitle,
        meta.SendingApplicationEntityTitle,
        meta.ReceivingApplicationEntityTitle,
    ) = titles
    encoded = filemeta.received(*uids, titles)
    assert encoded == (None if not titles[1].isascii() else encode_file_meta(meta))
