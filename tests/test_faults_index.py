"""Issue 11, fault 3: an acknowledged instance the database cannot index (a NUL byte in PatientName on
PostgreSQL) must neither be lost nor stop the node: what the database cannot store is stripped, and a
file that still cannot be indexed is set aside and audited while the rest are indexed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import audit
from node.config import Settings, StudySettings
from node.db import AuditEvent, Database, Instance, Patient, Series, SeriesStatus, Study
from node.ingest import index
from node.ingest.accept import Ingest, Origin
from node.ingest.completion import mark_stable
from node.ingest.index import QUARANTINE, Arrival, Indexed, Indexer
from node.ingest.reconcile import Reconciler
from node.spool import Spool

pytestmark = pytest.mark.faults

STUDY, SERIES = generate_uid(), generate_uid()
ORIGIN = Origin(calling_ae="MODALITY", called_ae="AINODE", address="127.0.0.1")


def dataset(name: str, description: str) -> Dataset:
    """One CT instance of the study, with the meta information it is sent with."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.Modality, ds.PatientID, ds.PatientName, ds.StudyDescription = "CT", "P1", name, description
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def instance(name: str = "DOE^JANE", description: str = "HEAD CT") -> tuple[FileMetaDataset, bytes]:
    """An instance as a sender hands it to :meth:`Ingest.accept`: meta information and data set."""
    ds = dataset(name, description)
    data = encode(ds, False, True)
    assert data is not None
    return ds.file_meta, data


def ingest(db: Database, tmp_path: Path) -> Ingest:
    spool = Spool(tmp_path / "data")
    return Ingest(Settings(), db, spool, Indexer(db, StudySettings(stable_seconds=0), on_ready=lambda: None))


def reconcile(node: Ingest) -> int:
    """Reconciliation at start; how many spool files it indexed."""
    return Reconciler(node.settings, node.db, node.spool, node.indexer).at_start().indexed


def spooled(node: Ingest, name: str = "DOE^JANE", description: str = "HEAD CT") -> Path:
    """An instance in the spool the index never saw: acknowledged, then the node died (or failed)
    before indexing it."""
    ds = dataset(name, description)
    path = node.spool.instance_path(STUDY, SERIES, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def actions(db: Database) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent.action)))


def indexed_uids(db: Database) -> set[str]:
    with db.session() as session:
        return set(session.scalars(select(Instance.sop_uid)))


def poison(monkeypatch: pytest.MonkeyPatch, sop_uid: str, error: Exception) -> None:
    """Make indexing fail, with ``error``, for the one instance ``sop_uid``."""
    real = index.index_arrival

    def failing(session: Session, arrival: Arrival, study_settings: StudySettings, *known: Any) -> Indexed:
        if arrival.sop_uid == sop_uid:
            raise error
        return real(session, arrival, study_settings, *known)

    monkeypatch.setattr(index, "index_arrival", failing)


def test_nul_in_text_is_indexed_and_its_series_becomes_ready(db: Database, tmp_path: Path) -> None:
    node = ingest(db, tmp_path)
    node.indexer.start()
    arrivals = [node.accept(*instance("A\x00B", "HEAD\x00CT"), ORIGIN) for _ in range(3)]
    node.indexer.stop()
    assert indexed_uids(db) == {a.sop_uid for a in arrivals}
    assert mark_stable(db, StudySettings(stable_seconds=0)) == 1
    with db.session() as session:
        assert session.scalars(select(Patient.patient_name)).one() == "AB"
        assert session.scalars(select(Study.description)).one() == "HEADCT"
        assert session.scalars(select(Series.status)).one() == SeriesStatus.READY
    assert "instance.set_aside" not in actions(db)
    # The spool keeps the instance exactly as it was sent.
    assert str(dcmread(arrivals[0].path, stop_before_pixels=True).PatientName) == "A\x00B"


def test_reconcile_at_start_indexes_a_file_with_nul(db: Database, tmp_path: Path) -> None:
    node = ingest(db, tmp_path)
    path = spooled(node, "A\x00B", "HEAD\x00CT")
    assert reconcile(node) == 1  # before the fix: raised on PostgreSQL, and `ainode serve` exited 1
    assert indexed_uids(db) == {path.stem}
    assert actions(db).count("instance.reindexed") == 1
    assert reconcile(node) == 0


def test_reconcile_sets_aside_a_file_that_cannot_be_indexed(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    paths = [spooled(node) for _ in range(3)]
    bad = paths[1]
    poison(monkeypatch, bad.stem, ValueError("cannot store this"))
    assert reconcile(node) == 2  # the other two are indexed; nothing raised
    assert indexed_uids(db) == {paths[0].stem, paths[2].stem}
    quarantined = node.spool.root / QUARANTINE / bad.relative_to(node.spool.incoming)
    assert not bad.exists() and quarantined.is_file()  # kept, out of the way of every next start
    with db.session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.set_aside")).one()
    assert event.detail["sop_uid"] == bad.stem and event.detail["moved_to"] == str(quarantined)
    assert event.detail["reason"] == "cannot be indexed: ValueError" and event.outcome == "failure"
    assert reconcile(node) == 0 and actions(db).count("instance.set_aside") == 1
    assert audit.verify(db) is None


def test_indexer_sets_aside_what_it_cannot_index_and_carries_on(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    arrivals = [node.accept(*instance(), ORIGIN) for _ in range(3)]
    bad = arrivals[1]
    poison(monkeypatch, bad.sop_uid, ValueError("cannot store this"))
    node.indexer.start()  # the three in one batch: it fails, then each is tried alone
    node.indexer.stop()
    assert indexed_uids(db) == {arrivals[0].sop_uid, arrivals[2].sop_uid}
    assert not bad.path.exists()
    assert (node.spool.root / QUARANTINE / bad.path.relative_to(node.spool.incoming)).is_file()
    assert actions(db).count("instance.set_aside") == 1


def test_database_failure_is_not_blamed_on_the_file(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    path = spooled(node)
    poison(monkeypatch, path.stem, sa_exc.OperationalError("INSERT", {}, Exception("server closed")))
    with pytest.raises(sa_exc.OperationalError):
        reconcile(node)  # a node without its database does not start; the file waits in the spool
    assert path.is_file() and "instance.set_aside" not in actions(db)


def test_a_file_gone_before_it_is_set_aside_does_not_stop_the_indexer(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    arrivals = [node.accept(*instance(), ORIGIN) for _ in range(3)]
    bad = arrivals[1]
    real, tries = index.index_arrival, []

    def failing_then_deleted(
        session: Session, arrival: Arrival, study_settings: StudySettings, *known: Any
    ) -> Indexed:
        if arrival.sop_uid == bad.sop_uid:
            tries.append(arrival)
            if len(tries) == 2:  # tried alone: its study is deleted from the dashboard meanwhile
                bad.path.unlink()
            raise ValueError("cannot store this")
        return real(session, arrival, study_settings, *known)

    monkeypatch.setattr(index, "index_arrival", failing_then_deleted)
    node.indexer.start()
    node.indexer.stop()  # before the fix: the batch was retried for ever, nothing after it indexed
    assert not node.indexer._thread.is_alive()
    assert indexed_uids(db) == {arrivals[0].sop_uid, arrivals[2].sop_uid}
    assert actions(db).count("instance.set_aside") == 1


def test_stop_returns_while_the_database_hangs_and_the_queue_is_full(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    arrivals = [node.accept(*instance(), ORIGIN) for _ in range(3)]
    hanging, took = threading.Event(), threading.Event()

    def hang(*args: object, **kwargs: object) -> bool:
        took.set()
        hanging.wait()  # a query the database never answers
        return False

    monkeypatch.setattr(index, "index_arrivals", hang)
    monkeypatch.setattr(Indexer, "QUEUED", 2)
    monkeypatch.setattr(Indexer, "STOP_WAIT", 1.0)
    indexer = Indexer(db, StudySettings(), on_ready=lambda: None)
    indexer.start()
    indexer.submit(arrivals[0])
    assert took.wait(5)
    for arrival in arrivals[1:]:
        indexer.submit(arrival, timeout=0.1)  # the queue is full now
    stopping = threading.Thread(target=indexer.stop, daemon=True)
    stopping.start()
    stopping.join(10)  # generous: it waits STOP_WAIT; before the fix it waited for ever
    hanging.set()
    assert not stopping.is_alive()


def test_an_arrival_whose_file_was_deleted_before_indexing_leaves_no_row(
    db: Database, tmp_path: Path
) -> None:
    """An instance acknowledged while its study was being deleted (a re-send the spool already held):
    by the time it is indexed its file is gone, and a row would point at nothing."""
    node = ingest(db, tmp_path)
    path = spooled(node)
    header = dcmread(path, stop_before_pixels=True)
    arrival = Arrival(
        STUDY, SERIES, header.SOPInstanceUID, CTImageStorage, ExplicitVRLittleEndian, path, 1, header
    )
    path.unlink()
    assert index.index_arrivals(db, [arrival], StudySettings()) is False
    assert indexed_uids(db) == set()
    assert actions(db) == ["instance.gone"]


def test_an_integer_string_beyond_every_number_counts_as_absent() -> None:
    """An IS of "1e999" (legal characters, found by the fuzzer) is read by pydicom as infinity; it must
    not keep the instance from being indexed (it was set aside for an OverflowError)."""
    ds = Dataset()
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 5, b"1e999", 0, False, True)
    ds[0x00200013] = RawDataElement(Tag(0x00200013), "IS", 2, b"7 ", 0, False, True)
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):
        assert index._int(ds, "SeriesNumber") is None
    assert index._int(ds, "InstanceNumber") == 7
