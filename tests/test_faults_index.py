"""Issue 11, fault 3: an acknowledged instance the database cannot index (a NUL byte in PatientName on
PostgreSQL) must neither be lost nor stop the node: what the database cannot store is stripped, and a
file that still cannot be indexed is set aside and audited while the rest are indexed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
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

    def failing(session: Session, arrival: Arrival, study_settings: StudySettings) -> Indexed:
        if arrival.sop_uid == sop_uid:
            raise error
        return real(session, arrival, study_settings)

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
    assert node.reconcile() == 1  # before the fix: raised on PostgreSQL, and `ainode serve` exited 1
    assert indexed_uids(db) == {path.stem}
    assert actions(db).count("instance.reindexed") == 1
    assert node.reconcile() == 0


def test_reconcile_sets_aside_a_file_that_cannot_be_indexed(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    paths = [spooled(node) for _ in range(3)]
    bad = paths[1]
    poison(monkeypatch, bad.stem, ValueError("cannot store this"))
    assert node.reconcile() == 2  # the other two are indexed; nothing raised
    assert indexed_uids(db) == {paths[0].stem, paths[2].stem}
    quarantined = node.spool.root / QUARANTINE / bad.relative_to(node.spool.incoming)
    assert not bad.exists() and quarantined.is_file()  # kept, out of the way of every next start
    with db.session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.set_aside")).one()
    assert event.detail["sop_uid"] == bad.stem and event.detail["moved_to"] == str(quarantined)
    assert event.detail["reason"] == "cannot be indexed: ValueError" and event.outcome == "failure"
    assert node.reconcile() == 0 and actions(db).count("instance.set_aside") == 1
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
        node.reconcile()  # a node without its database does not start; the file waits in the spool
    assert path.is_file() and "instance.set_aside" not in actions(db)
