from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import select

from node.config import Route, StudySettings
from node.db import AuditEvent, Database
from node.ingest.completion import mark_stable
from node.route import route_ready
from node.spool import Spool
from node.web.api import create_app
from tests.test_flow import STUDY, instance, store


def test_health_studies_detail_and_metrics(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    study = StudySettings(stable_seconds=0)
    for _ in range(3):
        store(db, instance(spool), study)
    mark_stable(db, study)
    route_ready(
        db, [Route(name="head", handler="ct_hemorrhage", model="ct-hemorrhage", match={"Modality": "CT"})]
    )
    client = TestClient(create_app(db, spool))

    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["database"] is True

    [row] = client.get("/api/studies").json()
    assert row["study_uid"] == STUDY and row["instances"] == 3 and row["status"] == "processing"
    assert row["timings"]["wait_stable"] is not None and row["timings"]["process"] is None
    assert "patient" not in row  # the list shows no identity

    detail = client.get(f"/api/studies/{STUDY}").json()
    assert detail["patient"] == {"id": "P1", "name": "DOE^JANE"}
    assert detail["series"][0]["jobs"][0]["status"] == "queued"
    with db.session() as session:
        viewed = session.scalars(select(AuditEvent).where(AuditEvent.action == "phi.viewed")).one()
        assert viewed.study_uid == STUDY and viewed.actor.startswith("http:")

    assert client.get("/api/studies/1.2.3.4").status_code == 404
    metrics = client.get("/metrics").text
    assert "ainode_instances_received_total 3.0" in metrics
    assert 'ainode_jobs{status="queued"} 1.0' in metrics


def test_health_fails_when_dicom_is_down(db: Database, tmp_path: Path) -> None:
    client = TestClient(create_app(db, Spool(tmp_path), dicom_listening=lambda: False))
    response = client.get("/healthz")
    assert response.status_code == 503 and response.json()["status"] == "unhealthy"
