"""Issue 11, fault 5: the listener could be exhausted from outside — 10 idle TCP connections took every
association slot for 29 s, 10 senders trickling one byte every 3 s after announcing a 4 GB PDU held every
slot for a whole 40 s test, and 300 idle sockets made 377 threads. Also the listener's access control:
calling AEs tied to addresses, refusals audited once per source per interval, unknown SOP classes."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select as sql_select

from node.config import NodeSettings
from node.db import AuditEvent, Database
from node.dicom.limits import GuardedAE, ListenerGuard
from node.ingest.refusals import Refusal, RefusalLog
from tests.peers import NodeProcess, echoscu, free_port, storescu, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.10.543.99.1"  # no standard storage SOP class


def write_instance(path: Path, sop_class: str = SecondaryCaptureImageStorage) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "LISTENER1", "Test^Listener", "OT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def healthz(node: NodeProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{node.url}/healthz", timeout=5) as response:
            return dict(json.load(response))
    except urllib.error.HTTPError as error:  # 503: unhealthy or saturated, the body says which
        return dict(json.load(error))


def threads(node: NodeProcess) -> int:
    assert node.process is not None
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def refusals(node: NodeProcess, action: str = "association.rejected") -> list[dict[str, Any]]:
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    try:
        with db.session() as session:
            events = session.scalars(sql_select(AuditEvent).where(AuditEvent.action == action))
            return [dict(event.detail) for event in events]
    finally:
        db.dispose()


class Tricklers:
    """Slow senders: each connects from its own source address, announces a PDU of ``announce`` bytes
    and then sends one byte every ``every`` seconds; records when the node closed each."""

    def __init__(self, port: int, sources: Sequence[str], announce: int, every: float = 1.0) -> None:
        self.sockets: list[socket.socket] = []
        for source in sources:
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(struct.pack(">BBL", 0x01, 0, announce))
            self.sockets.append(sock)
        self.closed: dict[int, bytes] = {}  # socket index: what the node sent before closing
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        received = {i: b"" for i in range(len(self.sockets))}
        next_byte = time.monotonic() + self._every
        while not self._stop.is_set():
            open_ones = [s for i, s in enumerate(self.sockets) if i not in self.closed]
            if not open_ones:
                return
            for sock in select.select(open_ones, [], [], 0.1)[0]:
                i = self.sockets.index(sock)
                try:
                    data = sock.recv(100)
                except OSError:
                    data = b""
                if data:
                    received[i] += data
                else:
                    self.closed[i] = received[i]
            if time.monotonic() >= next_byte:
                next_byte += self._every
                for sock in open_ones:
                    with contextlib.suppress(OSError):  # closed by the node: seen by the read above
                        sock.send(b"\x00")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    return write_instance(tmp_path / "sc.dcm")


def until_echo_succeeds(node: NodeProcess, bound: float) -> float:
    """Seconds until a real C-ECHO (dcmtk echoscu) succeeds, retried within ``bound``."""
    start = time.monotonic()
    while echoscu(node.dicom_port).returncode != 0:
        assert time.monotonic() - start < bound, "C-ECHO never succeeded"
        time.sleep(0.2)
    return time.monotonic() - start


def test_trickling_senders_are_cut_at_the_pdu_deadline(tmp_path: Path, instance: Path) -> None:
    """Ten senders from ten addresses each hold a slot: every slot is taken (healthz: saturated) until the
    PDU deadline cuts them, then real senders get in."""
    node = NodeProcess(
        tmp_path / "node",
        {"node": {"max_associations": 10, "pdu_seconds": 3, "association_setup_seconds": 30}},
    ).start()
    tricklers = Tricklers(node.dicom_port, [f"127.0.0.{i}" for i in range(2, 12)], announce=1000)
    try:
        started = time.monotonic()
        health = wait_for(lambda: (h := healthz(node))["dicom_saturated"] and h, 3, "every slot taken")
        assert health["status"] == "saturated" and health["dicom_connections"] == 10, health
        seconds = until_echo_succeeds(node, bound=10)
        store = storescu(node.dicom_port, [instance])
        assert store.returncode == 0, store.stdout + store.stderr
        wait_for(lambda: len(tricklers.closed) == 10, 10, "every trickler cut")
        elapsed = time.monotonic() - started
        print(f"C-ECHO after {seconds:.1f} s; tricklers all cut and C-STORE done {elapsed:.1f} s after start")
        # each was told why: an A-ABORT from the service provider before the connection closed
        assert all(data.startswith(b"\x07") for data in tricklers.closed.values()), tricklers.closed
        assert healthz(node)["status"] == "ok"
        wait_for(lambda: any("not complete" in r["reason"] for r in refusals(node)), 10, "the cut audited")
    finally:
        tricklers.stop()
        node.stop()


def test_one_address_cannot_take_every_slot(tmp_path: Path, instance: Path) -> None:
    """With deadlines far off, the per-address limit alone keeps room for everyone else; the refused are
    answered A-ASSOCIATE-RJ (transient, local limit exceeded) and audited once per interval."""
    node = NodeProcess(
        tmp_path / "node",
        {"node": {"max_associations": 10, "max_associations_per_address": 5, "refusal_audit_seconds": 2}},
    ).start()
    tricklers = Tricklers(node.dicom_port, ["127.0.0.2"] * 10, announce=1000)
    try:
        wait_for(lambda: len(tricklers.closed) == 5, 5, "the five over the limit refused")
        assert all(data == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02" for data in tricklers.closed.values())
        assert healthz(node)["dicom_connections"] == 5
        start = time.monotonic()
        assert echoscu(node.dicom_port).returncode == 0
        store = storescu(node.dicom_port, [instance])
        assert store.returncode == 0, store.stdout + store.stderr
        assert time.monotonic() - start < 5
        wait_for(lambda: sum(r["count"] for r in refusals(node)) == 5, 10, "all five refusals counted")
        rows = refusals(node)
        assert 1 < len(rows) < 5, rows  # the first at once, the rest as one count
        assert {r["address"] for r in rows} == {"127.0.0.2"}
        assert {r["reason"] for r in rows} == {"too many connections from this address"}
    finally:
        tricklers.stop()
        node.stop()


def test_senders_announcing_4gb_pdus_are_aborted_at_once(tmp_path: Path, instance: Path) -> None:
    """The issue's case: ten senders announce a 4 GB PDU and trickle a byte every 3 s, with
    network_timeout = 5 and every other setting at its default."""
    node = NodeProcess(tmp_path / "node", {"node": {"network_timeout": 5}}).start()
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    start = time.monotonic()
    tricklers = Tricklers(node.dicom_port, sources, announce=2**32 - 1, every=3)
    try:
        wait_for(lambda: len(tricklers.closed) == 10, 5, "all ten aborted")  # a bound on a hang
        print(f"ten 4 GB announcements aborted within {time.monotonic() - start:.1f} s")
        # A-ABORT, source: service provider, reason: invalid PDU parameter value
        assert set(tricklers.closed.values()) == {b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"}
        assert echoscu(node.dicom_port).returncode == 0
        store = storescu(node.dicom_port, [instance])
        assert store.returncode == 0, store.stdout + store.stderr
        assert time.monotonic() - start < 10
    finally:
        tricklers.stop()
        node.stop()


def test_idle_sockets_cost_no_threads_and_expire(tmp_path: Path) -> None:
    node = NodeProcess(
        tmp_path / "node", {"node": {"max_associations": 10, "association_setup_seconds": 10}}
    ).start()
    baseline = threads(node)
    idle: list[socket.socket] = []
    try:
        start = time.monotonic()
        for i in range(300):
            sock = socket.socket()
            sock.bind((f"127.0.1.{i % 60 + 1}", 0))  # 60 addresses, 5 each: only the total limit holds
            sock.connect(("127.0.0.1", node.dicom_port))
            idle.append(sock)
        connected = time.monotonic() - start
        time.sleep(1)
        peak = threads(node)
        print(f"threads: {baseline} before, {peak} with 300 idle sockets open (connects: {connected:.1f} s)")
        assert peak <= baseline + 2 * 10 + 5  # two per admitted connection (association, DUL)
        assert healthz(node)["dicom_connections"] == 10
        # the set-up deadline frees the slots; the idle sockets cannot hold them
        wait_for(lambda: healthz(node)["dicom_connections"] == 0, 20, "idle connections closed")
        print(f"idle connections all closed {time.monotonic() - start:.1f} s after the first")
        assert echoscu(node.dicom_port).returncode == 0
    finally:
        for sock in idle:
            sock.close()
        node.stop()


def test_calling_ae_tied_to_addresses(tmp_path: Path, instance: Path) -> None:
    allowed: list[Any] = [
        {"ae_title": "ECHOSCU", "addresses": ["127.0.0.0/8"]},
        {"ae_title": "STORESCU", "addresses": ["10.20.0.0/16", "192.168.7.7"]},
    ]
    node = NodeProcess(tmp_path / "node", {"node": {"allowed_calling_aets": allowed}}).start()
    try:
        assert echoscu(node.dicom_port).returncode == 0
        run = storescu(node.dicom_port, [instance])
        assert run.returncode != 0
        assert "Rejected" in run.stdout + run.stderr
        wait_for(lambda: refusals(node), 10, "the rejection audited")
        (row,) = refusals(node)
        assert row["reason"] == "calling AE not allowed from this address"
        assert row["address"] == "127.0.0.1"
    finally:
        node.stop()


def test_refusals_are_audited_and_logged_once_per_interval(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", {"node": {"refusal_audit_seconds": 3}}).start()
    try:
        for _ in range(20):
            assert echoscu(node.dicom_port, called="SOMEONE").returncode != 0
        wait_for(lambda: sum(r["count"] for r in refusals(node)) == 20, 15, "all 20 counted")
        rows = refusals(node)
        assert len(rows) <= 3, rows
        assert rows[0]["reason"] == "called AE 'SOMEONE' is not this node's"
        lines = [line for line in node.log.read_text().splitlines() if "association.rejected from" in line]
        assert len(lines) == len(rows)
    finally:
        node.stop()


@pytest.fixture
def private_instance(tmp_path: Path) -> Path:
    return write_instance(tmp_path / "private.dcm", PRIVATE_SOP_CLASS)


def propose_private(folder: Path) -> list[str]:
    """storescu proposes only SOP classes dcmtk knows, unless a profile names the others."""
    profile = folder / "private.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Explicit]\nTransferSyntax1 = LittleEndianExplicit\n"
        f"[[PresentationContexts]]\n[Private]\nPresentationContext1 = {PRIVATE_SOP_CLASS}\\Explicit\n"
        "[[Profiles]]\n[Private]\nPresentationContexts = Private\n"
    )
    return ["-xf", str(profile), "Private"]


@pytest.mark.parametrize("policy", ["accept", "refuse"])
def test_unknown_sop_classes(tmp_path: Path, private_instance: Path, policy: str) -> None:
    node = NodeProcess(tmp_path / "node", {"node": {"unknown_sop_classes": policy}}).start()
    try:
        run = storescu(node.dicom_port, [private_instance], extra=propose_private(tmp_path))
        accepted: Iterator[dict[str, Any]]
        if policy == "accept":
            assert run.returncode == 0, run.stdout + run.stderr
            wait_for(lambda: list((node.folder / "var" / "incoming").rglob("*.dcm")), 10, "the file spooled")
        else:
            assert run.returncode != 0
            assert "no acceptable presentation contexts" in (run.stdout + run.stderr).lower()
            wait_for(lambda: refusals(node, "association.accepted"), 10, "the association audited")
            accepted = iter(refusals(node, "association.accepted"))
            assert next(accepted)["refused_sop_classes"] == [PRIVATE_SOP_CLASS]
            assert not list((node.folder / "var" / "incoming").rglob("*.dcm"))
    finally:
        node.stop()


def test_a_connection_whose_association_cannot_start_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads exhausted (a container's pids limit): pynetdicom cannot start an admitted connection's
    association. The connection is closed, and its slot must be free again, else each such moment takes
    one for good until the listener refuses everyone."""
    settings = NodeSettings(max_associations=2, association_setup_seconds=5)
    guard = ListenerGuard(settings, lambda host, reason: None)
    ae = GuardedAE(settings.ae_title, guard)
    ae.add_supported_context(Verification)

    def no_thread(self: Association) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Association, "start", no_thread)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, guard.adopt)]
    )
    assert server is not None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert sock.recv(1) == b""  # closed by the node
        wait_for(lambda: guard.load().connections == 0, 5, "the slot freed")
    finally:
        server.shutdown()


def test_refusals_of_each_kind_are_counted_under_their_own_action() -> None:
    """A source refused over TLS and on the plain port within one interval: each audit action counts its
    own refusals, none is written as the other kind."""
    written: list[Refusal] = []
    log = RefusalLog(written.append, interval=60)
    log.start()
    log.note("10.0.0.9", "TLS handshake failed: TimeoutError", action="association.tls_refused")
    log.note("10.0.0.9", "calling AE not allowed", "CT1")
    log.note("10.0.0.9", "TLS handshake failed: TimeoutError", action="association.tls_refused")
    log.stop()
    counts: dict[str, int] = {}
    for refusal in written:
        counts[refusal.action] = counts.get(refusal.action, 0) + refusal.count
    assert counts == {"association.tls_refused": 2, "association.rejected": 1}, written
    assert {r.reason for r in written if r.action == "association.rejected"} == {"calling AE not allowed"}


def test_one_remote_port_to_both_listeners_counts_twice() -> None:
    """The limits count across listeners, so a peer that connects from one source port to both (the plain
    and the TLS port) holds two connections: both count, and a third from its address is refused."""
    settings = NodeSettings(max_associations_per_address=2, association_setup_seconds=5)
    guard = ListenerGuard(settings, lambda host, reason: None)
    ae = GuardedAE(settings.ae_title, guard)
    ae.add_supported_context(Verification)
    ports = [free_port(), free_port()]
    handlers = [(evt.EVT_CONN_OPEN, guard.adopt)]
    servers = [ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers) for port in ports]
    held: list[socket.socket] = []
    try:
        source = free_port()
        for port in ports:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.2", source))
            sock.connect(("127.0.0.1", port))
            held.append(sock)
        wait_for(lambda: guard.load().connections == 2, 5, "both connections counted")
        with socket.create_connection(
            ("127.0.0.1", ports[0]), timeout=5, source_address=("127.0.0.2", 0)
        ) as third:
            assert third.recv(1) == b"\x03"  # A-ASSOCIATE-RJ: over the per-address limit
    finally:
        for sock in held:
            sock.close()
        for server in servers:
            assert server is not None
            server.shutdown()
