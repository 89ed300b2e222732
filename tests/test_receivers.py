"""Several receiver processes on one port (``[node] receivers = 2``), against real dcmtk senders: every
instance acknowledged is indexed by the node's one indexer, the processes share the connections, the
limits are the node's, a process killed is started again, and the node's stop ends them all."""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from node.config import NodeSettings
from node.db import AuditEvent, Database, Instance, Series, SeriesStatus
from node.dicom.limits import ListenerGuard
from node.ingest.receivers import SharedConnections
from tests.peers import NodeProcess, dcmtk_tls, echoscu, free_port, storescu, wait_for
from tests.test_tls import Pki, tls_section
from tests.test_tls import pki as pki  # noqa: F401 - the fixture, for the TLS test here
from training.ct_phantom import write_head_ct_series

A_ASSOCIATE_RJ = 0x03


def sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


class Receiving:
    """A node with two receiver processes, and what its database says."""

    def __init__(self, folder: Path, database_url: str, tls: Pki | None = None, **node: Any) -> None:
        settings: dict[str, Any] = {
            "node": {"receivers": 2, "database_url": database_url, **node},
            "study": {"stable_seconds": 600, "forwarders": ["FORWARDER"]},  # no quiet period in a test
        }
        if tls is not None:
            settings["tls"] = tls_section(tls, dicom_port=free_port(), require_client_cert=True)
        self.node = NodeProcess(folder, settings, ca=tls.ca if tls else None).start()
        self.db = Database(database_url)

    def stop(self) -> None:
        self.node.stop()
        self.db.dispose()

    def indexed(self) -> set[str]:
        with self.db.session() as session:
            return set(session.scalars(select(Instance.sop_uid)))

    def audited(self, action: str) -> list[dict[str, Any]]:
        with self.db.session() as session:
            events = session.scalars(select(AuditEvent).where(AuditEvent.action == action))
            return [dict(event.detail) for event in events]

    def series_status(self) -> dict[str, SeriesStatus]:
        with self.db.session() as session:
            return {s.series_uid: s.status for s in session.scalars(select(Series))}

    def receiver_pids(self) -> set[int]:
        """The receiver processes: the node's children that accepted an association (the audit entry
        of each association says which process took it)."""
        return {int(detail["process"]) for detail in self.audited("association.accepted")}


def test_the_shared_table_makes_the_limits_the_nodes(tmp_path: Path) -> None:
    """Two processes' views of the table (rows 0 and 1): each counts the other's connections against
    the node's limits, and leaves the next connection to the one holding fewer."""
    first = SharedConnections(2, 4, tmp_path / "receivers.lock")
    second = copy.copy(first)  # what a spawned process gets: the same shared memory
    first.row, second.row = 0, 1
    node = NodeSettings(max_associations=3, max_associations_per_address=2)
    guard = ListenerGuard(node, lambda host, reason: None, elsewhere=second)
    with first.locked():
        first.publish(["10.0.0.1", "10.0.0.1"])
    assert second.count("10.0.0.1") == (2, 2) and second.count("10.0.0.2") == (2, 0)
    with socket.socket() as request:
        assert guard.admit(request, ("10.0.0.1", 5000, 104)) == "too many connections from this address"
        assert guard.admit(request, ("10.0.0.2", 5000, 104)) is None
        assert guard.admit(request, ("10.0.0.3", 5000, 104)) == "too many connections"
        assert first.count("10.0.0.2") == (1, 1)  # the second published what it admitted
        assert guard.load().connections == 3
        first.listen()
        second.listen()
        assert first.fewer_than(2) and not second.fewer_than(2)  # the second holds 1, the first 2
    assert guard.load().connections == 2  # its connection closed: taken off the table
    assert first.count("10.0.0.2") == (0, 0)
    second.clear(1)  # the second process ended: nothing is left to it, its connections are gone
    assert not first.fewer_than(2)


@pytest.fixture
def receiving(tmp_path: Path, database_url: str) -> Iterator[Receiving]:
    node = Receiving(tmp_path / "node", database_url)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    folder = tmp_path_factory.mktemp("series")
    return [
        write_head_ct_series(folder / f"ct{n}", 12, hemorrhage=False, seed=40 + n, size=128) for n in range(4)
    ]


def held_association(port: int) -> Any:
    """An association kept open (a sender between two studies): the process holding it leaves the next
    connection to the other."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    return assoc


@pytest.mark.slow
def test_senders_at_once_are_all_indexed_and_forwarded_series_complete(
    receiving: Receiving, series: list[list[Path]]
) -> None:
    node = receiving.node
    holder = held_association(node.dicom_port)
    try:
        runs: list[Any] = [None] * len(series)
        callers = ["FORWARDER", "STORESCU", "STORESCU", "STORESCU"]

        def send(n: int) -> None:
            runs[n] = storescu(node.dicom_port, series[n], calling=callers[n])

        senders = [threading.Thread(target=send, args=(n,)) for n in range(len(series))]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert [run.returncode for run in runs] == [0] * len(series), [run.stderr for run in runs]
    finally:
        holder.release()
    sent = set().union(*(sop_uids(files) for files in series))
    wait_for(lambda: receiving.indexed() == sent, 30, "every acknowledged instance indexed")
    # The forwarder's series is complete on its association's release, not after 600 s of quiet.
    forwarded = str(pydicom.dcmread(series[0][0], stop_before_pixels=True).SeriesInstanceUID)
    wait_for(
        lambda: receiving.series_status()[forwarded] != SeriesStatus.RECEIVING, 30, "the forwarded series"
    )
    others = {s for s in receiving.series_status() if s != forwarded}
    assert {receiving.series_status()[s] for s in others} == {SeriesStatus.RECEIVING}
    pids = receiving.receiver_pids()
    assert len(pids) == 2, pids  # both processes took associations
    assert node.process is not None and node.process.pid not in pids
    receiving.stop()  # SIGTERM: the node stops its receiver processes
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def acknowledged(run: subprocess.CompletedProcess[str]) -> set[Path]:
    """The files storescu was answered Success for (its verbose log, file by file)."""
    done, sending = set(), None
    for line in (run.stdout + run.stderr).splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            sending = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and sending is not None:
            done.add(sending)
    return done


@pytest.fixture(scope="module")
def long_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Long enough to be mid-transfer when the receiving process is killed."""
    return write_head_ct_series(tmp_path_factory.mktemp("long"), 200, hemorrhage=False, seed=7, size=256)


@pytest.mark.slow
def test_a_killed_receiver_process_is_restarted_and_nothing_acknowledged_is_lost(
    tmp_path: Path, long_series: list[Path]
) -> None:
    receiving = Receiving(tmp_path / "node", f"sqlite:///{tmp_path / 'node' / 'ainode.db'}")
    try:
        node = receiving.node
        runs: list[subprocess.CompletedProcess[str]] = []
        sender = threading.Thread(target=lambda: runs.append(storescu(node.dicom_port, long_series)))
        sender.start()
        wait_for(lambda: len(receiving.indexed()) >= 5, 60, "the transfer under way", interval=0.02)
        (victim,) = receiving.receiver_pids()
        os.kill(victim, signal.SIGKILL)  # mid-association, mid-instance
        sender.join()
        acked = sop_uids(sorted(acknowledged(runs[0])))
        assert acked, runs[0].stdout
        wait_for(lambda: acked <= receiving.indexed(), 30, "every acknowledged instance indexed")
        restarted = wait_for(lambda: receiving.audited("receiver.restarted"), 30, "the restart audited")
        assert restarted[0]["pid"] == victim and restarted[0]["exit_code"] == -signal.SIGKILL
        again = storescu(node.dicom_port, long_series)  # the node kept answering
        assert again.returncode == 0, again.stdout + again.stderr
        wait_for(lambda: receiving.indexed() == sop_uids(long_series), 60, "the series indexed whole")
        folder = tmp_path / "node" / "var" / "receiving"  # the killed one's partial data set went too
        wait_for(lambda: not [f for f in folder.rglob("*") if f.is_file()], 10, "nothing left half-received")
    finally:
        receiving.stop()


@pytest.mark.slow
def test_the_limits_count_every_process(tmp_path: Path) -> None:
    """``max_associations`` is the node's: three idle connections (spread over both processes) take
    every slot, the fourth is refused whichever process takes it, and /healthz counts all three."""
    receiving = Receiving(
        tmp_path / "node",
        f"sqlite:///{tmp_path / 'node' / 'ainode.db'}",
        max_associations=3,
        association_setup_seconds=8,  # then the idle connections are closed: the slots free again
    )
    idle: list[socket.socket] = []
    try:
        node = receiving.node
        for count in (1, 2, 3):
            idle.append(socket.create_connection(("127.0.0.1", node.dicom_port)))
            wait_for(lambda: node_connections(node) == count, 10, "the connection counted")  # noqa: B023
        with socket.create_connection(("127.0.0.1", node.dicom_port), timeout=10) as fourth:
            assert fourth.recv(1)[0] == A_ASSOCIATE_RJ
        assert echoscu(node.dicom_port).returncode != 0
        wait_for(lambda: node_connections(node) == 0, 30, "the idle connections closed")
        assert echoscu(node.dicom_port).returncode == 0
    finally:
        for conn in idle:
            conn.close()
        receiving.stop()


def node_connections(node: NodeProcess) -> int:
    return int(httpx.get(f"{node.url}/healthz", timeout=5).json()["dicom_connections"])


@pytest.mark.slow
def test_the_tls_port_is_served_by_the_receiver_processes(
    tmp_path: Path, request: pytest.FixtureRequest, series: list[list[Path]]
) -> None:
    certificates: Pki = request.getfixturevalue("pki")
    receiving = Receiving(tmp_path / "node", f"sqlite:///{tmp_path / 'node' / 'ainode.db'}", certificates)
    try:
        node = receiving.node
        cert, key = certificates.client
        shown = dcmtk_tls(key, cert, certificates.ca)
        stored = storescu(int(node.settings["tls"]["dicom_port"]), series[0], extra=shown)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        wait_for(lambda: receiving.indexed() == sop_uids(series[0]), 30, "the series indexed")
        assert node.process is not None and node.process.pid not in receiving.receiver_pids()
        assert echoscu(node.dicom_port).returncode == 0  # and the plain port beside it
    finally:
        receiving.stop()
