"""POST /api/studies: DICOM files, zip archives of them and photographs into the node through the same
ingest as a C-STORE (spool, index, audit, refusals), the user as their origin, their studies
complete at once. The app runs against a real indexer and database; the last test runs the node as
users do, with a real Orthanc receiving the results."""

from __future__ import annotations

import asyncio
import io
import tomllib
import tracemalloc
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.fileset import FileSet
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select
from starlette.requests import Request

from node.config import Settings
from node.db import AuditEvent, Database, Instance, Job, Series, SeriesStatus
from node.ingest.accept import Ingest, Origin
from node.ingest.index import Indexer
from node.ingest.upload import UPLOADING, Upload, remove_leftovers
from node.route import route_ready
from node.spool import Spool
from node.web import api
from node.web.app import create_app
from node.web.auth import Principal
from tests import web
from tests.peers import REPO, NodeProcess, OrthancServer, dciodvfy_errors, free_port, wait_for
from tests.test_photo import FORM, NOW, SECRETS, jpeg_with_exif
from training import conjunctiva_phantom, skin_phantom
from training.ct_phantom import write_head_ct_series

PHOTO_ROUTES = ("conjunctiva-anemia", "skin-photo")
FILE_MB = 1  # [node] max_instance_mb here
UPLOAD_MB = 3  # [node] max_upload_mb here


def example_routes() -> list[dict[str, Any]]:
    """The photograph routes as config.example.toml writes them (sending nowhere here)."""
    routes = tomllib.loads((REPO / "config.example.toml").read_text())["routes"]
    return [{**route, "destinations": []} for route in routes if route["name"] in PHOTO_ROUTES]


@dataclass
class Site:
    db: Database
    settings: Settings
    spool: Spool
    indexer: Indexer
    client: TestClient

    def post(self, files: list[tuple[str, bytes]], **fields: str) -> Any:
        return self.client.post(
            "/api/studies",
            files=[("files", (name, data)) for name, data in files],
            data=fields,
            headers={"X-CSRF-Token": web.csrf(self.client)},
        )

    def events(self, action: str) -> list[AuditEvent]:
        with self.db.session() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))

    def series(self, study_uid: str) -> list[Series]:
        """The study's series once every one is ready: the upload declared them complete, and the
        quiet period (an hour here) is not what readied them."""

        def ready() -> list[Series] | None:
            with self.db.session() as session:
                found = session.scalars(select(Series).where(Series.study.has(study_uid=study_uid))).all()
            return list(found) if found and all(s.status == SeriesStatus.READY for s in found) else None

        return wait_for(ready, 30, "the uploaded study's series ready")  # type: ignore[no-any-return]

    def path(self, sop_uid: str) -> Path:
        with self.db.session() as session:
            return Path(session.scalars(select(Instance.path).where(Instance.sop_uid == sop_uid)).one())


@pytest.fixture
def site(db: Database, tmp_path: Path) -> Iterator[Site]:
    settings = Settings.model_validate(
        {
            "node": {"data_dir": str(tmp_path), "max_instance_mb": FILE_MB, "max_upload_mb": UPLOAD_MB},
            "study": {"stable_seconds": 3600},  # ready at once only when declared complete
            "routes": example_routes(),
        }
    )
    spool = Spool(tmp_path)
    indexer = Indexer(db, settings.study, on_ready=lambda: None)
    indexer.start()
    ingest = Ingest(settings, db, spool, indexer)
    app = create_app(db, spool, settings, complete_study=indexer.complete_study, ingest=ingest)
    client = TestClient(app, base_url="https://testserver", follow_redirects=False)
    web.make_user(db, "oscar", "operator")
    web.login(client, "oscar")
    try:
        yield Site(db, settings, spool, indexer, client)
    finally:
        indexer.stop()


@pytest.mark.parametrize(("task", "route"), [("conjunctiva", "conjunctiva-anemia"), ("skin", "skin-photo")])
def test_a_photo_becomes_a_valid_photograph_routed_to_its_task_at_once(
    site: Site, task: str, route: str
) -> None:
    response = site.post([("eye.jpg", jpeg_with_exif())], task=task, **FORM)
    assert response.status_code == 201, response.text
    answer = response.json()
    [study_uid] = answer["studies"]
    [file] = answer["files"]
    assert file["status"] == "accepted" and file["study_uid"] == study_uid and file["reason"] is None
    [series] = site.series(study_uid)  # declared complete when the upload ended
    path = site.path(file["sop_uid"])
    assert dciodvfy_errors(path) == []
    stored = path.read_bytes()
    assert not any(secret.encode() in stored for secret in SECRETS)
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (40, 20)  # EXIF orientation 6 applied
    assert ds.OperatorsName == "oscar" and ds.PatientID == FORM["patient_id"]
    assert ds.file_meta.SendingApplicationEntityTitle == ""  # no calling AE: routes by AE do not match
    assert series.calling_ae == ""
    assert route_ready(site.db, site.settings.routes) == 1
    with site.db.session() as session:
        assert session.scalars(select(Job.route)).all() == [route]
    [stored_event] = site.events("instance.stored")
    assert stored_event.actor == "user:oscar" and stored_event.study_uid == study_uid
    [uploaded] = site.events("study.uploaded")
    assert uploaded.actor == "user:oscar" and uploaded.outcome == "success"
    assert uploaded.detail["files"] == [{"name": "eye.jpg", "bytes": len(jpeg_with_exif())}]
    assert uploaded.detail["studies"] == [study_uid] and uploaded.study_uid == study_uid
    assert FORM["patient_id"] not in str(uploaded.detail)  # events name studies, not patients
    assert (uploaded.detail["accepted"], uploaded.detail["refused"]) == (1, 0)


def test_a_worklist_study_uid_and_a_japanese_name_are_kept(site: Site) -> None:
    study_uid, name = "1.2.826.0.1.3680043.8.498.1", "山田^太郎=やまだ^たろう"
    response = site.post(
        [("a.jpg", jpeg_with_exif()), ("b.jpg", jpeg_with_exif())],
        task="skin",
        **{**FORM, "patient_name": name, "study_uid": study_uid},
    )
    assert response.status_code == 201, response.text
    assert response.json()["studies"] == [study_uid]
    [series] = site.series(study_uid)
    assert series.instance_count == 2  # one series per upload's photographs
    detail = site.client.get(f"/api/studies/{study_uid}").json()
    assert detail["patient"]["name"] == name


def test_a_zip_of_ct_slices_and_loose_files_are_accepted_and_indexed(site: Site, tmp_path: Path) -> None:
    slices = write_head_ct_series(tmp_path / "ct", 5, hemorrhage=False, seed=3, size=64)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in slices[:3]:
            zipped.write(path, f"CT/{path.name}")
    response = site.post([("ct.zip", archive.getvalue())] + [(p.name, p.read_bytes()) for p in slices[3:]])
    assert response.status_code == 201, response.text
    answer = response.json()
    [study_uid] = answer["studies"]
    assert [f["status"] for f in answer["files"]] == ["accepted"] * 5
    assert answer["files"][0]["name"] == f"ct.zip/CT/{slices[0].name}"
    [series] = site.series(study_uid)
    assert series.instance_count == 5 and series.modality == "CT"
    assert {e.actor for e in site.events("instance.stored")} == {"user:oscar"}
    assert list((site.spool.root / UPLOADING).iterdir()) == []  # the upload's own copies are gone


def test_the_folders_of_uploads_a_crash_cut_short_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    (spool.root / UPLOADING / "tmpx1").mkdir(parents=True)
    (spool.root / UPLOADING / "tmpx1" / "1.dcm").write_bytes(b"half")
    remove_leftovers(spool)
    assert not (spool.root / UPLOADING).exists() and spool.incoming.is_dir()


def zip_of(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return out.getvalue()


def test_what_is_not_dicom_a_corrupt_zip_and_a_zip_bomb_are_refused_with_reasons(site: Site) -> None:
    bomb = zip_of({"big.dcm": b"\x00" * (8 * FILE_MB * 2**20)})  # a few kB that unpack to 8 MB
    assert len(bomb) < 64 * 1024
    mixed = zip_of({"notes/": b"", "notes/readme.txt": b"hello", "eye.jpg": jpeg_with_exif()})
    response = site.post(
        [
            ("notes.txt", b"not a DICOM file"),
            ("broken.zip", b"PK\x03\x04" + b"\x01" * 200),
            ("bomb.zip", bomb),
            ("mixed.zip", mixed),
        ]
    )
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["studies"] == []
    reasons = {f["name"]: f["reason"] for f in answer["files"] if f["status"] == "refused"}
    assert len(reasons) == len(answer["files"]) == 5  # the folder entry "notes/" is no file of its own
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "not a readable zip archive" in reasons["broken.zip"]
    assert f"over {FILE_MB} MB" in reasons["bomb.zip/big.dcm"]
    assert "not a DICOM file" in reasons["mixed.zip/notes/readme.txt"]
    assert "DICOM files only" in reasons["mixed.zip/eye.jpg"]
    # The ingest audits what it refused; the upload what never reached it.
    assert [e.detail["reason"] for e in site.events("instance.refused")] == [
        reasons["notes.txt"],
        reasons["mixed.zip/notes/readme.txt"],
    ]
    refused = {e.detail["file"] for e in site.events("upload.refused")}
    assert refused == {"broken.zip", "bomb.zip/big.dcm", "mixed.zip/eye.jpg"}
    assert {e.actor for e in site.events("upload.refused")} == {"user:oscar"}
    [uploaded] = site.events("study.uploaded")
    assert uploaded.outcome == "failure"
    assert (uploaded.detail["accepted"], uploaded.detail["refused"]) == (0, 5)
    with site.db.session() as session:
        assert session.scalars(select(Instance)).all() == []


def test_a_cd_export_is_taken_but_its_dicomdir_and_what_zipfile_cannot_bound_are_refused(
    site: Site, tmp_path: Path
) -> None:
    slices = write_head_ct_series(tmp_path / "ct", 3, hemorrhage=False, seed=5, size=64)
    fileset = FileSet()
    for path in slices[:2]:
        fileset.add(path)
    fileset.write(tmp_path / "cd")  # DICOMDIR and PT000000/ST000000/SE000000/IM00000n, as a CD holds them
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(p for p in (tmp_path / "cd").rglob("*") if p.is_file()):
            zipped.write(path, path.relative_to(tmp_path / "cd").as_posix())
        zipped.write(slices[2], "bzip2.dcm", compress_type=zipfile.ZIP_BZIP2)  # not bounded when unpacked
    response = site.post([("cd.zip", archive.getvalue())])
    assert response.status_code == 201, response.text
    outcomes = {f["name"].removeprefix("cd.zip/"): f for f in response.json()["files"]}
    assert "DICOMDIR" in outcomes["DICOMDIR"]["reason"]
    assert "deflate" in outcomes["bzip2.dcm"]["reason"]
    accepted = [name for name, f in outcomes.items() if f["status"] == "accepted"]
    assert sorted(accepted) == [f"PT000000/ST000000/SE000000/IM00000{n}" for n in range(2)]
    [study_uid] = response.json()["studies"]
    assert site.series(study_uid)[0].instance_count == 2
    assert {e.detail["file"] for e in site.events("upload.refused")} == {
        "cd.zip/DICOMDIR",
        "cd.zip/bzip2.dcm",
    }
    assert site.events("instance.refused") == []  # neither reached the ingest


def test_a_file_over_the_instance_limit_and_an_archive_over_the_upload_limit_are_refused(
    site: Site, tmp_path: Path
) -> None:
    [large] = write_head_ct_series(tmp_path / "large", 1, hemorrhage=False, seed=4, size=1024)  # 2 MB
    member = b"\x00" * (FILE_MB * 2**20 - 1)  # each under the instance limit, 4 over the upload's
    archive = zip_of({f"{n}.dcm": member for n in range(4)})
    response = site.post([("large.dcm", large.read_bytes()), ("many.zip", archive)])
    assert response.status_code == 422, response.text
    reasons = [f["reason"] for f in response.json()["files"]]
    assert f"over {FILE_MB} MB" in reasons[0]  # the ingest's own reason, as a C-STORE gets it
    assert ["not a DICOM file" in r for r in reasons[1:4]] == [True] * 3
    assert f"unpacks to more than {UPLOAD_MB} MB" in reasons[4]
    assert "0xC002" in {e.detail["status"] for e in site.events("instance.refused")}


def test_invalid_patient_details_are_refused_per_field_before_anything_is_stored(site: Site) -> None:
    form = {**FORM, "patient_id": "", "patient_birth_date": "2999-01-01", "patient_name": "A\\B"}
    response = site.post([("eye.jpg", jpeg_with_exif())], task="eyebrow", **form)
    assert response.status_code == 422, response.text
    fields = [error["field"] for error in response.json()["detail"]]
    assert fields == ["task", "patient_name", "patient_id", "patient_birth_date"]
    assert all(error["message"] for error in response.json()["detail"])
    with site.db.session() as session:
        assert session.scalars(select(Instance)).all() == []
    assert site.events("study.uploaded") == []


def test_a_malformed_form_an_oversized_upload_and_a_viewer_are_refused(site: Site, db: Database) -> None:
    response = site.client.post(
        "/api/studies", data={"task": "skin"}, headers={"X-CSRF-Token": web.csrf(site.client)}
    )
    assert response.status_code == 400 and "files" in response.json()["detail"]
    garbled = site.client.post(
        "/api/studies",
        content=b"--x\r\nContent-Disposition: form-data\r\n\r\nno name, no end",
        headers={"X-CSRF-Token": web.csrf(site.client), "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert garbled.status_code == 400, garbled.text
    in_the_form = site.client.post(  # the CSRF token as a form field, as an HTML form sends it
        "/api/studies", files=[("files", ("a.txt", b"x"))], data={"csrf_token": web.csrf(site.client)}
    )
    assert in_the_form.status_code == 422 and in_the_form.json()["files"][0]["name"] == "a.txt"
    big = site.post([("big.dcm", b"\x00" * (UPLOAD_MB * 2**20 + 1))])
    assert big.status_code == 413 and f"{UPLOAD_MB} MB" in big.json()["detail"]
    without_csrf = site.client.post("/api/studies", files=[("files", ("a.dcm", b"x"))])
    assert without_csrf.status_code == 403
    viewer = TestClient(site.client.app, base_url="https://testserver", follow_redirects=False)
    web.make_user(db, "victor", "viewer")
    web.login(viewer, "victor")
    refused = viewer.post(
        "/api/studies", files=[("files", ("a.dcm", b"x"))], headers={"X-CSRF-Token": web.csrf(viewer)}
    )
    assert refused.status_code == 403
    anonymous = TestClient(site.client.app, base_url="https://testserver")
    assert anonymous.post("/api/studies", files=[("files", ("a.dcm", b"x"))]).status_code == 401
    assert [e.outcome for e in site.events("study.uploaded")] == ["failure"]  # the form-token upload only


@pytest.mark.slow
def test_uploaded_photos_come_back_from_orthanc_with_their_results(tmp_path: Path) -> None:
    """A skin photo gets its SR and SEG, a conjunctiva photo its SR, in the PACS, under the form's
    patient: the node as users run it."""
    orthanc = OrthancServer(tmp_path / "orthanc").start()
    routes = tomllib.loads((REPO / "config.example.toml").read_text())["routes"]
    settings = {
        "node": {"dicom_port": free_port(), "torch_threads": 1},
        "study": {"stable_seconds": 3600},
        "destinations": [
            {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
        "routes": [route for route in routes if route["name"] in PHOTO_ROUTES],
    }
    node = NodeProcess(tmp_path / "node", settings).start()
    photos = {
        "skin": skin_phantom.render(np.random.default_rng(7), "mel").rgb,
        "conjunctiva": conjunctiva_phantom.render(np.random.default_rng(3), "eye").rgb,
    }
    wanted = {
        "skin": {str(Comprehensive3DSRStorage), str(SegmentationStorage)},
        "conjunctiva": {str(Comprehensive3DSRStorage)},
    }
    try:
        studies = {}
        for task, rgb in photos.items():
            picture = io.BytesIO()
            Image.fromarray(rgb).save(picture, "JPEG", quality=92)
            response = httpx.post(
                f"{node.url}/api/studies",
                files=[("files", (f"{task}.jpg", picture.getvalue(), "image/jpeg"))],
                data={"task": task, **FORM},
                headers=node.headers,
                timeout=60,
            )
            assert response.status_code == 201, response.text
            [studies[task]] = response.json()["studies"]

        for task, study_uid in studies.items():

            def results(study_uid: str = study_uid, task: str = task) -> dict[str, str] | None:
                classes = {}
                for series in orthanc.series_in_study(study_uid):
                    for instance_id in series["Instances"]:
                        classes[orthanc.sop_class(instance_id)] = instance_id
                return classes if wanted[task] <= classes.keys() else None

            found = wait_for(results, 240, f"the {task} photo's results in Orthanc", interval=1)
            for sop_class in wanted[task]:
                path = tmp_path / f"{task}-{sop_class}.dcm"
                path.write_bytes(orthanc.file(found[sop_class]))
                assert dciodvfy_errors(path) == [], (task, sop_class)
                assert pydicom.dcmread(path).PatientID == FORM["patient_id"]
    finally:
        node.stop()
        orthanc.stop()


def test_an_archive_is_taken_one_member_at_a_time(site: Site, tmp_path: Path) -> None:
    """Memory while an archive is taken grows by far less than the archive: six times the slices add
    less than half their bytes to the peak (what is kept per instance, its outcome and arrival, is
    small; an archive or member held whole would add all of it). tracemalloc: a memory assertion."""

    def peak(slices: int, seed: int) -> tuple[int, int]:
        paths = write_head_ct_series(tmp_path / str(seed), slices, hemorrhage=False, seed=seed, size=128)
        archive = tmp_path / f"{seed}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
            for path in paths:
                zipped.write(path, path.name)
        ingest = Ingest(site.settings, site.db, site.spool, site.indexer)
        origin = Origin("", "AINODE", "", user="user:oscar")
        with archive.open("rb") as file:
            tracemalloc.start()
            try:
                with Upload(ingest, origin, None, NOW) as upload:
                    upload.add(archive.name, file)
                _, most = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert [o.status for o in upload.outcomes] == ["accepted"] * slices
        return most, archive.stat().st_size

    (short, short_bytes), (long, long_bytes) = peak(8, 11), peak(48, 12)  # about 0.3 and 1.6 MB of slices
    assert long - short < (long_bytes - short_bytes) / 2, (short, long, long_bytes - short_bytes)


def test_the_form_keeps_little_of_each_file_in_memory() -> None:
    """Twenty files of 256 KiB: Starlette's default parser would keep each wholly in memory (below its
    1 MB spool), the upload's spools all but 64 KiB of each to disk (tracemalloc: a memory assertion)."""
    sent = [bytes([n]) * 256 * 1024 for n in range(20)]
    files = [("files", (f"{n}.dcm", data)) for n, data in enumerate(sent)]
    built = httpx.Request("POST", "https://testserver/api/studies", files=files)
    body = built.read()
    chunks = [body[at : at + 65536] for at in range(0, len(body), 65536)]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": bool(chunks)}

    headers = [(k.lower().encode(), v.encode()) for k, v in built.headers.items()]
    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    tracemalloc.start()
    try:
        form = asyncio.run(api._upload_form(request, Principal("script", "operator", "token")))
        _, most = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    uploads = form.getlist("files")
    assert [upload.file.read() for upload in uploads] == sent  # type: ignore[union-attr]
    asyncio.run(form.close())
    assert most < 20 * 256 * 1024 / 2, most
