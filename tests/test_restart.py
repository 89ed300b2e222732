"""Nothing acknowledged is lost: a node killed with SIGKILL mid-transfer and mid-job, and a PACS
that is down when results are ready."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node import audit
from node.db import Database, Instance
from tests.peers import NodeProcess, OrthancServer, dcmtk_env, free_port, wait_for
from tests.test_end_to_end import check_results, node_settings, wait_for_results
from training.ct_phantom import write_head_ct_series

pytestmark = pytest.mark.slow


def acknowledged(storescu_output: str, files: list[Path]) -> set[str]:
    """SOP Instance UIDs of the files storescu saw answered with Success before the node died."""
    uids = set()
    for match in re.finditer(
        r"Sending file: (\S+).*?Received Store Response \(Success\)", storescu_output, re.S
    ):
        uids.add(pydicom.dcmread(match.group(1), stop_before_pixels=True).SOPInstanceUID)
    assert uids <= {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    return uids


def stored_uids(node: NodeProcess) -> set[str]:
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    with db.session() as session:
        uids = set(session.scalars(select(Instance.sop_uid)))
    db.dispose()
    return uids


def test_kill_mid_transfer_mid_job_and_pacs_down(tmp_path: Path) -> None:
    pacs_port = free_port()  # nobody listens here until the PACS comes up below
    node_port = free_port()
    settings = node_settings(node_port, pacs_port)
    settings["study"]["stable_seconds"] = 2
    node = NodeProcess(tmp_path / "node", settings).start()
    files = write_head_ct_series(tmp_path / "study", 30, hemorrhage=True, seed=31)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

    # 1. Kill the node while storescu is still sending.
    sender = subprocess.Popen(
        [
            "storescu",
            "-v",
            "--max-send-pdu",  # small PDUs stretch the transfer, so the kill lands inside it
            "4096",
            "-aec",
            "AINODE",
            "-aet",
            "STORESCU",
            "127.0.0.1",
            str(node_port),
            *map(str, files),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dcmtk_env(),
    )
    incoming = node.folder / "var" / "incoming"
    wait_for(lambda: len(list(incoming.rglob("*.dcm"))) >= 3, 60, "some slices", interval=0.01)
    node.kill()
    output, _ = sender.communicate(timeout=60)
    acked = acknowledged(output, files)
    assert 0 < len(acked) < len(files), "the kill should land mid-transfer"

    # 2. Restart: every acknowledged instance is there; the sender sends the rest (as a PACS retries).
    node.start()
    assert acked <= stored_uids(node)
    rest = subprocess.run(
        ["storescu", "-aec", "AINODE", "-aet", "STORESCU", "127.0.0.1", str(node_port), *map(str, files)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
    )
    assert rest.returncode == 0, rest.stderr

    # 3. Kill the node while the job runs; after the restart the job is picked up again.
    def job_status() -> str:
        study = node.study(study_uid) or {"series": []}
        return next((j["status"] for s in study["series"] for j in s["jobs"]), "")

    wait_for(lambda: job_status() == "running", 60, "the job to start", interval=0.05)
    node.kill()
    node.start()

    # 4. The PACS is down: sends fail and are retried. Bring it up: they succeed.
    def sends() -> list[dict[str, object]]:
        study = node.study(study_uid) or {"series": []}
        return [d for s in study["series"] for j in s["jobs"] for r in j["results"] for d in r["sends"]]

    wait_for(lambda: any(int(d["attempts"]) >= 2 for d in sends()), 120, "sends to be retried")
    assert all(d["status"] == "pending" for d in sends())
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, dicom_port=pacs_port).start()
    try:
        found = wait_for_results(orthanc, study_uid, timeout=120)
        check_results(orthanc, found, tmp_path / "results", present=True)
        wait_for(lambda: sends() and all(d["status"] == "sent" for d in sends()), 60, "every send done")
        job = (node.study(study_uid) or {})["series"][0]["jobs"][-1]
        assert job["status"] == "done" and job["attempts"] >= 2
    finally:
        node.stop()
        orthanc.stop()
    db = Database(f"sqlite:///{node.folder / 'var' / 'ainode.db'}")
    assert audit.verify(db, audit.read_key(node.folder / "var" / "audit.key")) is None
    db.dispose()
