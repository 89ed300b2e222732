"""Series complete by what the network says, with real peers: Orthanc forwarding (the node configured
with ORTHANC as a forwarder), Orthanc's study-complete notification (deploy/orthanc/notify.lua), and a
modality (storescu) that is not a forwarder. ``stable_seconds`` is 600: only the new rules can make a
series ready within these tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from node import audit
from node.accounts import create_token
from node.config import load_settings
from node.db import AuditEvent, open_database
from tests.peers import REPO, NodeProcess, OrthancServer, free_port, storescu, wait_for
from tests.test_end_to_end import node_settings, wait_for_results
from training.ct_phantom import write_head_ct_series

pytestmark = pytest.mark.slow


def settings(node_port: int, pacs_port: int, forwarders: list[str]) -> dict[str, Any]:
    made = node_settings(node_port, pacs_port)
    made["study"] = {"stable_seconds": 600, "forwarders": forwarders}
    return made


def head_ct(folder: Path, seed: int) -> tuple[list[Path], str]:
    files = write_head_ct_series(folder, 12, hemorrhage=True, seed=seed, size=256)
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def audited(node: NodeProcess, action: str) -> list[AuditEvent]:
    db = open_database(load_settings(node.config).node.resolved_database_url)
    try:
        with db.session() as session:
            return list(session.query(AuditEvent).filter(AuditEvent.action == action))
    finally:
        db.dispose()


def test_a_series_forwarded_by_orthanc_is_ready_when_its_association_is_released(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port).start()
    node = NodeProcess(tmp_path / "node", settings(node_port, orthanc.dicom_port, ["ORTHANC"])).start()
    try:
        direct, direct_uid = head_ct(tmp_path / "direct", 11)
        assert storescu(node.dicom_port, direct).returncode == 0  # STORESCU: not a forwarder
        wait_for(lambda: (s := node.study(direct_uid)) and s["instances"] == len(direct), 30, "indexed")

        forwarded, forwarded_uid = head_ct(tmp_path / "forwarded", 12)
        assert storescu(orthanc.dicom_port, forwarded, called="ORTHANC").returncode == 0
        orthanc_id = orthanc.client.post_tools_lookup(data=forwarded_uid)[0]["ID"]
        orthanc.client.post_modalities_id_store("ainode", json={"Resources": [orthanc_id]})
        found = wait_for_results(orthanc, forwarded_uid)
        assert len(found["SC"]) == 3 and len(found["SR"]) == 1

        # Routed and done while the modality's series, indexed before, still waits for its quiet period.
        assert node.study(direct_uid)["status"] == "receiving"  # type: ignore[index]
        [ready] = audited(node, "series.ready")
        assert ready.study_uid == forwarded_uid
        assert ready.detail["reason"] == "association released by forwarder ORTHANC"
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_notify_script_forwards_a_study_and_says_it_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_port, pacs_port = free_port(), free_port()
    node = NodeProcess(tmp_path / "node", settings(node_port, pacs_port, [])).start()  # no forwarders
    orthanc = None
    try:
        db = open_database(load_settings(node.config).node.resolved_database_url)
        audit.configure(db, load_settings(node.config))  # the token's audit event joins the node's chain
        token = create_token(db, "orthanc", "operator", actor="test")
        db.dispose()
        monkeypatch.setenv("AI_NODE_URL", node.url)  # what notify.lua reads from Orthanc's environment
        monkeypatch.setenv("AI_NODE_TOKEN", token)
        script = REPO / "deploy" / "orthanc" / "notify.lua"
        orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, lua=[script], dicom_port=pacs_port)
        orthanc.start()
        files, study_uid = head_ct(tmp_path / "study", 13)
        assert storescu(orthanc.dicom_port, files, called="ORTHANC").returncode == 0

        found = wait_for_results(orthanc, study_uid)
        assert len(found["SC"]) == 3 and len(found["SR"]) == 1
        [notified] = audited(node, "study.complete_notified")
        assert notified.actor == "token:orthanc" and notified.study_uid == study_uid
        [ready] = audited(node, "series.ready")
        assert ready.detail["reason"] == "study-complete notification from token:orthanc"
    finally:
        if orthanc is not None:
            orthanc.stop()
        node.stop()
