"""Latency: seconds from the last slice of a 30-slice head CT arriving at the node to its SC + SR
stored in Orthanc (Orthanc pushes the study by REST), median of several studies, with the node's
per-stage breakdown. The quiet period (`stable_seconds`) is part of it; it is reported separately.

    .venv/bin/python -m benchmarks.latency [--runs 5] [--stable-seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pydicom

from tests.peers import NodeProcess, OrthancServer, free_port, storescu, wait_for
from tests.test_end_to_end import node_settings, wait_for_results
from training.ct_phantom import write_head_ct_series

STAGES = ("wait_stable", "queue", "process", "send", "last_instance_to_sent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stable-seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        node_port = free_port()
        orthanc = OrthancServer(folder / "orthanc", node_port=node_port).start()
        settings = node_settings(node_port, orthanc.dicom_port)
        settings["study"]["stable_seconds"] = args.stable_seconds
        node = NodeProcess(folder / "node", settings).start()
        rows = []
        try:
            for run in range(args.runs + 1):  # the first run warms the worker process; not counted
                files = write_head_ct_series(
                    folder / f"ct{run}", 30, hemorrhage=run % 2 == 0, seed=5000 + run
                )
                study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
                assert storescu(orthanc.dicom_port, files, called="ORTHANC").returncode == 0
                orthanc_id = orthanc.client.post_tools_lookup(data=study_uid)[0]["ID"]
                orthanc.client.post_modalities_id_store("ainode", json={"Resources": [orthanc_id]})
                wait_for_results(orthanc, study_uid)
                detail = wait_for(
                    lambda uid=study_uid: (s := node.study(uid)) and s["status"] == "done" and s, 60, "done"
                )
                if run:
                    rows.append(detail["timings"])
        finally:
            node.stop()
            orthanc.stop()
    print(f"30-slice 512x512 head CT, {args.runs} studies, stable_seconds={args.stable_seconds} (medians, s)")
    for stage in STAGES:
        values = [row[stage] for row in rows]
        print(f"  {stage:22s} {statistics.median(values):7.2f}   runs {values}")
    rest = [row["last_instance_to_sent"] - row["wait_stable"] for row in rows]
    print(f"  {'without the quiet wait':22s} {statistics.median(rest):7.2f}")


if __name__ == "__main__":
    main()
