"""Receive throughput: 300-slice 512×512 CTs sent by dcmtk storescu to the node, against two references
measured on the same machine in the same run: dcmtk's own storescp (no fsync), and the durable-write
floor — the same files written in Python as the node must (write, fsync, rename, folder fsync), with
nothing else — and, for one sender, their sum: the serial bound, since the sender waits for each answer
and the node must fsync before it answers. Reports medians of several runs. Each node started is left
until it is idle (its workers load their models at start) before it is sent to.

    .venv/bin/python -m benchmarks.receive [--runs 5] [--slices 300] [--senders 1] [--receivers 1]

With ``--senders N``, N storescu send at once, each a series (and study) of its own of ``--slices``;
the storescp reference is then ``storescp --fork`` (a process per association) and the floor N
writers at once. ``--receivers N`` runs the node with ``[node] receivers = N``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.peers import NodeProcess, dcmtk_env, free_port, storescu, wait_for
from training.ct_phantom import write_head_ct_series


def send_timed(port: int, series: list[list[Path]], called: str) -> float:
    """Every series sent at once, one storescu (one association) each; seconds until the last ends."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(series)) as pool:
        runs = list(pool.map(lambda files: storescu(port, files, called=called), series))
    elapsed = time.perf_counter() - start
    for run in runs:
        if run.returncode != 0:
            raise RuntimeError(run.stdout + run.stderr)
    return elapsed


def storescp_run(folder: Path, series: list[list[Path]]) -> float:
    port = free_port()
    out = folder / f"storescp-{port}"
    out.mkdir()
    fork = ["--fork"] if len(series) > 1 else []
    server = subprocess.Popen(
        ["storescp", *fork, "-aet", "STORESCP", "-od", str(out), str(port)], env=dcmtk_env()
    )
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
        return send_timed(port, series, "STORESCP")
    finally:
        server.terminate()
        server.wait()


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_run(folder: Path, series: list[list[Path]]) -> float:
    """The same files written durably, a writer per series at once: what no receiver can beat while
    it fsyncs each instance before answering."""
    out = folder / f"floor-{time.monotonic_ns()}"
    contents = [[file.read_bytes() for file in files] for files in series]

    def write(number: int) -> None:
        target = out / str(number)
        target.mkdir(parents=True)
        _fsync_path(out, os.O_RDONLY | os.O_DIRECTORY)
        for index, data in enumerate(contents[number]):
            temp = target / f".{index}.part"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target / f"{index}.dcm")
            _fsync_path(target, os.O_RDONLY | os.O_DIRECTORY)

    out.mkdir()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(series)) as pool:
        list(pool.map(write, range(len(series))))
    return time.perf_counter() - start


def _cpu_seconds(root: int) -> float:
    """CPU seconds used so far by process ``root`` and its descendants still running (Linux /proc)."""
    processes: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])  # utime + stime
                processes[int(entry.name)] = (int(fields[1]), ticks / os.sysconf("SC_CLK_TCK"))
    family, grew = {root}, True
    while grew:
        grew = False
        for pid, (parent, _) in processes.items():
            if parent in family and pid not in family:
                family.add(pid)
                grew = True
    return sum(processes[pid][1] for pid in family if pid in processes)


def wait_idle(pid: int, timeout: float = 60) -> None:
    """Until the node's processes are idle: its workers load their models when it starts, which would
    otherwise compete with the receive for the cores and be counted against it."""
    deadline, last = time.monotonic() + timeout, _cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _cpu_seconds(pid)
        if now - last < 0.05:
            return
        last = now


def node_run(folder: Path, series: list[list[Path]], receivers: int) -> float:
    settings = {"study": {"stable_seconds": 600}, "node": {"receivers": receivers} if receivers > 1 else {}}
    node = NodeProcess(folder / f"node-{time.monotonic_ns()}", settings).start()
    try:
        assert node.process is not None
        wait_idle(node.process.pid)
        return send_timed(node.dicom_port, series, "AINODE")
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--senders", type=int, default=1, help="concurrent storescu, a series each")
    parser.add_argument("--receivers", type=int, default=1, help="the node's [node] receivers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        series = [
            write_head_ct_series(folder / f"ct-{n}", args.slices, hemorrhage=False, seed=300 + n)
            for n in range(args.senders)
        ]
        size_mb = sum(f.stat().st_size for files in series for f in files) / 2**20
        node_times, reference_times, floor_times = [], [], []
        for _ in range(args.runs):  # interleaved, so drift in the machine's load hits all alike
            reference_times.append(storescp_run(folder, series))
            floor_times.append(floor_run(folder, series))
            node_times.append(node_run(folder, series, args.receivers))
    node_s, ref_s = statistics.median(node_times), statistics.median(reference_times)
    floor_s = statistics.median(floor_times)
    count = args.slices * args.senders
    senders = f", {args.senders} senders at once" if args.senders > 1 else ""
    receivers = f", {args.receivers} receiver processes" if args.receivers > 1 else ""
    storescp = "dcmtk storescp --fork" if args.senders > 1 else "dcmtk storescp"
    print(f"{count} slices, {size_mb:.0f} MB{senders}{receivers}, {args.runs} runs each (medians)")
    print(f"  {storescp + ' (reference)':26s}: {ref_s:6.2f} s  {count / ref_s:7.1f} instances/s")
    print(f"  {'durable-write floor':26s}: {floor_s:6.2f} s  {count / floor_s:7.1f} instances/s")
    print(f"  {'ainode':26s}: {node_s:6.2f} s  {count / node_s:7.1f} instances/s")
    print(f"  ratio node / reference    : {node_s / ref_s:6.2f}  (speed {ref_s / node_s:.2f}x storescp's)")
    print(f"  ratio node / floor        : {node_s / floor_s:6.2f}")
    if args.senders == 1:
        # A receiver that fsyncs each instance before answering it cannot overlap the write with the
        # sender, which waits for the answer before it sends the next: for one association, the
        # sender's and the network's time (storescp's run, its own processing included) and the durable
        # writes add up. Per run, then the median. storescp's own receive and page-cache write are in both
        # terms, so the true bound is a little lower than this.
        bounds = [r + f for r, f in zip(reference_times, floor_times, strict=True)]
        bound_s = statistics.median(bounds)
        print(
            f"  {'serial bound':26s}: {bound_s:6.2f} s  (storescp + floor: no receiver that fsyncs before"
            f" Success is faster; speed {ref_s / bound_s:.2f}x storescp's)"
        )
        print(f"  ratio node / serial bound : {node_s / bound_s:6.2f}")
    print(f"  all runs, node:     {[round(t, 2) for t in node_times]}")
    print(f"  all runs, storescp: {[round(t, 2) for t in reference_times]}")
    print(f"  all runs, floor:    {[round(t, 2) for t in floor_times]}")


if __name__ == "__main__":
    main()
