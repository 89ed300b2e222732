"""Latency: seconds from Orthanc's forward of a 30-slice head CT finishing (its synchronous
``/modalities/ainode/store`` call returning) to the node's SC + SR stored in Orthanc, median of several
studies, with the node's per-stage breakdown. Two configurations in the same run: the node told that
ORTHANC is a forwarder (``study.forwarders``: the released association completes the series), and the
reference, today's quiet period alone (``study.stable_seconds``, the fallback in both).

    .venv/bin/python -m benchmarks.latency [--runs 5] [--stable-seconds 10] [--slices 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

from tests.peers import NodeProcess, OrthancServer, free_port, storescu, wait_for
from tests.test_end_to_end import node_settings, results_in
from training.ct_phantom import write_head_ct_series

STAGES = ("wait_stable", "queue", "process", "send")


def measure(folder: Path, forwarders: list[str], args: argparse.Namespace) -> list[dict[str, float]]:
    """Forward ``args.runs`` studies (after one that warms the worker, not counted) from a fresh Orthanc
    to a fresh node; each one's seconds from the forward's end to its results in Orthanc, and stages."""
    node_port = free_port()
    orthanc = OrthancServer(folder / "orthanc", node_port=node_port).start()
    settings = node_settings(node_port, orthanc.dicom_port)
    settings["study"] = {"stable_seconds": args.stable_seconds, "forwarders": forwarders}
    node = NodeProcess(folder / "node", settings).start()
    rows = []
    try:
        for run in range(args.runs + 1):
            files = write_head_ct_series(
                folder / f"ct{run}", args.slices, hemorrhage=run % 2 == 0, seed=5000 + run
            )
            study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
            assert storescu(orthanc.dicom_port, files, called="ORTHANC").returncode == 0
            orthanc_id = orthanc.client.post_tools_lookup(data=study_uid)[0]["ID"]
            began = time.monotonic()
            orthanc.client.post_modalities_id_store("ainode", json={"Resources": [orthanc_id]})
            forwarded = time.monotonic()
            wait_for(
                lambda uid=study_uid: (found := results_in(orthanc, uid))["SC"] and found["SR"],
                180,
                "SC and SR in Orthanc",
                interval=0.05,
            )
            stored = time.monotonic()
            detail: Any = wait_for(
                lambda uid=study_uid: (s := node.study(uid)) and s["status"] == "done" and s, 60, "done"
            )
            if run:
                rows.append(
                    {
                        "forward": forwarded - began,
                        "forwarded_to_stored": stored - forwarded,
                        **detail["timings"],
                    }
                )
    finally:
        node.stop()
        orthanc.stop()
    return rows


def report(name: str, rows: list[dict[str, float]]) -> float:
    """Print one configuration's medians; returns its median from forward's end to results stored."""
    median = statistics.median(row["forwarded_to_stored"] for row in rows)
    print(f"  {name}")
    print(f"    {'forward (Orthanc store call)':32s} {statistics.median(r['forward'] for r in rows):7.2f}")
    print(
        f"    {'forward end to SC + SR stored':32s} {median:7.2f}   runs "
        f"{[round(r['forwarded_to_stored'], 2) for r in rows]}"
    )
    for stage in STAGES:
        print(f"    {'  node: ' + stage:32s} {statistics.median(row[stage] for row in rows):7.2f}")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stable-seconds", type=float, default=10)
    parser.add_argument("--slices", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        forwarder = measure(Path(tmp) / "forwarder", ["ORTHANC"], args)
        reference = measure(Path(tmp) / "quiet", [], args)
    print(
        f"{args.slices}-slice 512x512 head CT forwarded by Orthanc, {args.runs} studies each, "
        f"stable_seconds={args.stable_seconds} (medians, s)"
    )
    fast = report('forwarders = ["ORTHANC"]', forwarder)
    slow = report("reference: quiet period only (forwarders = [])", reference)
    print(f"  forward end to results: {fast:.2f} s vs {slow:.2f} s, ratio {fast / slow:.2f}")


if __name__ == "__main__":
    main()
