"""The Overview, Studies and Study detail pages, on SQLite and PostgreSQL, over studies that went the
real way: files in the spool indexed (``Reconciler.at_start``), completed, routed, the job claimed, run
(the chest X-ray model, Grad-CAM, SC and SR written) and finished through the job store, the results
sent to a real Orthanc and to a destination that does not answer.

Patient names come from pydicom's character set test files, as real modalities wrote them (Korean
ISO 2022 IR 149, Japanese ISO 2022 IR 87)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset
from pydicom.data import get_charset_files
from sqlalchemy import select

from node.config import Settings
from node.db import AuditEvent, Database, Job, JobStatus, Result, Send, SendStatus, Study
from node.ingest.completion import mark_stable
from node.ingest.index import Indexer
from node.ingest.reconcile import Reconciler
from node.jobs import ExecutorContext, JobStore, dispatch
from node.jobs.local import LocalPool
from node.jobs.run import run_job
from node.route import route_ready
from node.send import Sender
from node.spool import Spool
from tests import workers
from tests.peers import OrthancServer, free_port, wait_for
from tests.web import client, csrf, logged_in, login, make_user
from training.chest_phantom import NORMAL, chest_dicom, sample

KOREAN = "Hong Gildong = 洪 吉洞 = 홍 길동"  # Hong^Gildong=洪^吉洞=홍^길동, as the list shows it
JAPANESE = "Yamada Tarou = 山田 太郎 = やまだ たろう"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def charset_file(name: str) -> Dataset:
    (path,) = [p for p in get_charset_files() if Path(p).name == name]
    return pydicom.dcmread(path)


def radiograph(key: str, name_from: str, accession: str, body_part: str = "CHEST") -> Dataset:
    """A chest DX whose patient's name is the bytes, and character set, of a pydicom test file."""
    ds = chest_dicom(sample(np.random.default_rng(3), 400, NORMAL), key)
    source = charset_file(name_from)
    ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.add(source["PatientName"])
    ds.PatientID, ds.AccessionNumber, ds.BodyPartExamined = f"PID-{key}", accession, body_part
    return ds


@dataclass
class Node:
    """The parts of a node a test drives by hand: what ``ainode serve`` runs on its timers."""

    db: Database
    spool: Spool
    settings: Settings

    def receive(self, ds: Dataset) -> None:
        """A received instance: in the spool, then indexed down the path every arrival takes."""
        path = self.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        indexer = Indexer(self.db, self.settings.study, lambda: None)
        assert Reconciler(self.settings, self.db, self.spool, indexer).at_start().indexed

    def route(self) -> int:
        mark_stable(self.db, self.settings.study)
        return route_ready(self.db, self.settings.routes)

    def run_jobs(self) -> int:
        """Claim and run each queued job in this process, as a worker would, and record it."""
        store, ran = JobStore(self.db, self.settings.jobs), 0
        context = ExecutorContext(self.settings, store, self.spool, ended=lambda: None)
        while (claim := store.claim()) is not None:
            store.finish(claim.spec.job_id, run_job(context.task(claim)))
            ran += 1
        return ran

    def send(self) -> None:
        Sender(self.settings, self.db).run_due()


@pytest.fixture
def node(db: Database, tmp_path: Path, orthanc: OrthancServer) -> Node:
    """Two studies: a Korean patient's chest radiograph analysed, its results sent to Orthanc and,
    failing, to a destination that does not answer; a Japanese patient's hand radiograph no route takes."""
    settings = Settings.model_validate(
        {
            "study": {"stable_seconds": 0},
            "jobs": {"max_attempts": 1},
            "send": {"max_attempts": 1},
            "destinations": [
                {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
                {"name": "offline", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()},
            ],
            "routes": [
                {
                    "name": "chest",
                    "match": {"Modality": "DX", "BodyPartExamined": "CHEST"},
                    "handler": "chest_xray",
                    "model": "chest-xray",
                    "options": {"max_explanations": 1},
                    "destinations": ["pacs", "offline"],
                }
            ],
        }
    )
    made = Node(db, Spool(tmp_path / "data"), settings)
    made.receive(radiograph("pages-kr", "chrI2.dcm", "ACC-KR-1"))
    made.receive(radiograph("pages-jp", "chrH31.dcm", "ACC-JP-2", body_part="HAND"))
    assert made.route() == 1
    assert made.run_jobs() == 1
    made.send()
    return made


def study_uid(db: Database, accession: str) -> str:
    with db.session() as session:
        return session.scalars(select(Study.study_uid).where(Study.accession_number == accession)).one()


def events(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )


def failed_jobs(db: Database) -> list[Job]:
    with db.session() as session:
        return list(session.scalars(select(Job).where(Job.status == JobStatus.FAILED)))


def text(html: str) -> str:
    """A page's text as a person reads it: tags dropped, entities decoded, white space collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def listed(viewer: TestClient, **query: str) -> list[str]:
    """The accession numbers of the studies the list shows for ``query``."""
    response = viewer.get("/studies", params=query)
    assert response.status_code == 200, response.text
    rows = "".join(re.findall(r"<tbody>.*?</tbody>", response.text, re.S))
    return sorted(re.findall(r"ACC-[A-Z]{2}-\d+", rows))


def test_list_shows_processed_study_with_names_in_any_charset_and_audits_the_view(node: Node) -> None:
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    page = viewer.get("/studies")
    assert page.status_code == 200
    shown = text(page.text)
    assert KOREAN in shown and JAPANESE in shown
    assert "ACC-KR-1" in shown and "PID-pages-kr" in shown
    assert "failed" in shown  # one destination never answered
    assert "no route" in shown  # the hand radiograph
    [viewed] = events(node.db, "phi.viewed")
    assert viewed.actor == "user:viewer" and viewed.detail["what"] == "studies list"
    assert set(viewed.detail["studies"]) == {study_uid(node.db, "ACC-KR-1"), study_uid(node.db, "ACC-JP-2")}


def test_filters_and_search(node: Node) -> None:
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    today = datetime.now(UTC).date()
    assert listed(viewer) == ["ACC-JP-2", "ACC-KR-1"]
    assert listed(viewer, patient="hong gildong") == ["ACC-KR-1"]
    assert listed(viewer, patient="홍") == ["ACC-KR-1"]
    assert listed(viewer, patient="山田") == ["ACC-JP-2"]
    assert listed(viewer, patient="PID-pages-jp") == ["ACC-JP-2"]
    assert listed(viewer, accession="kr-1") == ["ACC-KR-1"]
    assert listed(viewer, route="chest") == ["ACC-KR-1"]
    assert listed(viewer, modality="dx") == ["ACC-JP-2", "ACC-KR-1"]
    assert listed(viewer, modality="CT") == []
    assert listed(viewer, status="failed") == ["ACC-KR-1"]
    assert listed(viewer, status="no_route") == ["ACC-JP-2"]
    assert listed(viewer, status="done") == []
    assert listed(viewer, received_from=str(today), received_to=str(today)) == ["ACC-JP-2", "ACC-KR-1"]
    assert listed(viewer, received_from=str(today + timedelta(days=1))) == []
    assert listed(viewer, received_to=str(today - timedelta(days=1))) == []
    assert "is not a date" in viewer.get("/studies", params={"received_from": "yesterday"}).text
    # 60 more studies: the list pages by 50, newest first
    for n in range(60):
        node.receive(radiograph(f"pages-many-{n}", "chrI2.dcm", f"ACC-MN-{n}", body_part="KNEE"))
    first, second = viewer.get("/studies"), viewer.get("/studies", params={"page": 2})
    assert "62 studies, page 1 of 2" in text(first.text) and "ACC-MN-59" in first.text
    assert 'rel="next"' in first.text and 'rel="prev"' in second.text
    assert "ACC-KR-1" in second.text and "ACC-MN-59" not in second.text
    assert second.text.count('<td class="patient-name">') == 12


def test_detail_shows_what_happened_and_why(node: Node) -> None:
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    uid = study_uid(node.db, "ACC-KR-1")
    page = viewer.get(f"/studies/{uid}")
    assert page.status_code == 200
    shown = text(page.text)
    with node.db.session() as session:
        job = session.scalars(select(Job)).one()
        results = {r.kind: r for r in job.results}
        sc = pydicom.dcmread(results["SC"].path)
    assert KOREAN in shown and "ACC-KR-1" in shown
    assert f"chest-xray {job.model_version}" in shown and job.model_sha256 in shown
    assert "route chest" in shown
    # the findings table: each finding, absent or present, with its site
    for finding in job.outcome["findings"]:
        assert f"{finding['meaning']} {'present' if finding['present'] else 'absent'}" in shown
    assert "Lung" in shown and "Heart" in shown
    # the SR as a table: a measurement group per finding, its probability and finding site
    assert "Measurement Group: Pneumothorax, Lung" in shown
    assert "Finding Site Lung" in shown and "Probability" in shown and "Algorithm Version 1.0.0" in shown
    # the sends: sent to Orthanc, given up on the destination that never answered
    assert re.search(r"pacs sent 1", shown) and re.search(r"offline failed 1", shown)
    assert "no association with NOBODY" in shown
    # the overlay, rendered from the SC that was sent
    [png_url] = re.findall(r'<img class="overlay" src="([^"]+)"', page.text)
    assert png_url == f"/studies/{uid}/results/{sc.SOPInstanceUID}.png"
    png = viewer.get(png_url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (sc.Rows, sc.Columns, 3)
    assert np.array_equal(image[..., ::-1], sc.pixel_array)  # the very pixels sent, losslessly
    assert viewer.get(f"/studies/{uid}/results/{results['SR'].sop_uid}.png").status_code == 404
    assert (
        viewer.get(f"/studies/{study_uid(node.db, 'ACC-JP-2')}/results/{sc.SOPInstanceUID}.png").status_code
        == 404
    )
    # a viewer sees no actions
    assert "/rerun" not in page.text and "/delete" not in page.text
    # the page and the image fetched from it are each a PHI view
    viewed = [(e.actor, e.study_uid, e.detail["what"]) for e in events(node.db, "phi.viewed")]
    assert ("user:viewer", uid, "study detail page") in viewed
    assert viewed[-1] == ("user:viewer", uid, "overlay image")


def test_detail_names_the_distributed_worker_that_ran_a_job(node: Node) -> None:
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    uid = study_uid(node.db, "ACC-KR-1")
    assert "/workers#worker-" not in viewer.get(f"/studies/{uid}").text  # the local pool names none
    with node.db.session() as session:
        job = session.scalars(select(Job)).one()
        job.worker = "gpu-host-1"
        session.commit()
    try:
        page = viewer.get(f"/studies/{uid}").text
        assert '<a href="/workers#worker-gpu-host-1">gpu-host-1</a>' in page
        assert "Worker gpu-host-1" in text(page)
    finally:
        with node.db.session() as session:
            session.scalars(select(Job)).one().worker = ""
            session.commit()


def test_detail_says_why_no_route_matched(node: Node) -> None:
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    shown = text(viewer.get(f"/studies/{study_uid(node.db, 'ACC-JP-2')}").text)
    assert JAPANESE in shown
    assert "No route matched" in shown
    assert "chest : BodyPartExamined is 'HAND', wanted 'CHEST'" in shown
    assert "No job: no route took any series." in shown
    assert viewer.get("/studies/1.2.3.4").status_code == 404


def test_rerun_needs_an_operator_and_makes_a_new_attempt(node: Node) -> None:
    uid = study_uid(node.db, "ACC-KR-1")
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    assert viewer.post(f"/studies/{uid}/rerun", data={"csrf_token": csrf(viewer)}).status_code == 403
    operator = logged_in(node.db, node.spool, "operator", node.settings)
    assert operator.post(f"/studies/{uid}/rerun").status_code == 403  # no CSRF token
    assert operator.post(f"/studies/{uid}/rerun", data={"csrf_token": "forged"}).status_code == 403
    with node.db.session() as session:
        before = session.scalars(select(Job)).one()
        old_results = {r.sop_uid for r in before.results}
    assert before.attempts == 1 and not events(node.db, "job.rerun")

    response = operator.post(f"/studies/{uid}/rerun", data={"csrf_token": csrf(operator)})
    assert response.status_code == 303
    assert "re-run queued" in text(operator.get(response.headers["location"]).text)
    with node.db.session() as session:
        queued = session.scalars(select(Job)).one()
        assert (queued.status, queued.attempts, queued.results) == (JobStatus.QUEUED, 1, [])
    [rerun] = events(node.db, "job.rerun")
    assert (rerun.actor, rerun.study_uid, rerun.detail["job"]) == ("user:operator", uid, before.id)
    assert "processing" in text(operator.get("/studies", params={"accession": "ACC-KR-1"}).text)

    assert node.run_jobs() == 1
    node.send()
    with node.db.session() as session:
        again = session.scalars(select(Job)).one()
        assert (again.status, again.attempts) == (JobStatus.DONE, 2)
        assert {r.sop_uid for r in again.results}.isdisjoint(old_results)
    assert [e.detail["attempt"] for e in events(node.db, "job.started")] == [1, 2]
    assert len(events(node.db, "job.finished")) == 2  # both runs, in the audit log


def test_resend_queues_the_results_again(node: Node) -> None:
    uid = study_uid(node.db, "ACC-KR-1")
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    assert viewer.post(f"/studies/{uid}/resend", data={"csrf_token": csrf(viewer)}).status_code == 403
    operator = logged_in(node.db, node.spool, "operator", node.settings)
    response = operator.post(f"/studies/{uid}/resend", data={"csrf_token": csrf(operator)})
    assert response.status_code == 303
    with node.db.session() as session:
        sends = session.scalars(select(Send)).all()
        assert len(sends) == 4 and {(s.status, s.attempts) for s in sends} == {(SendStatus.PENDING, 0)}
    [resend] = events(node.db, "result.resend")
    assert (resend.actor, resend.detail["sends"], resend.detail["destinations"]) == (
        "user:operator",
        4,
        ["offline", "pacs"],
    )
    node.send()
    with node.db.session() as session:
        assert sorted((s.destination, s.status) for s in session.scalars(select(Send))) == [
            ("offline", SendStatus.FAILED),
            ("offline", SendStatus.FAILED),
            ("pacs", SendStatus.SENT),
            ("pacs", SendStatus.SENT),
        ]


def test_delete_needs_an_admin_and_a_confirmation(node: Node) -> None:
    uid = study_uid(node.db, "ACC-KR-1")
    with node.db.session() as session:
        job = session.scalars(select(Job)).one()
        files = [Path(r.path) for r in job.results] + [Path(i.path) for s in job.inputs for i in s.instances]
    assert all(path.exists() for path in files)
    operator = logged_in(node.db, node.spool, "operator", node.settings)
    assert operator.get(f"/studies/{uid}/delete").status_code == 403
    assert (
        operator.post(
            f"/studies/{uid}/delete", data={"csrf_token": csrf(operator), "confirm": "yes"}
        ).status_code
        == 403
    )
    admin = logged_in(node.db, node.spool, "admin", node.settings)
    assert "/delete" in admin.get(f"/studies/{uid}").text

    unconfirmed = admin.post(f"/studies/{uid}/delete", data={"csrf_token": csrf(admin)})
    assert unconfirmed.status_code == 303 and unconfirmed.headers["location"] == f"/studies/{uid}/delete"
    confirm = admin.get(f"/studies/{uid}/delete")
    assert confirm.status_code == 200 and "This cannot be undone" in confirm.text
    assert study_uid(node.db, "ACC-KR-1") == uid and all(path.exists() for path in files)

    deleted = admin.post(f"/studies/{uid}/delete", data={"csrf_token": csrf(admin), "confirm": "yes"})
    assert deleted.status_code == 303 and deleted.headers["location"].startswith("/studies?done=")
    with node.db.session() as session:
        assert session.scalars(select(Study.accession_number)).all() == ["ACC-JP-2"]
        assert session.scalars(select(Job)).all() == [] and session.scalars(select(Result)).all() == []
    assert not any(path.exists() for path in files)
    assert not (node.spool.incoming / uid).exists() and not node.spool.result_dir(job.id).exists()
    [event] = events(node.db, "study.deleted")
    assert (event.actor, event.study_uid, event.detail["jobs"]) == ("user:admin", uid, 1)
    assert admin.get(f"/studies/{uid}").status_code == 404


def test_overview_answers_is_it_working(node: Node) -> None:
    anonymous = client(node.db, node.spool, node.settings)
    assert anonymous.get("/api/overview").status_code == 401
    assert anonymous.get("/").status_code == 303
    make_user(node.db, "viewer", "viewer")
    login(anonymous, "viewer")
    figures = anonymous.get("/api/overview").json()
    assert figures["activity"]["hour"] == {"received": 2, "processed": 1, "failed": 0, "results_sent": 2}
    assert figures["queues"]["jobs_queued"] == 0 and figures["queues"]["sends_pending"] == 0
    with node.db.session() as session:
        sent = max(s.sent_at for s in session.scalars(select(Send)) if s.sent_at)
        arrived = session.scalars(
            select(Study.first_received_at).where(Study.accession_number == "ACC-KR-1")
        ).one()
    assert figures["latency"]["studies"] == 1
    assert figures["latency"]["p50"] == pytest.approx((sent - arrived).total_seconds(), abs=0.1)
    [model] = figures["models"]
    assert (model["model"], model["done"], model["analysed"], model["failed"]) == ("chest-xray", 1, 1, 0)
    assert model["positive_rate"] in (0.0, 1.0)
    by_name = {d["name"]: d for d in figures["destinations"]}
    assert by_name["pacs"]["sent"] == 2 and by_name["pacs"]["failed"] == 0
    assert by_name["offline"]["failed"] == 2 and "no association" in by_name["offline"]["last_error"]
    assert figures["disk"]["free_bytes"] > 0
    assert "2 result(s) could not be sent to offline" in figures["problems"]
    assert not events(node.db, "phi.viewed")  # the overview shows no patient data

    shown = text(anonymous.get("/").text)
    assert "Needs attention" in shown and "could not be sent to offline" in shown
    assert "send to offline gave up" in shown
    assert "Traceback" not in shown


def test_a_failed_job_shows_its_error_without_the_stack(node: Node) -> None:
    """A job body that raises in a worker process: its error is kept with the worker's traceback, the
    pages show the exception and its message only."""
    node.receive(radiograph("pages-fail", "chrI2.dcm", "ACC-FL-3"))
    assert node.route() == 1
    store = JobStore(node.db, node.settings.jobs)
    context = ExecutorContext(node.settings, store, node.spool, ended=lambda: None)
    executor = LocalPool(context, work=workers.fail)
    executor.start()
    try:
        assert dispatch(store, executor) == 1
        wait_for(lambda: failed_jobs(node.db), 120, "the job to fail")
    finally:
        executor.shutdown()
    [job] = failed_jobs(node.db)
    assert "Traceback (most recent call last)" in job.error  # kept for whoever reads the database
    viewer = logged_in(node.db, node.spool, "viewer", node.settings)
    detail = text(viewer.get(f"/studies/{study_uid(node.db, 'ACC-FL-3')}").text)
    assert f"Error ValueError: bad input for job {job.id}" in detail and "Traceback" not in detail
    overview = text(viewer.get("/").text)
    assert f"job {job.id} (chest, chest-xray) failed ValueError: bad input for job {job.id}" in overview
    assert "1 study with a failed job in the last hour" in overview and "Traceback" not in overview
    assert viewer.get("/api/overview").json()["activity"]["hour"]["failed"] == 1
