"""Receive throughput: a 300-slice 512×512 CT sent by dcmtk storescu to the node, against dcmtk's own
storescp on the same machine in the same run as the reference. Reports medians of several runs.

    .venv/bin/python -m benchmarks.receive [--runs 5] [--slices 300]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.peers import NodeProcess, dcmtk_env, free_port, storescu, wait_for
from training.ct_phantom import write_head_ct_series


def send_timed(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    run = storescu(port, files, called=called)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(run.stdout + run.stderr)
    return elapsed


def storescp_run(folder: Path, files: list[Path]) -> float:
    port = free_port()
    out = folder / f"storescp-{port}"
    out.mkdir()
    server = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)], env=dcmtk_env())
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)], capture_output=True
                ).returncode
                == 0
            ),
            10,
            "storescp",
        )
        return send_timed(port, files, "STORESCP")
    finally:
        server.terminate()
        server.wait()


def node_run(folder: Path, files: list[Path]) -> float:
    node = NodeProcess(folder / f"node-{time.monotonic_ns()}", {"study": {"stable_seconds": 600}}).start()
    try:
        return send_timed(node.dicom_port, files, "AINODE")
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_head_ct_series(folder / "ct", args.slices, hemorrhage=False, seed=300)
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        node_times, reference_times = [], []
        for _ in range(args.runs):  # interleaved, so drift in the machine's load hits both alike
            reference_times.append(storescp_run(folder, files))
            node_times.append(node_run(folder, files))
    node_s, ref_s = statistics.median(node_times), statistics.median(reference_times)
    print(f"{args.slices} slices, {size_mb:.0f} MB, {args.runs} runs each (medians)")
    print(f"  dcmtk storescp (reference): {ref_s:6.2f} s  {args.slices / ref_s:7.1f} instances/s")
    print(f"  ainode                    : {node_s:6.2f} s  {args.slices / node_s:7.1f} instances/s")
    print(f"  ratio node / reference    : {node_s / ref_s:6.2f}")
    print(f"  all runs, node:     {[round(t, 2) for t in node_times]}")
    print(f"  all runs, storescp: {[round(t, 2) for t in reference_times]}")


if __name__ == "__main__":
    main()
