"""Retention (issue 11, fault 10): settled studies go when old or when the disk fills, oldest first,
audited; a study still to be routed, analysed or sent, or whose job or send failed for good, stays.

Studies go the real way (spool, index, completion, routing, the chest X-ray model, sends to a real
Orthanc and to a destination that does not answer), on SQLite and PostgreSQL. The disk of the
high-water tests is a small one whose only content is the data folder: its use is measured on the
folder's real files after each removal."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from node import audit
from node import deletion as deletion_module
from node import retention as retention_module
from node.config import ConfigError, Settings, load_settings
from node.db import (
    Database,
    Instance,
    Job,
    JobStatus,
    Patient,
    Result,
    Send,
    Series,
    Study,
    open_database,
    utcnow,
)
from node.deletion import Deleted, StudyBusy, delete_study
from node.ingest.accept import arrival_of
from node.ingest.checks import read_header
from node.ingest.conflicts import SUPERSEDED
from node.ingest.index import Indexer
from node.ingest.reconcile import Reconciler
from node.jobs import JobStore
from node.retention import DiskUsage, Retention
from node.spool import Spool
from tests.peers import NodeProcess, OrthancServer, free_port, storescu, wait_for
from tests.test_pages_studies import Node, events, radiograph, study_uid
from tests.web import logged_in

pytestmark = pytest.mark.faults

SETTLED = ("ACC-SENT", "ACC-NOROUTE")  # analysed and sent; matched no route
KEPT = (
    "ACC-FAILED",
    "ACC-QUEUED",
    "ACC-RUNNING",
    "ACC-READY",
)  # send failed; job waiting, running; not routed


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def chest_route(name: str, accessions: list[str], destination: str) -> dict[str, object]:
    return {
        "name": name,
        "match": {"Modality": "DX", "BodyPartExamined": "CHEST", "AccessionNumber": accessions},
        "handler": "chest_xray",
        "model": "chest-xray",
        "options": {"max_explanations": 1},
        "destinations": [destination],
    }


def settings_for(orthanc: OrthancServer, **retention: float) -> Settings:
    return Settings.model_validate(
        {
            "study": {"stable_seconds": 0},
            "jobs": {"max_attempts": 1},
            "send": {"max_attempts": 1},
            "retention": retention,
            "destinations": [
                {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
                {"name": "offline", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
            ],
            "routes": [
                chest_route("sent", ["ACC-SENT", "ACC-QUEUED", "ACC-RUNNING"], "pacs"),
                chest_route("unsent", ["ACC-FAILED"], "offline"),
            ],
        }
    )


def hand(key: str, accession: str, patient_id: str = "") -> Dataset:
    """A hand radiograph: no route takes it, so it is settled once complete."""
    ds = radiograph(key, "chrH31.dcm", accession, body_part="HAND")
    ds.PatientID = patient_id or ds.PatientID
    return ds


@pytest.fixture
def node(db: Database, tmp_path: Path, orthanc: OrthancServer) -> Node:
    """One study in each state: analysed and sent; no route (its patient also has the failed one);
    its send failed for good; its job queued; its job running; complete but not yet routed."""
    made = Node(db, Spool(tmp_path / "data"), settings_for(orthanc, keep_days=1))
    made.receive(radiograph("ret-sent", "chrI2.dcm", "ACC-SENT"))
    made.receive(radiograph("ret-failed", "chrI2.dcm", "ACC-FAILED"))
    made.receive(hand("ret-noroute", "ACC-NOROUTE", patient_id="PID-ret-failed"))
    assert made.route() == 2 and made.run_jobs() == 2
    made.send()
    made.receive(radiograph("ret-running", "chrI2.dcm", "ACC-RUNNING"))
    assert made.route() == 1 and JobStore(db, made.settings.jobs).claim() is not None
    made.receive(radiograph("ret-queued", "chrI2.dcm", "ACC-QUEUED"))
    assert made.route() == 1
    made.receive(radiograph("ret-ready", "chrI2.dcm", "ACC-READY"))
    return made


def study_files(node: Node, accession: str) -> list[Path]:
    """A study's files: its received instances and its results."""
    with node.db.session() as session:
        study = session.scalars(select(Study).where(Study.accession_number == accession)).one()
        instances = [Path(i.path) for s in study.series for i in s.instances]
        results = [Path(r.path) for s in study.series for j in s.jobs for r in j.results]
    return instances + results


def accessions(db: Database) -> list[str]:
    with db.session() as session:
        return sorted(session.scalars(select(Study.accession_number)))


def count(db: Database, table: type) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def test_by_age_only_settled_studies_go_with_their_files_and_rows(node: Node) -> None:
    retention = Retention(node.settings.retention, node.db, node.spool)
    files = {accession: study_files(node, accession) for accession in SETTLED + KEPT}
    sizes = {accession: sum(f.stat().st_size for f in found) for accession, found in files.items()}
    assert len(files["ACC-SENT"]) == 3  # the radiograph, its SC and its SR
    uids = {accession: study_uid(node.db, accession) for accession in SETTLED}
    with node.db.session() as session:
        sent_job = session.scalars(
            select(Job).join(Series).join(Study).where(Study.accession_number == "ACC-SENT")
        ).one()
    assert sent_job.status == JobStatus.DONE and node.spool.result_dir(sent_job.id).is_dir()

    first = retention.run_pass()  # a day not yet past: nothing is old
    assert sum(first.removed.values()) == 0 and accessions(node.db) == sorted(SETTLED + KEPT)
    assert events(node.db, "retention.pass") == []  # a pass that did nothing is not recorded

    stopping = Retention(node.settings.retention, node.db, node.spool)
    stopping.stop()  # the node is stopping: a pass removes nothing more
    assert stopping.run_pass(now=utcnow() + timedelta(days=2)).removed == {"age": 0, "disk": 0}
    report = retention.run_pass(now=utcnow() + timedelta(days=2))
    assert report.removed == {"age": 2, "disk": 0}
    assert report.bytes_freed == sizes["ACC-SENT"] + sizes["ACC-NOROUTE"]
    assert accessions(node.db) == sorted(KEPT)
    assert not any(f.exists() for accession in SETTLED for f in files[accession])
    assert all(f.exists() for accession in KEPT for f in files[accession])
    assert not node.spool.result_dir(sent_job.id).exists()
    assert not any((node.spool.incoming / uid).exists() for uid in uids.values())
    with node.db.session() as session:
        assert session.get(Job, sent_job.id) is None
        assert session.scalars(select(Result).where(Result.job_fk == sent_job.id)).all() == []
        patients = set(session.scalars(select(Patient.patient_id)))
    assert "PID-ret-sent" not in patients  # no study of theirs left
    assert "PID-ret-failed" in patients  # the failed study is still theirs
    assert count(node.db, Instance) == len(KEPT) and count(node.db, Send) == 2  # the failed SC and SR

    deleted = {event.study_uid: event for event in events(node.db, "study.deleted")}
    assert set(deleted) == set(uids.values())
    for accession, uid in uids.items():
        assert deleted[uid].actor == "node" and deleted[uid].detail["reason"] == "age"
        assert deleted[uid].detail["bytes"] == sizes[accession]
    [summary] = events(node.db, "retention.pass")
    assert summary.outcome == "success" and summary.detail["removed_by_age"] == 2
    assert summary.detail["bytes_freed"] == report.bytes_freed
    assert audit.verify(node.db) is None  # the chain is whole: nothing was deleted from it

    assert retention.run_pass(now=utcnow() + timedelta(days=30)).removed == {"age": 0, "disk": 0}
    assert accessions(node.db) == sorted(KEPT)


def test_a_study_woken_after_it_was_chosen_is_not_deleted(node: Node) -> None:
    """The deleting transaction checks again: the admin's Delete still removes it."""
    uid = study_uid(node.db, "ACC-QUEUED")
    with pytest.raises(StudyBusy, match="not settled"):
        delete_study(node.db, node.spool, uid, "node", reason="age", only_if_settled=True)
    assert "ACC-QUEUED" in accessions(node.db)
    deleted = delete_study(node.db, node.spool, uid, "user:admin")
    assert deleted is not None and deleted.jobs == 1 and deleted.bytes > 0
    assert "ACC-QUEUED" not in accessions(node.db)
    [event] = events(node.db, "study.deleted")
    assert event.detail["reason"] == "admin"


def test_an_instance_acknowledged_but_not_yet_indexed_survives(db: Database, tmp_path: Path) -> None:
    """Retention removes the files the rows name, not the study's folder: an instance written a
    moment ago (acknowledged, the indexer still to come) stays and is indexed as a new arrival."""
    node = Node(db, Spool(tmp_path / "data"), Settings.model_validate({"study": {"stable_seconds": 0}}))
    first = hand("ret-late", "ACC-LATE")
    node.receive(first)
    node.route()
    late = hand("ret-late", "ACC-LATE")
    late.SOPInstanceUID = generate_uid()
    path = node.spool.instance_path(late.StudyInstanceUID, late.SeriesInstanceUID, late.SOPInstanceUID)
    late.save_as(path, enforce_file_format=True)  # what accept() writes before the indexer runs

    removed = Retention(node.settings.retention, db, node.spool).run_pass(now=utcnow() + timedelta(days=1))
    assert removed.removed["age"] == 0  # keep_days = 0: kept forever by age
    node.settings.retention.keep_days = 0.5
    again = Retention(node.settings.retention, db, node.spool).run_pass(now=utcnow() + timedelta(days=1))
    assert again.removed["age"] == 1
    assert path.exists()
    assert (
        Reconciler(node.settings, db, node.spool, Indexer(db, node.settings.study, lambda: None))
        .at_start()
        .indexed
        == 1
    )
    with db.session() as session:
        assert session.scalars(select(Instance.sop_uid)).all() == [late.SOPInstanceUID]


def test_an_instance_indexed_after_its_study_was_chosen_keeps_the_study(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late instance for an old settled study, indexed between the pass choosing the study and
    deleting it (late instances ignored: its series stays routed, the study settled): the study is no
    longer old, and the instance acknowledged a moment ago is not deleted with it."""
    config = {"study": {"stable_seconds": 0, "late_instances": "ignore"}, "retention": {"keep_days": 1}}
    node = Node(db, Spool(tmp_path / "data"), Settings.model_validate(config))
    node.receive(hand("ret-woken", "ACC-WOKEN"))
    node.route()
    with db.session() as session:
        session.execute(update(Study).values(last_received_at=utcnow() - timedelta(days=2)))
    late = hand("ret-woken", "ACC-WOKEN")
    late.SOPInstanceUID = generate_uid()
    chosen_then_deleted = retention_module.delete_study

    def late_instance_arrives(*args: Any, **kwargs: Any) -> Deleted | None:
        node.receive(late)
        return chosen_then_deleted(*args, **kwargs)

    monkeypatch.setattr(retention_module, "delete_study", late_instance_arrives)
    report = Retention(node.settings.retention, db, node.spool).run_pass()
    assert report.removed == {"age": 0, "disk": 0} and accessions(db) == ["ACC-WOKEN"]
    with db.session() as session:
        assert late.SOPInstanceUID in session.scalars(select(Instance.sop_uid)).all()
    assert all(f.exists() for f in study_files(node, "ACC-WOKEN"))
    assert events(db, "study.deleted") == []


def test_an_instance_indexed_while_its_study_is_deleted_is_kept_in_a_new_study(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deleting transaction locks the study's row before it reads it: an instance the indexer takes
    at that moment waits, then finds the study gone and makes it anew — not indexed into rows being
    deleted, its row deleted with them and its file left behind."""
    settings = Settings.model_validate({"study": {"stable_seconds": 0, "late_instances": "ignore"}})
    node = Node(db, Spool(tmp_path / "data"), settings)
    node.receive(hand("ret-racing", "ACC-RACING"))
    node.route()
    late = hand("ret-racing", "ACC-RACING")
    late.SOPInstanceUID = generate_uid()
    path = node.spool.instance_path(late.StudyInstanceUID, late.SeriesInstanceUID, late.SOPInstanceUID)
    late.save_as(path, enforce_file_format=True)  # acknowledged; the indexer's turn comes next
    indexer = Indexer(db, settings.study, lambda: None)
    indexer.start()
    checked = deletion_module.check_uid
    arrived: list[Path] = []

    def indexed_meanwhile(value: object, what: str = "UID") -> str:
        if not arrived:  # in the deleting transaction, its rows read: the indexer takes the instance now
            arrived.append(path)
            indexer.submit(arrival_of(path, path.stat().st_size, read_header(path, settings.node)))
            deadline = time.monotonic() + 3
            while indexer.unindexed().paths and time.monotonic() < deadline:
                time.sleep(0.05)
        return checked(value, what)

    monkeypatch.setattr(deletion_module, "check_uid", indexed_meanwhile)
    try:
        deleted = delete_study(db, node.spool, late.StudyInstanceUID, "user:admin")
        wait_for(lambda: not indexer.unindexed().paths, 60, "the instance to be indexed")
    finally:
        indexer.stop()
    assert arrived and deleted is not None and deleted.instances == 1
    assert path.exists()
    with db.session() as session:
        [kept] = session.scalars(select(Instance).where(Instance.sop_uid == late.SOPInstanceUID)).all()
        assert kept.path == str(path) and kept.series.study.study_uid == late.StudyInstanceUID
        assert session.scalar(select(func.count()).select_from(Instance)) == 1


def test_a_corrected_instances_earlier_version_goes_with_its_study(db: Database, tmp_path: Path) -> None:
    """node.ingest.conflicts keeps the version a correction replaced; no row names it, the study does."""
    node = Node(db, Spool(tmp_path / "data"), Settings.model_validate({"study": {"stable_seconds": 0}}))
    ds = hand("ret-corrected", "ACC-CORRECTED")
    node.receive(ds)
    node.route()
    [received] = study_files(node, "ACC-CORRECTED")
    earlier = (
        node.spool.root
        / SUPERSEDED
        / ds.StudyInstanceUID
        / ds.SeriesInstanceUID
        / f"{ds.SOPInstanceUID}.1.dcm"
    )
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(received.read_bytes()[:-10])
    size = received.stat().st_size
    settings = node.settings.retention.model_copy(update={"keep_days": 1})
    report = Retention(settings, db, node.spool).run_pass(now=utcnow() + timedelta(days=2))
    assert report.bytes_freed == 2 * size - 10 and not received.exists()
    assert not earlier.exists() and not (node.spool.root / SUPERSEDED / ds.StudyInstanceUID).exists()
    assert accessions(db) == []


def measured_disk(spool: Spool, size: int) -> Callable[[Path], DiskUsage]:
    """A disk of ``size`` bytes holding only the data folder: its use is the folder's files, now."""

    def usage(_: Path) -> DiskUsage:
        used = sum(f.stat().st_size for f in spool.root.rglob("*") if f.is_file())
        return DiskUsage(size, used, size - used)

    return usage


def test_above_high_water_the_oldest_settled_go_until_below_low_water(db: Database, tmp_path: Path) -> None:
    node = Node(db, Spool(tmp_path / "data"), Settings.model_validate({"study": {"stable_seconds": 0}}))
    order = ["ACC-OLDEST", "ACC-OLDER", "ACC-NEWEST"]
    for i, accession in enumerate(order):
        node.receive(hand(f"ret-disk-{i}", accession))
        node.route()
    sizes = [sum(f.stat().st_size for f in study_files(node, accession)) for accession in order]
    disk = int(sum(sizes) / 0.6)  # 60 % used
    low = 100 * (sizes[2] + sizes[1] / 2) / disk  # the oldest two must go, not the newest
    settings = node.settings.retention.model_copy(
        update={"disk_high_water_percent": 50, "disk_low_water_percent": low}
    )
    retention = Retention(settings, db, node.spool, measured_disk(node.spool, disk))

    report = retention.run_pass()
    assert report.removed == {"age": 0, "disk": 2} and report.bytes_freed == sizes[0] + sizes[1]
    assert accessions(db) == ["ACC-NEWEST"]
    assert report.used_percent_before == pytest.approx(60, abs=0.01)
    assert report.used_percent_after < low and not report.short
    assert [e.detail["reason"] for e in events(db, "study.deleted")] == ["disk", "disk"]
    [summary] = events(db, "retention.pass")
    assert summary.detail["removed_by_disk"] == 2 and summary.detail["used_percent_after"] < low
    assert sum(retention.run_pass().removed.values()) == 0  # below the high-water mark now


def test_a_disk_full_of_unfinished_studies_is_reported_once(node: Node) -> None:
    """Nothing settled is left to remove: one warning event, not one per pass, until it changes."""
    for accession in SETTLED:
        delete_study(node.db, node.spool, study_uid(node.db, accession), "user:admin")
    used = sum(f.stat().st_size for f in node.spool.root.rglob("*") if f.is_file())
    settings = node.settings.retention.model_copy(
        update={"disk_high_water_percent": 40, "disk_low_water_percent": 30}
    )
    retention = Retention(settings, node.db, node.spool, measured_disk(node.spool, used * 2))
    for _ in range(3):
        report = retention.run_pass()
        assert report.short and sum(report.removed.values()) == 0
    assert accessions(node.db) == sorted(KEPT)
    [warning] = events(node.db, "retention.pass")
    assert warning.outcome == "warning" and warning.detail["used_percent_after"] == pytest.approx(
        50, abs=0.01
    )
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    problem = "no settled study is left to remove: studies whose job or send failed are kept until an admin"
    assert any(problem in line for line in viewer.get("/api/overview").json()["problems"])

    retention.disk_usage = measured_disk(node.spool, used * 4)  # a bigger disk: 25 % used
    assert not retention.run_pass().short
    warning, recovered = events(node.db, "retention.pass")
    assert recovered.outcome == "success" and recovered.detail["removed_by_disk"] == 0
    figures = viewer.get("/api/overview").json()
    assert not any(problem in line for line in figures["problems"]) and figures["retention"]["removed"] == 0


def test_water_marks_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[retention]\ndisk_high_water_percent = 80\ndisk_low_water_percent = 80\n")
    with pytest.raises(ConfigError, match="disk_low_water_percent must be below disk_high_water_percent"):
        load_settings(config, environ={})


def test_the_running_node_removes_old_studies_and_keeps_accepting(tmp_path: Path) -> None:
    """``ainode serve``: the retention step runs on the node's scheduler, and a study received over
    DICOM is gone, files and rows, once older than keep_days; the node takes the next one."""
    node = NodeProcess(
        tmp_path / "node",
        {"study": {"stable_seconds": 0}, "retention": {"keep_days": 5 / 86400, "interval_seconds": 1}},
    ).start()
    try:
        file = tmp_path / "hand.dcm"
        ds = hand("ret-serve", "ACC-SERVE")
        ds.save_as(file, enforce_file_format=True)
        assert storescu(node.dicom_port, [file]).returncode == 0
        wait_for(lambda: node.study(ds.StudyInstanceUID) is not None, 10, "the study to be indexed")
        wait_for(lambda: node.study(ds.StudyInstanceUID) is None, 20, "retention to remove the study")
        spool = Path(node.settings["node"]["data_dir"]) / "incoming"
        assert not (spool / ds.StudyInstanceUID).exists()
        assert storescu(node.dicom_port, [file]).returncode == 0  # the same study again, accepted
    finally:
        node.stop()
    settings = load_settings(node.config, environ={})
    database = open_database(settings.node.resolved_database_url)
    try:
        removed = [e for e in events(database, "study.deleted") if e.study_uid == ds.StudyInstanceUID]
        assert removed and removed[0].detail["reason"] == "age" and removed[0].actor == "node"
        assert events(database, "retention.pass")
    finally:
        database.dispose()
