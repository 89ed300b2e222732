"""The whole path with real peers: Orthanc → node → head-CT model → SC + SR back in Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from node import audit
from node.db import Database
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
from training.ct_phantom import write_head_ct_series

pytestmark = pytest.mark.slow

SC_CLASS = str(SecondaryCaptureImageStorage)
SR_CLASS = str(Comprehensive3DSRStorage)


def node_settings(node_port: int, pacs_port: int) -> dict[str, Any]:
    return {
        "node": {"dicom_port": node_port, "allowed_calling_aets": ["ORTHANC", "STORESCU"]},
        "study": {"stable_seconds": 1},
        "send": {"first_delay_seconds": 0.5, "backoff_factor": 1.5, "max_delay_seconds": 2},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}],
        "routes": [
            {
                "name": "head-ct",
                "match": {"Modality": "CT", "BodyPartExamined": ["HEAD", "BRAIN"]},
                "handler": "ct_hemorrhage",
                "model": "ct-hemorrhage",
                "destinations": ["pacs"],
                "options": {"explain_slices": 3},
            }
        ],
    }


def results_in(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Orthanc ids of the node's result instances in a study, by kind (by SOP Class UID)."""
    found: dict[str, list[str]] = {"SC": [], "SR": []}
    for series in orthanc.series_in_study(study_uid):
        for instance_id in series["Instances"]:
            kind = {SC_CLASS: "SC", SR_CLASS: "SR"}.get(orthanc.sop_class(instance_id))
            if kind:
                found[kind].append(instance_id)
    return found


def wait_for_results(orthanc: OrthancServer, study_uid: str, timeout: float = 180) -> dict[str, list[Any]]:
    def ready() -> dict[str, list[Any]] | None:
        found = results_in(orthanc, study_uid)
        return found if found["SC"] and found["SR"] else None

    return wait_for(ready, timeout, "SC and SR in Orthanc", interval=0.5)  # type: ignore[no-any-return]


def check_results(orthanc: OrthancServer, found: dict[str, list[Any]], folder: Path, present: bool) -> str:
    """Every object valid by dciodvfy; the SR readable by dsrdump and saying what the model found."""
    folder.mkdir(parents=True, exist_ok=True)
    report = ""
    for kind, instances in found.items():
        for instance_id in instances:
            path = folder / f"{kind}-{instance_id}.dcm"
            path.write_bytes(orthanc.file(instance_id))
            assert dciodvfy_errors(path) == [], f"{kind}: {dciodvfy_errors(path)}"
            ds = pydicom.dcmread(path)
            if kind == "SC":
                assert ds.BurnedInAnnotation == "YES"
                assert ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
            else:
                report = dsrdump(path)
    assert "Imaging Measurement Report" in report
    assert "Intracranial hemorrhage" in report
    assert ("Present" if present else "Absent") in report
    assert "NOT FOR DIAGNOSTIC USE" in report
    return report


@pytest.fixture
def pacs_and_node(tmp_path: Path) -> Iterator[tuple[OrthancServer, NodeProcess]]:
    node_port = free_port()
    lua = [REPO / "deploy" / "orthanc" / "autoroute.lua"]
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, lua=lua).start()
    node = NodeProcess(tmp_path / "node", node_settings(node_port, orthanc.dicom_port)).start()
    yield orthanc, node
    node.stop()
    orthanc.stop()


def test_orthanc_autoroutes_a_head_ct_and_gets_results_back(
    pacs_and_node: tuple[OrthancServer, NodeProcess], tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    files = write_head_ct_series(tmp_path / "study", 30, hemorrhage=True, seed=2024)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    run = storescu(orthanc.dicom_port, files, called="ORTHANC")
    assert run.returncode == 0, run.stderr

    found = wait_for_results(orthanc, study_uid)
    assert len(found["SC"]) == 3 and len(found["SR"]) == 1
    check_results(orthanc, found, tmp_path / "results", present=True)

    detail = wait_for(lambda: (s := node.study(study_uid)) and s["status"] == "done" and s, 30, "status done")
    job = detail["series"][0]["jobs"][0]
    assert job["outcome"]["findings"][0]["present"] is True
    assert job["model"] == "ct-hemorrhage" and job["model_sha256"]
    assert all(send["status"] == "sent" for r in job["results"] for send in r["sends"])
    assert detail["timings"]["last_instance_to_sent"] > 0
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    assert audit.verify(db, audit.read_key(node.folder / "var" / "audit.key")) is None
    db.dispose()
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    log = node.log.read_text()
    assert "job 1 done" in log  # the log is written, and says what happened ...
    assert str(source.PatientID) not in log and "PHANTOM^HEAD" not in log  # ... without who it was about


def test_rest_push_of_a_normal_head_ct(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port).start()
    node = NodeProcess(tmp_path / "node", node_settings(node_port, orthanc.dicom_port)).start()
    try:
        files = write_head_ct_series(tmp_path / "study", 30, hemorrhage=False, seed=77)
        assert storescu(orthanc.dicom_port, files, called="ORTHANC").returncode == 0
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        orthanc_study = orthanc.client.post_tools_lookup(data=study_uid)[0]["ID"]
        orthanc.client.post_modalities_id_store("ainode", json={"Resources": [orthanc_study]})
        found = wait_for_results(orthanc, study_uid)
        check_results(orthanc, found, tmp_path / "results", present=False)
    finally:
        node.stop()
        orthanc.stop()
