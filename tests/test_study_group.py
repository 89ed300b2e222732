"""Study-level routes: a fundus visit's two eyes, sent as two single-image series, make one job once
the whole study is quiet — on SQLite and PostgreSQL, across a restart, and through a real Orthanc."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
import tomli_w
from alembic import command
from pydicom import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select, update

from node import audit, route
from node.cli import main
from node.config import JobSettings, Route, StudySettings
from node.db import (
    AuditEvent,
    Database,
    Job,
    Series,
    SeriesStatus,
    Study,
    alembic_config,
    open_database,
    utcnow,
)
from node.ingest.completion import mark_stable
from node.ingest.index import Arrival, index_arrival
from node.jobs.store import JobStore
from node.route import Subject, route_ready
from tests.peers import (
    REPO,
    NodeProcess,
    OrthancServer,
    dciodvfy_errors,
    dsrdump,
    free_port,
    storescu,
    wait_for,
)
from tests.test_end_to_end import results_in
from training.fundus_phantom import CLASSES, fundus_dataset, render

DR = CLASSES.index("diabetic_retinopathy")
VISIT = Route(name="fundus-visit", match={"Modality": "OP"}, handler="fundus", model="fundus", group="study")
PHOTO = Route(name="fundus-photo", match={"Modality": "OP"}, handler="fundus", model="fundus")
HEAD = Route(name="head", match={"Modality": "CT"}, handler="ct_hemorrhage", model="ct-hemorrhage")
EYES = {"R": "right eye", "L": "left eye"}


def fundus_visit(
    folder: Path, key: str, labels: dict[str, int], height: int = 240, seed: int = 7
) -> dict[str, Path]:
    """A fundus visit as many cameras send it: one study, one single-image series per eye (Ophthalmic
    Photography, Image Laterality set). Returns each eye's file."""
    folder.mkdir(parents=True, exist_ok=True)
    first: Dataset | None = None
    paths = {}
    for number, (eye, label) in enumerate(sorted(labels.items(), reverse=True), start=1):
        fundus = render(np.random.default_rng([seed, number]), label, eye, height, round(height * 4 / 3))
        ds = fundus_dataset(fundus, f"{key}-{eye}")
        first = first or ds
        for keyword in ("PatientID", "StudyInstanceUID", "AccessionNumber"):
            setattr(ds, keyword, first.get(keyword))
        ds.SeriesNumber = number
        ds.SeriesDescription = f"Fundus photograph, {EYES[eye]} (synthetic phantom)"
        paths[eye] = folder / f"{key}-{eye}.dcm"
        ds.save_as(paths[eye], enforce_file_format=True)
    return paths


def another_photo(path: Path, folder: Path) -> Path:
    """One more photograph in the same series (a new SOP Instance UID): a late instance."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 2
    out = folder / f"late-{ds.SOPInstanceUID}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def ct_slice(folder: Path, beside: Path) -> Path:
    """A header-only CT slice in the study (and of the patient) of ``beside``, for a series-level
    route beside the eyes."""
    other = pydicom.dcmread(beside, stop_before_pixels=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = other.StudyInstanceUID, generate_uid()
    ds.PatientID, ds.PatientName = other.PatientID, other.PatientName
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"ct-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def store(db: Database, path: Path, study: StudySettings) -> None:
    """Index one file as the node does after acknowledging it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    arrival = Arrival(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        ds.SOPClassUID,
        ds.file_meta.TransferSyntaxUID,
        path,
        path.stat().st_size,
        ds,
        "CAMERA",
        "AINODE",
    )
    with db.session() as session:
        index_arrival(session, arrival, study)


def quiet_for(db: Database, seconds: float) -> None:
    """As if the last instance of every series and study had come ``seconds`` ago."""
    then = utcnow() - timedelta(seconds=seconds)
    with db.session() as session:
        session.execute(update(Series).values(last_received_at=then))
        session.execute(update(Study).values(last_received_at=then))


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def jobs(db: Database) -> list[tuple[str, list[str]]]:
    """Every job: its route and the series it covers."""
    with db.session() as session:
        return [
            (job.route, [s.series_uid for s in job.inputs])
            for job in session.scalars(select(Job).order_by(Job.id))
        ]


def evidence(report: Dataset) -> set[str]:
    """The SOP Instance UIDs a report lists as its evidence, over every series."""
    return {
        str(item.ReferencedSOPInstanceUID)
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }


def statuses(db: Database) -> dict[str, SeriesStatus]:
    with db.session() as session:
        return {s.series_uid: s.status for s in session.scalars(select(Series))}


# --- the rule, on both databases ---------------------------------------------------------------


def test_study_route_waits_for_the_whole_study_then_makes_one_job(db: Database, tmp_path: Path) -> None:
    eyes, study = fundus_visit(tmp_path, "wait", {"R": DR, "L": 0}), StudySettings(stable_seconds=10)
    right, left = series_uid(eyes["R"]), series_uid(eyes["L"])
    store(db, eyes["R"], study)
    assert statuses(db) == {right: SeriesStatus.READY}  # a single-image series is complete at once ...
    mark_stable(db, study)
    assert route_ready(db, [VISIT]) == 0  # ... but its study is not: the other eye may follow
    store(db, eyes["L"], study)
    mark_stable(db, study)
    assert route_ready(db, [VISIT]) == 0
    assert set(statuses(db).values()) == {SeriesStatus.READY}

    quiet_for(db, 11)
    mark_stable(db, study)
    assert route_ready(db, [VISIT]) == 1
    assert jobs(db) == [("fundus-visit", [right, left])]
    assert set(statuses(db).values()) == {SeriesStatus.ROUTED}
    assert route_ready(db, [VISIT]) == 0
    with db.session() as session:
        chosen = session.scalars(select(AuditEvent).where(AuditEvent.action == "route.chosen")).one()
        assert chosen.detail["series_uids"] == [right, left] and chosen.detail["group"] == "study"
    claim = JobStore(db, JobSettings()).claim()
    assert claim is not None and claim.files == [str(eyes["R"]), str(eyes["L"])]
    assert audit.verify(db) is None


def test_series_level_routes_on_the_same_study_are_unaffected(db: Database, tmp_path: Path) -> None:
    eyes, study = fundus_visit(tmp_path, "beside", {"R": 0, "L": DR}), StudySettings(stable_seconds=10)
    ct = ct_slice(tmp_path, eyes["R"])
    store(db, ct, study)
    quiet_for(db, 11)
    mark_stable(db, study)
    store(db, eyes["R"], study)
    # The CT series is routed at once, while the eye waits for its study.
    assert route_ready(db, [VISIT, PHOTO, HEAD]) == 1
    assert jobs(db) == [("head", [series_uid(ct)])]
    store(db, eyes["L"], study)
    quiet_for(db, 11)
    mark_stable(db, study)
    # Then each eye gets its own series-level job, and the visit one job for both.
    assert route_ready(db, [VISIT, PHOTO, HEAD]) == 3
    right, left = series_uid(eyes["R"]), series_uid(eyes["L"])
    assert sorted(jobs(db)[1:]) == sorted(
        [("fundus-photo", [left]), ("fundus-photo", [right]), ("fundus-visit", [right, left])]
    )
    with db.session() as session:
        notes = {s.series_uid: s.route_note for s in session.scalars(select(Series))}
    assert notes[right] == notes[left] == "fundus-visit, fundus-photo"


@pytest.mark.parametrize("policy", ["rerun", "ignore"])
def test_a_late_instance_reruns_the_study_job_with_every_series(
    db: Database, tmp_path: Path, policy: str
) -> None:
    eyes = fundus_visit(tmp_path, f"late-{policy}", {"R": DR, "L": 0})
    study = StudySettings(stable_seconds=10, late_instances=policy)  # type: ignore[arg-type]
    for path in eyes.values():
        store(db, path, study)
    quiet_for(db, 11)
    mark_stable(db, study)
    assert route_ready(db, [VISIT]) == 1

    late = another_photo(eyes["L"], tmp_path)
    store(db, late, study)
    assert route_ready(db, [VISIT]) == 0  # the study is receiving again
    quiet_for(db, 11)
    mark_stable(db, study)
    if policy == "ignore":
        assert route_ready(db, [VISIT]) == 0
        return
    assert route_ready(db, [VISIT]) == 1
    both = [series_uid(eyes["R"]), series_uid(eyes["L"])]
    assert jobs(db) == [("fundus-visit", both), ("fundus-visit", both)]
    queue = JobStore(db, JobSettings())
    queue.claim()
    rerun = queue.claim()
    assert rerun is not None and sorted(rerun.files) == sorted(map(str, [*eyes.values(), late]))


def test_an_instance_arriving_while_the_study_is_routed_makes_it_wait_again(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eyes, study = fundus_visit(tmp_path, "race", {"R": DR, "L": 0}), StudySettings(stable_seconds=10)
    store(db, eyes["R"], study)
    quiet_for(db, 11)
    mark_stable(db, study)
    matching = route.choose

    def choose_while_the_other_eye_arrives(routes: Sequence[Route], subject: Subject) -> list[Route]:
        store(db, eyes["L"], study)  # the indexer thread may index one meanwhile
        return matching(routes, subject)

    monkeypatch.setattr(route, "choose", choose_while_the_other_eye_arrives)
    assert route_ready(db, [VISIT]) == 0
    assert jobs(db) == []
    monkeypatch.setattr(route, "choose", matching)
    quiet_for(db, 11)
    mark_stable(db, study)
    assert route_ready(db, [VISIT]) == 1
    assert jobs(db) == [("fundus-visit", [series_uid(eyes["R"]), series_uid(eyes["L"])])]


def test_upgrade_keeps_each_earlier_job_on_its_series(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "0002")
    engine = sa.create_engine(database_url)
    now = utcnow()
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO patients (id, patient_id, patient_name) VALUES (1, 'P', '')"))
        connection.execute(
            sa.text(
                "INSERT INTO studies (id, study_uid, patient_fk, study_date, accession_number, description,"
                " first_received_at, last_received_at) VALUES (1, '1.2.3', 1, '', '', '', :t, :t)"
            ),
            {"t": now},
        )
        for series in (1, 2):
            connection.execute(
                sa.text(
                    "INSERT INTO series (id, series_uid, study_fk, modality, body_part, description,"
                    " calling_ae, called_ae, status, instance_count, late_instances, first_received_at,"
                    " last_received_at, route_note) VALUES (:id, :uid, 1, 'CT', '', '', '', '', 'routed',"
                    " 1, 0, :t, :t, '')"
                ),
                {"id": series, "uid": f"1.2.3.{series}", "t": now},
            )
        connection.execute(
            sa.text(
                "INSERT INTO jobs (id, series_fk, route, handler, model, model_version, model_sha256,"
                " options, destinations, status, attempts, error, summary, outcome, timings, created_at)"
                " VALUES (1, 2, 'r', 'ct_hemorrhage', 'ct-hemorrhage', '', '', '{}', '{}', 'done', 1, '',"
                " '', '{}', '{}', :t)"
            ),
            {"t": now},
        )
    engine.dispose()
    db = open_database(database_url)
    try:
        assert jobs(db) == [("r", ["1.2.3.2"])]
        with db.session() as session:
            assert session.scalars(select(Study.stable_at)).one() is None
    finally:
        db.dispose()


# --- the node as users run it ------------------------------------------------------------------


VISIT_ROUTE = VISIT.model_dump(exclude_defaults=True)
PHOTO_ROUTE = PHOTO.model_dump(exclude_defaults=True) | {"outputs": ["sr"]}  # a report per photograph


def visit_node(
    folder: Path, database_url: str, stable_seconds: float, routes: Sequence[dict[str, Any]], **sections: Any
) -> NodeProcess:
    node = {
        "database_url": database_url,
        "allowed_calling_aets": ["CAMERA", "ORTHANC"],
        **sections.pop("node", {}),
    }
    settings = {"node": node, "study": {"stable_seconds": stable_seconds}, "routes": list(routes), **sections}
    return NodeProcess(folder, settings)


def node_jobs(database_url: str) -> list[dict[str, Any]]:
    """The node's jobs, read from its database: route, series covered, state, result, and when the job
    was made against when the study's last instance came."""
    db = Database(database_url)
    try:
        with db.session() as session:
            return [
                {
                    "route": job.route,
                    "series": [s.series_uid for s in job.inputs],
                    "status": job.status.value,
                    "attempts": job.attempts,
                    "summary": job.summary,
                    "outcome": job.outcome,
                    "waited": (job.created_at - job.series.study.last_received_at).total_seconds(),
                }
                for job in session.scalars(select(Job).order_by(Job.id))
            ]
    finally:
        db.dispose()


def statuses_of(database_url: str) -> dict[str, SeriesStatus]:
    db = Database(database_url)
    try:
        return statuses(db)
    finally:
        db.dispose()


def all_done(database_url: str, count: int) -> list[dict[str, Any]] | None:
    found = node_jobs(database_url)
    return found if len(found) == count and all(j["status"] == "done" for j in found) else None


def check_visit_job(found: list[dict[str, Any]], eyes: dict[str, Path]) -> dict[str, Any]:
    """Exactly one study job, covering both eyes' series, run once, with both eyes in its result."""
    (visit,) = [job for job in found if job["route"] == VISIT.name]
    assert visit["series"] == [series_uid(eyes["R"]), series_uid(eyes["L"])]
    assert visit["status"] == "done" and visit["attempts"] == 1
    assert "right eye" in visit["summary"].lower() and "left eye" in visit["summary"].lower()
    sources = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in eyes.values()}
    assert {place["sop_uid"] for place in visit["outcome"]["locations"]} == sources  # one overlay per eye
    return visit


@pytest.mark.slow
def test_two_eyes_in_two_associations_make_one_study_job(database_url: str, tmp_path: Path) -> None:
    stable = 4.0
    node = visit_node(tmp_path / "node", database_url, stable, [VISIT_ROUTE, PHOTO_ROUTE]).start()
    try:
        eyes = fundus_visit(tmp_path / "visit", "assoc", {"R": DR, "L": 0})
        assert storescu(node.dicom_port, [eyes["R"]], calling="CAMERA").returncode == 0
        time.sleep(2.5)  # the other eye a few seconds later, in an association of its own
        assert node_jobs(database_url) == []
        assert storescu(node.dicom_port, [eyes["L"]], calling="CAMERA").returncode == 0
        found = wait_for(lambda: all_done(database_url, 3), 120, "three jobs done")
        visit = check_visit_job(found, eyes)
        print(f"second eye's arrival → study job: {visit['waited']:.2f} s (stable_seconds {stable:g})")
        assert stable <= visit["waited"] < stable + 3
        photos = sorted(job["series"] for job in found if job["route"] == PHOTO.name)
        assert photos == sorted([[series_uid(eyes["R"])], [series_uid(eyes["L"])]])
        time.sleep(2)
        assert len(node_jobs(database_url)) == 3  # and nothing more
    finally:
        node.stop()


@pytest.mark.slow
def test_a_node_killed_while_the_study_waits_makes_its_job_once_after_restart(
    database_url: str, tmp_path: Path
) -> None:
    stable = 8.0
    node = visit_node(tmp_path / "node", database_url, stable, [VISIT_ROUTE, PHOTO_ROUTE]).start()
    try:
        eyes = fundus_visit(tmp_path / "visit", "restart", {"R": 0, "L": DR})
        assert storescu(node.dicom_port, [eyes["R"]], calling="CAMERA").returncode == 0
        time.sleep(1)
        assert storescu(node.dicom_port, [eyes["L"]], calling="CAMERA").returncode == 0
        wait_for(lambda: len(statuses_of(database_url)) == 2, 10, "both eyes indexed", interval=0.05)
        node.kill()  # mid-wait: both eyes ready, the study not yet stable, no job made
        assert node_jobs(database_url) == []
        node.start()
        found = wait_for(lambda: all_done(database_url, 3), 120, "three jobs done after the restart")
        check_visit_job(found, eyes)
        time.sleep(2)
        assert len(node_jobs(database_url)) == 3
    finally:
        node.stop()


@pytest.mark.slow
def test_orthanc_forwards_a_two_eye_visit_and_gets_one_overlay_series_and_one_report(tmp_path: Path) -> None:
    node_port = free_port()
    lua = [REPO / "deploy" / "orthanc" / "autoroute.lua"]
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, lua=lua).start()
    node = visit_node(
        tmp_path / "node",
        f"sqlite:///{tmp_path / 'node.db'}",
        4.0,
        [VISIT_ROUTE | {"destinations": ["pacs"]}],
        node={"dicom_port": node_port},
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
        send={"first_delay_seconds": 0.5, "backoff_factor": 1.5, "max_delay_seconds": 2},
    ).start()
    try:
        eyes = fundus_visit(tmp_path / "visit", "orthanc", {"R": DR, "L": 0}, height=480)
        study_uid = str(pydicom.dcmread(eyes["R"], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(orthanc.dicom_port, [eyes["R"]], called="ORTHANC").returncode == 0
        time.sleep(2)  # the camera sends the other eye a moment later, in an association of its own
        assert storescu(orthanc.dicom_port, [eyes["L"]], called="ORTHANC").returncode == 0

        done = wait_for(
            lambda: (s := node.study(study_uid)) and s["status"] == "done" and s, 180, "status done"
        )
        found = results_in(orthanc, study_uid)
        assert len(found["SC"]) == 2 and len(found["SR"]) == 1
        (job,) = [job for series in done["series"] for job in series["jobs"]]
        assert job["series"] == [series_uid(eyes["R"]), series_uid(eyes["L"])]  # the API names both
        assert done["stable_at"] is not None and [s["route"] for s in done["series"]] == [VISIT.name] * 2
        assert done["timings"]["wait_stable"] >= 4.0  # the wait for the study counts as waiting, not queueing
        assert all(send["status"] == "sent" for r in job["results"] for send in r["sends"])

        sources = {
            str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): eye
            for eye, path in eyes.items()
        }
        overlay_series, shown = set(), {}
        for instance_id in found["SC"]:
            path = tmp_path / f"SC-{instance_id}.dcm"
            path.write_bytes(orthanc.file(instance_id))
            assert dciodvfy_errors(path) == []
            sc = pydicom.dcmread(path)
            overlay_series.add(sc.SeriesInstanceUID)
            (source,) = sc.SourceImageSequence
            shown[sources[source.ReferencedSOPInstanceUID]] = sc.Laterality
        # One overlay per eye, each eye's in a series of its own: Laterality belongs to the series.
        assert len(overlay_series) == 2 and shown == {"R": "R", "L": "L"}

        path = tmp_path / "SR.dcm"
        path.write_bytes(orthanc.file(found["SR"][0]))
        assert dciodvfy_errors(path) == []
        report = dsrdump(path)
        assert "Imaging Measurement Report" in report and "NOT FOR DIAGNOSTIC USE" in report
        assert "Diabetic retinopathy" in report
        assert set(sources) <= evidence(pydicom.dcmread(path))  # the report rests on both eyes
    finally:
        node.stop()
        orthanc.stop()


def test_infer_reads_a_visits_two_eyes_in_one_analysis(tmp_path: Path) -> None:
    eyes = fundus_visit(tmp_path / "visit", "infer", {"R": DR, "L": 0})
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps({"routes": [VISIT_ROUTE]}))
    out = tmp_path / "out"
    assert main(["infer", "--config", str(config), "--out", str(out), *map(str, eyes.values())]) == 0
    assert len(list(out.rglob("SR-*.dcm"))) == 1 and len(list(out.rglob("SC-*.dcm"))) == 2
    (report,) = out.rglob("SR-*.dcm")
    sources = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in eyes.values()}
    assert sources <= evidence(pydicom.dcmread(report))
