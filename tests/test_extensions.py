"""The extension points are real: an output writer and an executor, each defined in a module of its own
outside the node and named only in the configuration, carry a study from the network to the PACS."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import tomli_w
from pydicom.uid import KeyObjectSelectionDocumentStorage

from node.config import load_settings
from node.service import Node
from tests import extension_executor
from tests.peers import REPO, OrthancServer, dciodvfy_errors, free_port, storescu, wait_for
from tests.test_end_to_end import SC_CLASS, SR_CLASS
from training.ct_phantom import write_head_ct_series

pytestmark = pytest.mark.slow
KO_CLASS = str(KeyObjectSelectionDocumentStorage)


def test_a_plugged_in_writer_and_executor_carry_a_study_to_the_pacs(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port).start()
    config = tmp_path / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "node": {
                    "dicom_host": "127.0.0.1",
                    "dicom_port": node_port,
                    "data_dir": str(tmp_path / "var"),
                    "models_dir": str(REPO / "models"),
                    "min_free_disk_mb": 1,
                    "plugins": ["tests.extension_output", "tests.extension_executor"],
                },
                "study": {"stable_seconds": 0.5},
                "jobs": {"executor": "inline"},
                "destinations": [
                    {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ],
                "routes": [
                    {
                        "name": "head-ct",
                        "match": {"Modality": "CT"},
                        "handler": "ct_hemorrhage",
                        "model": "ct-hemorrhage",
                        "outputs": ["sc", "sr", {"writer": "key-images", "series_number": 77}],
                        "destinations": ["pacs"],
                    }
                ],
            }
        )
    )
    node = Node(load_settings(config))
    node.start()
    found: dict[str, list[str]] | None = None
    try:
        files = write_head_ct_series(tmp_path / "ct", 8, hemorrhage=True, seed=11, size=128)
        assert storescu(node_port, files).returncode == 0
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

        def arrived() -> dict[str, list[str]] | None:
            found: dict[str, list[str]] = {SC_CLASS: [], SR_CLASS: [], KO_CLASS: []}
            for series in orthanc.series_in_study(study_uid):
                for instance_id in series["Instances"]:
                    found.setdefault(orthanc.sop_class(instance_id), []).append(instance_id)
            return found if all(found[kind] for kind in (SC_CLASS, SR_CLASS, KO_CLASS)) else None

        found = wait_for(arrived, 120, "SC, SR and the plug-in's KO in Orthanc", interval=0.5)
    finally:
        node.stop()
        orthanc_files = {kind: [orthanc.file(i) for i in ids] for kind, ids in (found or {}).items()}
        orthanc.stop()

    assert extension_executor.ran_on and set(extension_executor.ran_on) == {"inline-executor"}
    (key_images,) = orthanc_files[KO_CLASS]
    path = tmp_path / "ko.dcm"
    path.write_bytes(key_images)
    assert dciodvfy_errors(path) == []
    ko = pydicom.dcmread(path)
    assert ko.StudyInstanceUID == study_uid and ko.SeriesNumber == 77
    images = [item for item in ko.ContentSequence if item.ValueType == "IMAGE"]
    flagged = {ref.ReferencedSOPInstanceUID for item in images for ref in item.ReferencedSOPSequence}
    overlays = [pydicom.dcmread(BytesIO(data)) for data in orthanc_files[SC_CLASS]]
    assert flagged == {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in overlays}
