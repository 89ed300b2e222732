"""The Models, Routes and Destinations pages: installed packages and what they said, the routes and
their tester, the outbox and C-ECHO, against the bundled models, config.example.toml and a real Orthanc."""

from __future__ import annotations

import html
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from sqlalchemy import select

from node.config import Destination, JobSettings, Route, Settings, load_settings
from node.db import AuditEvent, Database, Job, Result, Send
from node.ingest.index import Arrival, index_arrival
from node.jobs.run import Task, run_job
from node.jobs.store import JobFailed, JobStore
from node.route import route_ready
from node.send import Sender
from node.spool import Spool
from tests.peers import OrthancServer, free_port
from tests.web import client, csrf, logged_in
from training.chest_phantom import NORMAL, chest_dicom, sample
from training.ct_phantom import write_head_ct_series

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """config.example.toml with its data under tmp_path."""
    return load_settings(
        REPO / "config.example.toml", environ={"AINODE_NODE__DATA_DIR": str(tmp_path / "var")}
    )


def as_role(db: Database, settings: Settings, role: str) -> TestClient:
    """A client logged in as a new user named after ``role``."""
    return logged_in(db, Spool(settings.node.data_dir), role, settings)


def chest(key: str, view_position: str = "PA") -> Dataset:
    return chest_dicom(sample(np.random.default_rng(8), 256, NORMAL), key, view_position=view_position)


def arrive(db: Database, settings: Settings, ds: Dataset) -> Path:
    """Index ``ds`` as if it had been received from PACS at the node's AE title."""
    path = Spool(settings.node.data_dir).instance_path(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    arrival = Arrival(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        ds.SOPClassUID,
        ds.file_meta.TransferSyntaxUID,
        path,
        path.stat().st_size,
        ds,
        "PACS",
        settings.node.ae_title,
    )
    with db.session() as session:
        index_arrival(session, arrival, settings.study)
    return path


def section(page: str, element_id: str) -> str:
    start = page.index(f'id="{element_id}"')
    return page[start : page.index("</section>", start)]


def failed(verdict: str, route: str) -> list[str]:
    """The conditions a route tester's verdict (unescaped) lists for ``route``."""
    conditions = re.search(rf"<strong>{re.escape(route)}</strong>:\s*<ul>(.*?)</ul>", verdict, re.S)
    assert conditions, f"{route} is not among the routes not taken"
    return re.findall(r"<li>(.*?)</li>", conditions.group(1))


def audited(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        )


# --- Models ---------------------------------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path, settings: Settings) -> Path:
    """The bundled packages, one card carrying raw HTML and a script link, one package's weights altered."""
    folder = tmp_path / "models"
    shutil.copytree(REPO / "models", folder)
    with (folder / "chest-xray" / "MODEL_CARD.md").open("a", encoding="utf-8") as card:
        card.write(
            '\n<script>alert("card")</script>\n\n'
            'See [this](javascript:alert(1)) and <b onclick="x()">bold</b>.\n'
        )
    with (folder / "skin-lesion-segmentation" / "weights.pt").open("ab") as weights:
        weights.write(b"\0")
    settings.node.models_dir = folder
    return folder


def test_models_page_lists_packages_renders_cards_and_counts_jobs(
    db: Database, settings: Settings, models_dir: Path, tmp_path: Path
) -> None:
    arrive(db, settings, chest("models-done"))
    arrive(db, settings, chest("models-failed"))
    assert route_ready(db, settings.routes) == 2
    store = JobStore(db, JobSettings(max_attempts=1))
    done = store.claim()
    assert done is not None
    output = run_job(Task(done.spec, done.files, str(tmp_path / "out"), str(models_dir)))
    store.finish(done.spec.job_id, output)
    failed = store.claim()
    assert failed is not None
    store.fail(failed.spec.job_id, JobFailed("error", "RuntimeError: the worker ran out of memory"))

    browser = as_role(db, settings, "viewer")
    response = browser.get("/models")
    assert response.status_code == 200
    page = response.text
    for manifest_path in sorted(models_dir.glob("*/manifest.toml")):
        manifest = tomllib.loads(manifest_path.read_text())
        part = section(page, f"model-{manifest['name']}-{manifest['version']}")
        assert manifest["sha256"] in part
        state = "MISMATCH" if manifest["name"] == "skin-lesion-segmentation" else "verified"
        assert f">{state}</span>" in part, manifest["name"]

    card = section(page, "model-chest-xray-1.0.0")
    assert "<h2>Intended use</h2>" in card and "<table>" in card  # Markdown rendered
    assert "<script>" not in card and '&lt;script&gt;alert("card")&lt;/script&gt;' in card
    assert "<b onclick" not in card and "&lt;b onclick" in card
    assert 'href="javascript' not in card and ">this</a>" in card

    # The finished job: one done, its findings' positive rates from what the model said.
    assert re.search(r"<td>1</td><td>1</td><td>0</td><td>0</td><td>0</td>", card)
    findings = output.outcome["findings"]
    assert findings, output.outcome
    for finding in findings:
        rate = "100.0 %" if finding["present"] else "0.0 %"
        meaning, present = html.escape(finding["meaning"]), int(finding["present"])
        assert f"<td>{meaning}</td><td>{present}</td><td>1</td><td>{rate}</td>" in card
    # The failed job ran no model: its version is not recorded, and it is counted apart.
    others = page[page.index("Jobs of model versions not installed here") :]
    assert "<td>chest-xray</td><td>(not recorded)</td><td>1</td><td>0</td><td>1</td>" in others
    with db.session() as session:
        assert {job.status for job in session.scalars(select(Job))} == {"done", "failed"}


def test_pages_need_a_login(db: Database, settings: Settings) -> None:
    anonymous = client(db, Spool(settings.node.data_dir), settings)
    for path in ("/models", "/routes", "/destinations"):
        response = anonymous.get(path)
        assert response.status_code == 303 and response.headers["location"] == f"/login?next={path}"


# --- Routes ---------------------------------------------------------------------------------------


def test_routes_page_lists_the_configured_routes(db: Database, settings: Settings) -> None:
    page = as_role(db, settings, "viewer").get("/routes").text
    configured = tomllib.loads((REPO / "config.example.toml").read_text())["routes"]
    assert [route["name"] for route in configured] == re.findall(
        r'<section class="[^"]*" id="route-([^"]+)"', page
    )
    chest_part = html.unescape(section(page, "route-chest-xray"))
    assert "<code>Modality</code> is 'CR' or 'DX'" in chest_part
    assert "<code>ViewPosition</code> is 'PA' or 'AP' or absent" in chest_part
    assert "<code>SOPClassUID</code> is '1.2.840.10008.5.1.4.1.1.2' (CT Image Storage)" in html.unescape(
        section(page, "route-head-ct")
    )
    assert "<code>chest_xray</code>" in chest_part and "<th>Group</th><td>series</td>" in chest_part
    skin = html.unescape(section(page, "route-skin-dermoscopy"))
    assert "segmentation: skin-lesion-segmentation" in skin and "<code>seg</code>" in skin
    fundus = section(page, "route-fundus")
    assert "<th>Group</th><td>study</td>" in fundus
    assert 'action="/routes/test"' not in page  # a viewer may not test


def odd_length_body_part(tmp_path: Path) -> bytes:
    """A chest film whose Body Part Examined is written as a 3-byte US: it reads, but fails as routing
    reads that value."""
    ds = chest("tester-odd")
    del ds.BodyPartExamined
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    raw = (tmp_path / "odd.dcm").read_bytes()
    kvp = raw.index(b"\x18\x00\x60\x00")  # (0018,0060) follows (0018,0015)
    return raw[:kvp] + b"\x18\x00\x15\x00US\x03\x00abc" + raw[kvp:]


def test_route_tester_names_the_route_and_why_not_the_others(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    # A site's route on patient identity: the tester routes by it but never shows the value.
    settings.routes.append(
        Route(
            name="research", match={"PatientID": {"glob": "RES*"}}, handler="chest_xray", model="chest-xray"
        )
    )
    browser = as_role(db, settings, "operator")
    assert 'action="/routes/test"' in browser.get("/routes").text
    pa, lateral = chest("tester-pa"), chest("tester-ll", "LL")
    ct = write_head_ct_series(tmp_path / "ct", 1, hemorrhage=False, seed=5, size=64)[0]
    files = []
    for name, ds in (("pa.dcm", pa), ("lateral.dcm", lateral)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        files.append(("files", (name, (tmp_path / name).read_bytes(), "application/dicom")))
    files.append(("files", ("ct.dcm", ct.read_bytes(), "application/dicom")))
    files.append(("files", ("notes.txt", b"not DICOM at all", "text/plain")))
    files.append(("files", ("odd.dcm", odd_length_body_part(tmp_path), "application/dicom")))
    response = browser.post("/routes/test", files=files, data={"csrf_token": csrf(browser)})
    assert response.status_code == 200, response.text
    text = html.unescape(response.text)
    verdicts = text[text.index('<section class="verdicts">') :]
    blocks = dict(re.findall(r"<h4>([^:]+):(.*?)</article>", verdicts, re.S))
    assert re.search(r"takes <span[^>]*>chest-xray</span>", blocks["pa.dcm"])
    assert failed(blocks["pa.dcm"], "head-ct")[0] == "Modality is 'DX', wanted 'CT'"
    assert failed(blocks["pa.dcm"], "head-ct")[2] == "BodyPartExamined is 'CHEST', wanted ['HEAD', 'BRAIN']"
    assert "<strong>chest-xray</strong>" not in blocks["pa.dcm"]  # the route it takes is not "failed"
    assert pa.SOPInstanceUID in blocks["pa.dcm"] and pa.SeriesInstanceUID in blocks["pa.dcm"]
    assert "no route" in blocks["lateral.dcm"]
    assert failed(blocks["lateral.dcm"], "chest-xray") == [
        "ViewPosition is 'LL', wanted ['PA', 'AP', {'exists': False}]"
    ]
    assert re.search(r"takes <span[^>]*>head-ct</span>", blocks["ct.dcm"])
    assert "not a DICOM file" in blocks["notes.txt"]
    assert "could not be routed (BytesLengthException)" in blocks["odd.dcm"]  # and the others still are
    # The tags the routes look at are shown; the patient's identity is not.
    assert "<th><code>BodyPartExamined</code></th><td>CHEST</td>" in blocks["pa.dcm"]
    assert "<th><code>PatientID</code></th><td>(patient data, not shown)</td>" in blocks["pa.dcm"]
    assert failed(blocks["pa.dcm"], "research") == [
        "PatientID is '(patient data, not shown)', wanted {'glob': 'RES*'}"
    ]
    for phi in (str(pa.PatientName), pa.PatientID, pa.AccessionNumber, "PHANTOM"):
        assert phi not in text
    # Nothing stored; the test audited with who ran it and what each file took.
    with db.session() as session:
        assert session.scalars(select(Job)).first() is None
    assert not list((settings.node.data_dir / "incoming").rglob("*.dcm"))
    [event] = audited(db, "routes.tested")
    assert event.actor == "user:operator"
    assert [(f["sop_uid"], f["routes"]) for f in event.detail["files"]][:3] == [
        (pa.SOPInstanceUID, ["chest-xray"]),
        (lateral.SOPInstanceUID, []),
        (dcmread(ct).SOPInstanceUID, ["head-ct"]),
    ]


def test_route_tester_needs_the_operator_role_and_a_csrf_token(db: Database, settings: Settings) -> None:
    payload = [("files", ("pa.dcm", b"", "application/dicom"))]
    viewer = as_role(db, settings, "viewer")
    assert viewer.post("/routes/test", files=payload, data={"csrf_token": csrf(viewer)}).status_code == 403
    operator = as_role(db, settings, "operator")
    assert operator.post("/routes/test", files=payload, data={"csrf_token": "forged"}).status_code == 403
    assert audited(db, "routes.tested") == []


# --- Destinations ---------------------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc").start()
    yield server
    server.stop()


def test_destinations_outbox_and_echo(db: Database, settings: Settings, orthanc: OrthancServer) -> None:
    closed = free_port()  # nothing listens here
    settings.destinations = [
        Destination(name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port),
        Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=closed),
    ]
    path = arrive(db, settings, chest("destinations"))
    route_ready(db, settings.routes)
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        sent = dcmread(path)
        result = Result(
            job=job, kind="SC", sop_uid=sent.SOPInstanceUID, sop_class_uid=sent.SOPClassUID, path=str(path)
        )
        session.add_all([Send(result=result, destination="pacs"), Send(result=result, destination="archive")])
        session.add(Send(result=result, destination="retired"))
    assert Sender(settings, db).run_due() == 1  # pacs took it; archive refused; retired is unknown
    assert orthanc.client.get_instances()  # really stored in Orthanc

    viewer = as_role(db, settings, "viewer")
    page = viewer.get("/destinations").text
    rows = {m[0]: m[1] for m in re.findall(r'<tr id="destination-([^"]+)">(.*?)</tr>', page, re.S)}
    pacs = rows["pacs"]
    assert f"<td>{orthanc.dicom_port}</td>" in pacs
    assert "<td>0</td><td>1</td><td>0</td>" in pacs  # pending, sent, failed
    assert re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</td>", pacs)  # the last success
    archive = rows["archive"]
    assert "<td>1</td><td>0</td><td>0</td>" in archive
    assert f"no association with ARCHIVE@127.0.0.1:{closed}" in archive and "after 1 attempt)" in archive
    assert "Traceback" not in page
    retired = page[page.index("no longer configured") :]
    assert "<td>retired</td><td>1</td>" in retired
    assert "C-ECHO</button>" not in page  # a viewer may not echo
    assert viewer.post("/destinations/pacs/echo", data={"csrf_token": csrf(viewer)}).status_code == 403

    operator = as_role(db, settings, "operator")
    ok = html.unescape(operator.post("/destinations/pacs/echo", data={"csrf_token": csrf(operator)}).text)
    assert f"C-ECHO ORTHANC@127.0.0.1:{orthanc.dicom_port}: success" in ok
    refused = operator.post("/destinations/archive/echo", data={"csrf_token": csrf(operator)})
    assert refused.status_code == 200
    assert f"C-ECHO ARCHIVE@127.0.0.1:{closed}: no association" in html.unescape(refused.text)
    assert operator.post("/destinations/nowhere/echo", data={"csrf_token": csrf(operator)}).status_code == 404
    assert operator.post("/destinations/pacs/echo", data={"csrf_token": "forged"}).status_code == 403
    events = audited(db, "destination.echo")
    assert [(e.actor, e.outcome, e.detail["destination"]) for e in events] == [
        ("user:operator", "success", "pacs"),
        ("user:operator", "failure", "archive"),
    ]
