from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from node.config import Route, Settings, StudySettings
from node.db import AuditEvent, Database
from node.ingest.completion import mark_stable
from node.route import route_ready
from node.spool import Spool
from node.web.app import create_app
from tests.test_flow import STUDY, instance, store
from tests.web import client, logged_in


def test_health_studies_detail_and_metrics(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    study = StudySettings(stable_seconds=0)
    for _ in range(3):
        store(db, instance(spool), study)
    mark_stable(db, study)
    route_ready(
        db, [Route(name="head", handler="ct_hemorrhage", model="ct-hemorrhage", match={"Modality": "CT"})]
    )
    health = client(db, spool).get("/healthz")  # open to monitoring, without credentials
    assert health.status_code == 200 and health.json()["database"] is True
    assert "DOE" not in health.text and "P1" not in health.text
    viewer = logged_in(db, spool, "viewer")

    [row] = viewer.get("/api/studies").json()
    assert row["study_uid"] == STUDY and row["instances"] == 3 and row["status"] == "processing"
    assert row["timings"]["wait_stable"] is not None and row["timings"]["process"] is None
    assert "patient" not in row  # the list shows no identity

    detail = viewer.get(f"/api/studies/{STUDY}").json()
    assert detail["patient"] == {"id": "P1", "name": "DOE^JANE"}
    assert detail["series"][0]["jobs"][0]["status"] == "queued"
    with db.session() as session:
        viewed = session.scalars(select(AuditEvent).where(AuditEvent.action == "phi.viewed")).one()
        assert viewed.study_uid == STUDY and viewed.actor == "user:viewer"

    assert viewer.get("/api/studies/1.2.3.4").status_code == 404
    metrics = viewer.get("/metrics").text
    assert "ainode_instances_received_total 3.0" in metrics
    assert 'ainode_jobs{status="queued"} 1.0' in metrics


def test_health_fails_when_dicom_is_down(db: Database, tmp_path: Path) -> None:
    app = create_app(db, Spool(tmp_path), Settings(), dicom_listening=lambda: False)
    response = TestClient(app).get("/healthz")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"
