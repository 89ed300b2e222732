"""Issue 11, fault 4: UID collisions acknowledged with Success mixed or lost patients. A Study, Series
or SOP Instance UID already taken elsewhere is now refused before anything is written (0xC0C1, audited
``instance.conflict``), or — accepted while the database could not be asked — set aside at indexing;
a byte-identical re-send rewrites nothing; a corrected instance is stored, the earlier version kept,
and its series runs again (node/ingest/conflicts.py)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode
from sqlalchemy import select

from node.config import Route, Settings, StudySettings
from node.db import AuditEvent, Database, Instance, Job, Patient, Series, SeriesStatus, Study
from node.deletion import delete_study
from node.ingest import conflicts as conflicts_module
from node.ingest.accept import Ingest, Origin, Refused
from node.ingest.completion import mark_stable
from node.ingest.conflicts import SUPERSEDED, UID_CONFLICT, Conflicts
from node.ingest.index import QUARANTINE, Indexer
from node.route import route_ready
from node.spool import Spool
from tests.peers import NodeProcess, free_port, storescu, wait_for

pytestmark = pytest.mark.faults

ORIGIN = Origin(calling_ae="MODALITY", called_ae="AINODE", address="127.0.0.1")
ALPHA, BRAVO = ("PID-ALPHA", "ALPHA^ANNA"), ("PID-BRAVO", "BRAVO^BEN")  # never in a log line
ROUTES = [
    Route(
        name="head", match={"Modality": "CT"}, handler="ct_hemorrhage", model="ct-hemorrhage", destinations=[]
    )
]


def dataset(study: str, series: str, sop: str, patient: tuple[str, str], note: str = "HEAD CT") -> Dataset:
    """A CT instance, with the meta information it is sent with."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, (ds.PatientID, ds.PatientName), ds.StudyDescription = "CT", patient, note
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def sent(ds: Dataset) -> tuple[FileMetaDataset, bytes]:
    """What a sender hands :meth:`Ingest.accept`: a fresh copy of the meta information (accept adds
    the AE titles to it), and the data set bytes."""
    data = encode(ds, False, True)
    assert data is not None
    return FileMetaDataset(ds.file_meta), data


def ingest(db: Database, data_dir: Path, late_instances: str = "rerun") -> Ingest:
    """The node's way in, as after a start: nothing remembered but what the database knows."""
    study = StudySettings(stable_seconds=0, late_instances=late_instances)  # type: ignore[arg-type]
    settings = Settings(study=study)
    return Ingest(settings, db, Spool(data_dir), Indexer(db, study, on_ready=lambda: None))


def index(node: Ingest) -> None:
    """Index what the node accepted so far, as its indexer thread does."""
    node.indexer.start()
    node.indexer.stop()
    node.indexer = Indexer(node.db, node.settings.study, on_ready=lambda: None)


def events(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def spooled(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


@pytest.fixture
def no_patient_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    text = "\n".join(record.getMessage() for record in caplog.records)
    for value in (*ALPHA, *BRAVO):
        assert value not in text


def second(kind: str, study: str, series: str, sop: str) -> Dataset:
    """An instance colliding, as ``kind``, with the first one (``study``, ``series``, ``sop``)."""
    if kind == "other_patient":  # the same study, claimed for another patient
        return dataset(study, generate_uid(), generate_uid(), BRAVO)
    if kind == "series_elsewhere":  # the series reused in another patient's study
        return dataset(generate_uid(), series, generate_uid(), BRAVO)
    return dataset(generate_uid(), generate_uid(), sop, ALPHA)  # the instance re-sent in another study


@pytest.mark.usefixtures("no_patient_in_logs")
@pytest.mark.parametrize("known_by", ["memory", "database"])
@pytest.mark.parametrize("kind", ["other_patient", "series_elsewhere", "sop_elsewhere"])
def test_a_uid_taken_elsewhere_is_refused_and_nothing_mixes(
    db: Database, tmp_path: Path, kind: str, known_by: str
) -> None:
    node = ingest(db, tmp_path)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    first = node.accept(*sent(dataset(study, series, sop, ALPHA)), ORIGIN)
    kept = first.path.read_bytes()
    if known_by == "database":  # indexed, then the node restarted: only the database knows it
        index(node)
        node = ingest(db, tmp_path)
    other = second(kind, study, series, sop)

    with pytest.raises(Refused) as refused:  # before the fix: Success
        node.accept(*sent(other), ORIGIN)
    assert refused.value.status == UID_CONFLICT and f"UID conflict ({kind})" in refused.value.reason
    index(node)

    assert spooled(node.spool.root) == [first.path] and first.path.read_bytes() == kept
    with db.session() as session:
        assert [(p.patient_id, p.patient_name) for p in session.scalars(select(Patient))] == [ALPHA]
        assert session.scalars(select(Study.study_uid)).all() == [study]
        assert [(s.series_uid, s.instance_count) for s in session.scalars(select(Series))] == [(series, 1)]
        assert [(i.sop_uid, i.path) for i in session.scalars(select(Instance))] == [(sop, str(first.path))]
    conflict = events(db, "instance.conflict")
    assert len(conflict) == 1 and conflict[0].outcome == "failure"
    assert conflict[0].detail["kind"] == kind and conflict[0].detail["handled"] == "refused"
    assert conflict[0].detail["sop_uid"] == other.SOPInstanceUID
    assert conflict[0].detail["series_uid"] == other.SeriesInstanceUID
    assert conflict[0].study_uid == other.StudyInstanceUID
    assert [e.detail["status"] for e in events(db, "instance.refused")] == ["0xC0C1"]
    for value in (*ALPHA, *BRAVO):  # the audit names UIDs, never the patient
        assert value not in str(conflict[0].detail)


def test_a_study_deleted_then_sent_for_its_right_patient_is_accepted(db: Database, tmp_path: Path) -> None:
    node = ingest(db, tmp_path)
    study, series = generate_uid(), generate_uid()
    node.accept(*sent(dataset(study, series, generate_uid(), ALPHA)), ORIGIN)
    index(node)
    with pytest.raises(Refused):  # the study again, now naming its right patient
        node.accept(*sent(dataset(study, series, generate_uid(), BRAVO)), ORIGIN)
    assert delete_study(db, node.spool, study, actor="admin") is not None  # so the admin deletes it

    node.accept(*sent(dataset(study, series, generate_uid(), BRAVO)), ORIGIN)  # what the node remembers
    index(node)  # of the deleted study does not stand in the way
    with db.session() as session:
        assert session.scalars(select(Study)).one().patient.patient_id == BRAVO[0]


def test_an_identical_resend_is_a_duplicate_and_rewrites_nothing(db: Database, tmp_path: Path) -> None:
    node = ingest(db, tmp_path)
    ds = dataset(generate_uid(), generate_uid(), generate_uid(), ALPHA)
    first = node.accept(*sent(ds), ORIGIN)
    index(node)
    before = os.stat(first.path)
    # another sender: the meta information written in front would differ, the data set does not
    again = node.accept(*sent(ds), Origin(calling_ae="PACS", called_ae="AINODE", address="127.0.0.2"))
    index(node)

    assert again.path == first.path
    after = os.stat(first.path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (node.spool.root / SUPERSEDED).exists()
    assert spooled(node.spool.root) == [first.path]
    stored = [e.detail for e in events(db, "instance.stored")]
    assert [(d["duplicate"], d["identical"]) for d in stored] == [(False, False), (True, True)]
    with db.session() as session:
        assert session.scalars(select(Instance.times_received)).one() == 2
        assert session.scalars(select(Series.late_instances)).one() == 0
    assert not events(db, "instance.replaced")


@pytest.mark.parametrize("policy", ["rerun", "ignore"])
def test_a_correction_is_stored_the_old_version_kept_and_the_series_runs_again(
    db: Database, tmp_path: Path, policy: str
) -> None:
    node = ingest(db, tmp_path, late_instances=policy)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    versions = [sent(dataset(study, series, sop, ALPHA, note)) for note in ("HEAD CT", "HEAD CT, CORRECTED")]
    first = node.accept(*versions[0], ORIGIN)
    index(node)
    assert mark_stable(db, node.settings.study) == 1 and route_ready(db, ROUTES) == 1

    corrected = node.accept(*versions[1], ORIGIN)  # before the fix: overwritten, no re-run
    index(node)

    assert corrected.path == first.path
    assert pydicom.dcmread(first.path).StudyDescription == "HEAD CT, CORRECTED"
    kept = node.spool.root / SUPERSEDED / study / series / f"{sop}.1.dcm"
    assert pydicom.dcmread(kept).StudyDescription == "HEAD CT"
    [replaced] = [e.detail for e in events(db, "instance.replaced")]
    assert replaced["kept_at"] == str(kept) and replaced["sop_uid"] == sop
    assert replaced["old_sha256"] == hashlib.sha256(versions[0][1]).hexdigest()
    assert replaced["new_sha256"] == hashlib.sha256(versions[1][1]).hexdigest()
    assert (replaced["old_bytes"], replaced["new_bytes"]) == (len(versions[0][1]), len(versions[1][1]))
    stored = [e.detail for e in events(db, "instance.stored")]
    assert [(d["duplicate"], d["identical"], d["late"]) for d in stored][1] == (True, False, True)
    with db.session() as session:
        row = session.scalars(select(Series)).one()
        assert (row.instance_count, row.late_instances) == (1, 1)
        assert session.scalars(select(Instance.size)).one() == corrected.size
    if policy == "ignore":
        assert row.status == SeriesStatus.ROUTED
    else:
        assert row.status == SeriesStatus.RECEIVING
        assert mark_stable(db, node.settings.study) == 1 and route_ready(db, ROUTES) == 1
        with db.session() as session:
            assert len(session.scalars(select(Job)).all()) == 2  # the corrected series analysed again

    node.accept(*sent(dataset(study, series, sop, ALPHA, "THIRD")), ORIGIN)  # a second correction
    assert pydicom.dcmread(kept.parent / f"{sop}.2.dcm").StudyDescription == "HEAD CT, CORRECTED"
    assert pydicom.dcmread(kept).StudyDescription == "HEAD CT"


def test_a_conflict_accepted_without_the_database_is_set_aside_not_merged(
    db: Database, tmp_path: Path
) -> None:
    node = ingest(db, tmp_path)
    study, series = generate_uid(), generate_uid()
    node.accept(*sent(dataset(study, series, generate_uid(), ALPHA)), ORIGIN)
    index(node)
    node = ingest(db, tmp_path)  # restarted; at accept time its database does not answer
    node.conflicts = Conflicts(
        Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone"), node.spool
    )
    other = dataset(generate_uid(), series, generate_uid(), BRAVO)

    arrival = node.accept(*sent(other), ORIGIN)  # acknowledged: the file is safe, the index decides
    # the series' own next instance: what was accepted unchecked must not be taken as the truth
    node.accept(*sent(dataset(study, series, generate_uid(), ALPHA)), ORIGIN)
    index(node)

    quarantined = node.spool.root / QUARANTINE / arrival.path.relative_to(node.spool.incoming)
    assert not arrival.path.exists() and quarantined.is_file()
    [aside] = events(db, "instance.set_aside")
    assert aside.detail["sop_uid"] == other.SOPInstanceUID
    assert "UID conflict (series_elsewhere)" in aside.detail["reason"]
    with db.session() as session:
        assert [p.patient_id for p in session.scalars(select(Patient))] == [ALPHA[0]]
        assert [(s.series_uid, s.instance_count) for s in session.scalars(select(Series))] == [(series, 2)]


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path / "node", {}).start()
    yield process
    process.stop()


def test_storescu_hears_the_conflict_and_the_study_keeps_its_patient(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    study, series, other_study = generate_uid(), generate_uid(), generate_uid()
    files = [tmp_path / "alpha.dcm", tmp_path / "bravo.dcm"]
    dataset(study, series, generate_uid(), ALPHA).save_as(files[0], enforce_file_format=True)
    dataset(other_study, series, generate_uid(), BRAVO).save_as(files[1], enforce_file_format=True)

    assert storescu(node_process.dicom_port, files[:1]).returncode == 0
    wait_for(lambda: node_process.study(study), 30, "the first study indexed")
    run = storescu(node_process.dicom_port, files[1:], extra=["-d"])  # -d: the response as it came
    output = run.stdout + run.stderr
    assert "0xc0c1" in output.lower(), output  # before the fix: Success, patient B's image in A's series
    assert "[UID conflict (series_elsewhere): series " in output  # the Error Comment says why

    shown = node_process.study(study)
    assert shown is not None and [s["instances"] for s in shown["series"]] == [1]
    assert node_process.study(other_study) is None
    assert len(spooled(node_process.folder / "var" / "incoming")) == 1


def test_a_correction_refused_for_a_full_indexer_is_not_half_taken(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    versions = [sent(dataset(study, series, sop, ALPHA, note)) for note in ("HEAD CT", "HEAD CT, CORRECTED")]
    first = node.accept(*versions[0], ORIGIN)
    index(node)
    monkeypatch.setattr(Indexer, "QUEUED", 1)
    node.indexer = Indexer(db, node.settings.study, on_ready=lambda: None)
    node.accept(*sent(dataset(generate_uid(), generate_uid(), generate_uid(), BRAVO)), ORIGIN)  # now full
    monkeypatch.setattr(node.indexer, "submit", partial(node.indexer.submit, timeout=0.1))

    with pytest.raises(Refused) as refused:
        node.accept(*versions[1], ORIGIN)
    assert refused.value.status == 0xA700  # the sender tries again later
    # Before the fix the correction stayed in place unindexed: reconciliation knows the file's place,
    # and the sender's next try was an identical duplicate — no instance.replaced, no re-run, ever.
    assert pydicom.dcmread(first.path).StudyDescription == "HEAD CT"
    assert not list((node.spool.root / SUPERSEDED).rglob("*.dcm"))

    index(node)
    node.accept(*versions[1], ORIGIN)  # the try later
    index(node)
    [replaced] = [e.detail for e in events(db, "instance.replaced")]
    assert replaced["new_sha256"] == hashlib.sha256(versions[1][1]).hexdigest()
    assert pydicom.dcmread(first.path).StudyDescription == "HEAD CT, CORRECTED"


def test_two_corrections_at_once_are_both_kept(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = ingest(db, tmp_path)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    versions = [sent(dataset(study, series, sop, ALPHA, note)) for note in ("FIRST", "SECOND", "THIRD")]
    node.accept(*versions[0], ORIGIN)
    index(node)
    both_in, keep = threading.Barrier(2), conflicts_module.link_aside

    def keep_when_both_are_in(path: Path, folder: Path) -> Path:
        with contextlib.suppress(threading.BrokenBarrierError):  # the fix keeps the second one out
            both_in.wait(timeout=2)
        return keep(path, folder)

    monkeypatch.setattr(conflicts_module, "link_aside", keep_when_both_are_in)
    senders = [threading.Thread(target=node.accept, args=(*version, ORIGIN)) for version in versions[1:]]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(10)
    # Before the fix both kept FIRST and one correction replaced the other, kept nowhere.
    notes = sorted(pydicom.dcmread(path).StudyDescription for path in spooled(node.spool.root))
    assert notes == ["FIRST", "SECOND", "THIRD"]
