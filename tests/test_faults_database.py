"""Issue 11, fault 2 and the second half of fault 10: a database outage loses nothing, and
reconciliation costs what is unindexed, not history.

Fault 2: PostgreSQL stopped for 8 s during a 150-instance send; all 150 were acknowledged, 74 indexed,
the series declared complete with 74 and nothing audited. The indexer now holds what it could not index
and tries again until the database is back; a series is not complete while an instance of it waits.
Fault 10: start-up reconciliation listed the whole spool and loaded every SOP Instance UID of history;
it now looks only into series folders changed since a durable watermark.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select, text

from node import audit
from node.config import Settings, StudySettings
from node.db import (
    CONNECT_TIMEOUT,
    AuditEvent,
    Database,
    Instance,
    Series,
    SeriesStatus,
    Study,
    open_database,
)
from node.ingest.accept import arrival_of
from node.ingest.completion import mark_stable
from node.ingest.index import DATABASE_UNAVAILABLE, Arrival, Indexer, index_arrivals
from node.ingest.reconcile import MARGIN, SETTLE, WATERMARK, Reconciler
from node.spool import Spool
from tests.peers import NodeProcess, dcmtk_env, free_port, wait_for
from training.ct_phantom import write_head_ct_series

pytestmark = pytest.mark.faults


class PostgresCluster:
    """A PostgreSQL server of the test's own (initdb, pg_ctl) on a free loopback port, which the test
    stops and starts as an outage would. initdb refuses root: as root it runs as ``postgres``."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.bin = Path(found[-1]).parent
        self.folder = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _pg(self, tool: str, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / tool), *args], check=check, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=mode == "fast")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    server = PostgresCluster()
    server.start()
    yield server
    server.remove()


STUDY = generate_uid()


def spooled(spool: Spool, series: str, sop: str | None = None) -> Arrival:
    """An instance in the spool, as the node writes one it received, and the arrival it makes."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "P1", "DOE^JANE"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = spool.instance_path(STUDY, series, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return arrival_of(path, path.stat().st_size, pydicom.dcmread(path, stop_before_pixels=True), "AINODE")


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look modified ``seconds`` ago, as history in the spool is."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def events(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def indexed(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def test_postgresql_stopped_during_a_send_loses_nothing(cluster: PostgresCluster, tmp_path: Path) -> None:
    files = write_head_ct_series(tmp_path / "study", 150, hemorrhage=False, seed=5, size=256)
    node = NodeProcess(
        tmp_path / "node",
        {"node": {"database_url": cluster.url, "reconcile_seconds": 1}, "study": {"stable_seconds": 2}},
    ).start()
    db = Database(cluster.url)
    try:
        sender = subprocess.Popen(
            # small PDUs stretch the send, so that the outage lands inside it
            ["storescu", "-v", "--max-send-pdu", "4096", "-aec", "AINODE", "-aet", "STORESCU"]
            + ["127.0.0.1", str(node.dicom_port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dcmtk_env(),
        )
        wait_for(lambda: indexed(db) >= 10, 60, "the first instances indexed", interval=0.05)
        db.dispose()
        cluster.stop()
        assert sender.poll() is None, "the outage should land mid-send"
        time.sleep(8)
        cluster.start()
        output, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0 and len(re.findall(r"Store Response \(Success\)", output)) == 150

        # Before the fix: 74 indexed, the series ready with 74, nothing audited.
        wait_for(lambda: events(db, "series.ready"), 60, "the series to be complete")
        assert [e.detail["instances"] for e in events(db, "series.ready")] == [150]
        assert indexed(db) == 150
        with db.session() as session:
            assert session.scalars(select(Series.instance_count)).one() == 150
        (outage,) = events(db, "index.outage")
        assert outage.detail["instances_waiting"] > 0 and outage.detail["error"] == "OperationalError"
        assert outage.detail["seconds"] > 0

        # While it runs, reconciliation finds a file the index missed (the indexer was full, say).
        missed = spooled(Spool(node.folder / "var"), generate_uid())
        age(missed.path, 2 * SETTLE)
        wait_for(lambda: indexed(db) == 151, 30, "the missed file to be indexed")
        assert [e.detail["sop_uid"] for e in events(db, "instance.reindexed")] == [missed.sop_uid]
    finally:
        node.stop()
        db.dispose()


def test_indexer_holds_what_it_cannot_index_until_the_database_is_back(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    db, spool, series = open_database(cluster.url), Spool(tmp_path), generate_uid()
    indexer = Indexer(db, StudySettings(), on_ready=lambda: None)
    indexer.start()
    try:
        cluster.stop()
        arrivals = [spooled(spool, series) for _ in range(5)]
        for arrival in arrivals:
            indexer.submit(arrival)
        time.sleep(2)  # a few tries fail
        assert indexer.unindexed().series_uids == {series}
        cluster.start()
        wait_for(lambda: not indexer.unindexed().paths, 30, "the indexer to catch up")
        assert indexed(db) == 5
        (outage,) = events(db, "index.outage")  # once, when the database was back
        assert outage.detail["instances_waiting"] == 5 and outage.outcome == "failure"
        assert audit.verify(db) is None
    finally:
        indexer.stop()
        db.dispose()


def test_a_node_stopping_during_an_outage_stops_and_indexes_at_the_next_start(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    db, spool, series = open_database(cluster.url), Spool(tmp_path), generate_uid()
    indexer = Indexer(db, StudySettings(), on_ready=lambda: None)
    indexer.start()
    cluster.stop()
    arrivals = [spooled(spool, series) for _ in range(3)]
    for arrival in arrivals:
        indexer.submit(arrival)
    time.sleep(1)
    began = time.monotonic()
    indexer.stop()
    assert time.monotonic() - began < 5  # not waiting for a database that does not answer
    assert all(arrival.path.is_file() for arrival in arrivals)
    cluster.start()
    reconciled = Reconciler(Settings(), db, spool, Indexer(db, StudySettings(), lambda: None)).at_start()
    assert (reconciled.found, reconciled.indexed) == (3, 3) and indexed(db) == 3
    db.dispose()


def test_a_series_with_instances_not_yet_indexed_is_not_complete(db: Database, tmp_path: Path) -> None:
    spool, series, study = Spool(tmp_path), generate_uid(), StudySettings(stable_seconds=0)
    index_arrivals(db, [spooled(spool, series) for _ in range(3)], study)
    indexer = Indexer(db, study, on_ready=lambda: None)
    for _ in range(2):
        indexer.submit(spooled(spool, series))  # acknowledged; the database has not seen them yet
    assert mark_stable(db, study, indexer.unindexed()) == 0
    with db.session() as session:
        assert session.scalars(select(Series.status)).one() == SeriesStatus.RECEIVING
        assert session.scalars(select(Study.stable_at)).one() is None
    indexer.start()
    indexer.stop()
    assert mark_stable(db, study, indexer.unindexed()) == 1
    assert [e.detail["instances"] for e in events(db, "series.ready")] == [5]


def history(spool: Spool, db: Database, series_count: int, per_series: int) -> list[str]:
    """Series indexed long ago: files and folders modified two margins before now."""
    uids = [generate_uid() for _ in range(series_count)]
    for series in uids:
        index_arrivals(db, [spooled(spool, series) for _ in range(per_series)], StudySettings())
        folder = spool.incoming / STUDY / series
        for file in folder.iterdir():
            age(file, 2 * MARGIN)
        age(folder, 2 * MARGIN)
    return uids


def test_reconciliation_looks_only_at_what_changed_since_its_watermark(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = history(spool, db, 4, 5)
    reconciler = Reconciler(Settings(), db, spool, Indexer(db, StudySettings(), lambda: None))
    first = reconciler.at_start()  # no watermark yet: the whole spool, once
    assert (first.folders, first.found) == (4, 0)
    assert (spool.root / WATERMARK).is_file()

    # The node died with three acknowledged instances unindexed: two of a new series, one of an old one.
    new_series = generate_uid()
    lost = [spooled(spool, new_series), spooled(spool, new_series), spooled(spool, old[0])]
    again = reconciler.at_start()
    assert (again.folders, again.found, again.indexed) == (2, 3, 3)  # not the three untouched series
    assert indexed(db) == 23
    assert {e.detail["sop_uid"] for e in events(db, "instance.reindexed")} == {a.sop_uid for a in lost}

    # A watermark the clock has not reached (it went back), or none (removed after restoring the
    # database from a backup): the whole spool again.
    (spool.root / WATERMARK).write_text(f"{time.time() + 3600}\n")
    assert reconciler.at_start().folders == 5
    (spool.root / WATERMARK).unlink()
    assert reconciler.at_start().folders == 5


def test_a_file_whose_sop_instance_uid_is_indexed_in_another_series_is_not_taken_as_known(
    db: Database, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    first = spooled(spool, generate_uid())
    index_arrivals(db, [first], StudySettings())
    spooled(spool, generate_uid(), sop=first.sop_uid)  # written, never indexed: a UID conflict
    found = Reconciler(Settings(), db, spool, Indexer(db, StudySettings(), lambda: None)).at_start()
    assert found.found == 1


def test_a_periodic_pass_hands_the_indexer_what_it_missed(db: Database, tmp_path: Path) -> None:
    spool, series = Spool(tmp_path), generate_uid()
    indexer = Indexer(db, StudySettings(), lambda: None)
    reconciler = Reconciler(Settings(), db, spool, indexer)
    missed, young, held = (spooled(spool, series) for _ in range(3))
    age(missed.path, 2 * SETTLE)  # refused as the indexer was full; the sender may never come back
    age(held.path, 2 * SETTLE)
    indexer.submit(held)  # the indexer holds it (waiting for the database, say)
    passed = reconciler.periodic()
    assert (passed.found, passed.indexed) == (1, 1)  # `young` is left to the arrival writing it
    assert indexer.unindexed().paths == {missed.path, held.path}
    watermark = float((spool.root / WATERMARK).read_text())
    assert watermark <= (indexer.unindexed().since or 0)  # not past what is still unindexed
    indexer.start()
    indexer.stop()
    assert indexed(db) == 2 and events(db, "instance.reindexed")[0].detail["sop_uid"] == missed.sop_uid
    age(young.path, 2 * SETTLE)
    assert reconciler.periodic().indexed == 1


def test_a_file_a_pass_handed_over_is_found_again_if_the_node_dies_before_indexing_it(
    db: Database, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    old = spooled(spool, generate_uid())
    age(old.path, 3600)  # stored an hour ago, while the indexer was full; unindexed since
    reconciler = Reconciler(Settings(), db, spool, Indexer(db, StudySettings(), lambda: None))
    assert reconciler.periodic().indexed == 1  # handed to an indexer that never gets to it (the
    assert reconciler.periodic().found == 0  # database is down), the file held meanwhile
    # The node dies. Before the fix the watermark had passed the file: every later pass skipped it.
    restarted = Reconciler(Settings(), db, spool, Indexer(db, StudySettings(), lambda: None))
    assert restarted.at_start().indexed == 1
    assert indexed(db) == 1


def test_a_file_accepted_under_a_size_cap_lowered_since_is_still_indexed(
    db: Database, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    accepted = spooled(spool, generate_uid())  # acknowledged, then the node died before indexing it
    with accepted.path.open("ab") as file:  # 2 MB more of data set: a private OB element
        file.write(struct.pack("<HH2sHL", 0x0029, 0x1010, b"OB", 0, 2 * 2**20) + bytes(2 * 2**20))
    lowered = Settings.model_validate({"node": {"max_instance_mb": 1}})  # by the admin, since
    reconciler = Reconciler(lowered, db, spool, Indexer(db, StudySettings(), lambda: None))
    assert reconciler.at_start().indexed == 1  # before the fix: "unreadable", and never indexed
    assert not events(db, "instance.unreadable")


def test_a_silent_database_host_is_given_up_on_in_seconds() -> None:
    """A PostgreSQL host that accepts the TCP connection and then says nothing (a black-holed or hung
    server) must not hold every C-STORE's UID check for the minutes TCP would wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever answers
        db = Database(f"postgresql+psycopg://ainode@127.0.0.1:{silent.getsockname()[1]}/ainode")
        start = time.perf_counter()
        with pytest.raises(DATABASE_UNAVAILABLE), db.session() as session:
            session.execute(text("SELECT 1"))
        db.dispose()
    assert time.perf_counter() - start < CONNECT_TIMEOUT + 5
