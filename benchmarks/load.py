"""Under load: single-image studies of the four photo/radiograph tasks from concurrent ``storescu``
senders (one device each), and a head CT from one more sender at the same time, into a real node
that routes every task by ``config.example.toml``'s routes and sends its results to a real Orthanc.

Reports studies per minute (first instance received → last result sent, by the node's own clock),
p50/p95 seconds from a study's last instance to its last result sent per modality (the node's API
timings; the part spent waiting for completeness beside it), and the peak RSS (VmHWM) of the
receiving process(es) and of the job workers. The reference, measured in the same run: Orthanc's own
ingest of the same files by the same senders (ratio of the node's receive time to Orthanc's).
Memory flat, once after the runs: a fresh node given a 60-slice CT alone, and another the full CT —
the receiving side's peak RSS and its growth while receiving, and the worker's peak.

    .venv/bin/python -m benchmarks.load [--runs 3] [--studies 200] [--senders 4] [--ct-slices 600]
        [--workers W] [--receivers N] [--stable-seconds S] [--forwarders] [--cold]

Every run starts a fresh Orthanc and a fresh node; the inputs are written once. Medians of the runs.
Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom

from node.config import NodeSettings, StudySettings, load_settings
from tests.peers import REPO, NodeProcess, OrthancServer, storescu, wait_for
from training.chest_phantom import FINDINGS, chest_dicom
from training.chest_phantom import sample as chest_sample
from training.conjunctiva_phantom import write_conjunctiva
from training.ct_phantom import write_head_ct_series
from training.fundus_phantom import CLASSES as FUNDUS_CLASSES
from training.fundus_phantom import write_fundus_study
from training.skin_phantom import CLASSES as SKIN_CLASSES
from training.skin_phantom import write_dermoscopy

CHEST_WIDTH = 1024  # columns of a synthetic radiograph: 2.3 MB, a small detector's size
SMALL_CT_SLICES = 60  # the memory-flat comparison's smaller CT
CT_AE = "CTSCANNER"
# storescu proposes the files' own SOP classes only, as a device does: with its built-in list of
# storage classes (the default) Dermoscopic Photography got no presentation context at Orthanc 1.10.
PROPOSE_FILES = ("-R",)


def _chest(folder: Path, index: int) -> Path:
    finding = FINDINGS[index % len(FINDINGS)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"chest-{index}.dcm"
    image = chest_sample(np.random.default_rng(index), CHEST_WIDTH, finding)
    chest_dicom(image, f"load-chest-{index}").save_as(path, enforce_file_format=True)
    return path


def _fundus(folder: Path, index: int) -> Path:
    eye = "R" if index % 2 else "L"
    label = index % len(FUNDUS_CLASSES)
    return write_fundus_study(
        folder / f"fundus-{index}", {eye: label}, seed=index, key=f"load-fundus-{index}"
    )[0]


def _skin(folder: Path, index: int) -> Path:
    return write_dermoscopy(folder, SKIN_CLASSES[index % len(SKIN_CLASSES)], seed=index)


def _conjunctiva(folder: Path, index: int) -> Path:
    return write_conjunctiva(folder, seed=index)


# The single-image tasks, by the modality their devices send: study i is of task i % 4.
SINGLE_IMAGE: tuple[tuple[str, Callable[[Path, int], Path]], ...] = (
    ("DX", _chest),
    ("OP", _fundus),
    ("DMS", _skin),
    ("XC", _conjunctiva),
)


@dataclass
class Sender:
    ae_title: str
    files: list[Path]


@dataclass
class Inputs:
    senders: list[Sender]  # the single-image senders, then the CT's
    modality: dict[str, str]  # study UID → modality
    small_ct: list[Path]
    warmup: Sender  # a study of each task, sent and done before a run is timed

    @property
    def instances(self) -> int:
        return sum(len(sender.files) for sender in self.senders)


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def write_inputs(folder: Path, studies: int, senders: int, ct_slices: int) -> Inputs:
    """Study i goes to sender i % senders: with 4 senders, each is one device sending one task."""
    modality: dict[str, str] = {}
    batches: list[list[Path]] = [[] for _ in range(senders)]
    warmup = []
    for index in range(studies + len(SINGLE_IMAGE)):
        name, write = SINGLE_IMAGE[index % len(SINGLE_IMAGE)]
        path = write(folder / name, index)
        if index >= studies:
            warmup.append(path)
            continue
        batches[index % senders].append(path)
        modality[_study_uid(path)] = name
    ct = write_head_ct_series(folder / "ct", ct_slices, hemorrhage=True, seed=600)
    modality[_study_uid(ct[0])] = "CT"
    small = write_head_ct_series(folder / "ct-small", SMALL_CT_SLICES, hemorrhage=False, seed=60)
    return Inputs(
        [*(Sender(f"SENDER{n + 1}", files) for n, files in enumerate(batches)), Sender(CT_AE, ct)],
        modality,
        small,
        Sender("WARMUP", [*warmup, *small]),
    )


def send_all(port: int, called: str, senders: Sequence[Sender]) -> float:
    """Seconds until every sender's ``storescu`` (one association each, all at once) has finished."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(senders)) as pool:
        runs = list(pool.map(lambda s: storescu(port, s.files, called, s.ae_title, PROPOSE_FILES), senders))
    elapsed = time.perf_counter() - start
    for sender, run in zip(senders, runs, strict=True):
        if run.returncode != 0:
            raise RuntimeError(
                f"{sender.ae_title} → {called} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
            )
    return elapsed


# -- the node's processes, from /proc --------------------------------------------------------------


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(fields[9])
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith("socket:[") and link[8:-1] in inodes for link in links)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _memory_kb(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(value.split()[0]) for key, value in re.findall(r"^(VmHWM|VmRSS):\s+(.+)$", text, re.M)}


@dataclass
class ProcessSampler:
    """Peak RSS of a node's process tree by role while it works. The processes holding the DICOM
    listening socket receive: the node's own alone, or, with receiver processes, those children (the
    node's process then only binds it and is "main": indexer, routing, sending). Other children but
    multiprocessing's helpers are job workers. Peaks are each process's VmHWM, so a peak between two
    samples is not missed; a process is only missed if it lives less than one interval."""

    root: int
    port: int
    interval: float = 0.25
    peak_kb: dict[int, int] = field(default_factory=dict)  # VmHWM: each process's own peak
    listening: set[int] = field(default_factory=set)
    helpers: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ProcessSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        inodes = _listening_inodes(self.port)
        for pid in _descendants(self.root):
            memory = _memory_kb(pid)
            if not memory:
                continue
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), memory["VmHWM"])
            if pid not in self.listening and _holds_socket(pid, inodes):
                self.listening.add(pid)
            if pid != self.root and pid not in self.listening:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"resource_tracker" in cmdline or b"forkserver" in cmdline:
                    self.helpers.add(pid)

    def roles(self) -> dict[str, list[int]]:
        children = self.listening - {self.root}
        receivers = sorted(children) or [self.root]
        main = [] if receivers == [self.root] else [self.root]
        workers = sorted(set(self.peak_kb) - set(receivers) - set(main) - self.listening - self.helpers)
        return {"receiver": receivers, "main": main, "worker": workers}

    def peaks_mb(self, role: str) -> list[float]:
        return [self.peak_kb[pid] / 1024 for pid in self.roles()[role]]

    def receiving_mb(self) -> float:
        """The receiving side's peaks (the node's process and its receivers), summed."""
        return sum(self.peak_kb[pid] for pid in {self.root} | self.listening) / 1024


# -- the node --------------------------------------------------------------------------------------


def settings_for(
    orthanc: OrthancServer, args: argparse.Namespace, senders: Sequence[Sender]
) -> dict[str, Any]:
    """``config.example.toml``'s routes with Orthanc as their PACS; the node's defaults for the rest
    but what the command line sets; with ``--forwarders`` every sender is declared a forwarder (a PACS
    sending whole series), where the node has that setting."""
    example = tomllib.loads((REPO / "config.example.toml").read_text())
    node: dict[str, Any] = {"max_associations_per_address": max(5, len(senders) + 1)}  # all on loopback
    if args.workers:
        node["workers"] = args.workers
    if args.receivers and "receivers" in NodeSettings.model_fields:
        node["receivers"] = args.receivers
    study: dict[str, Any] = {}
    if args.stable_seconds is not None:
        study["stable_seconds"] = args.stable_seconds
    if args.forwarders and "forwarders" in StudySettings.model_fields:
        study["forwarders"] = [sender.ae_title for sender in senders]
    return {
        "node": node,
        "study": study,
        "destinations": [
            {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
        "routes": example["routes"],
    }


def metrics(node: NodeProcess) -> dict[str, float]:
    text = httpx.get(f"{node.url}/metrics", headers=node.headers, timeout=30).text
    found = re.findall(r'^ainode_(\w+?)(?:_total)?(?:\{status="(\w+)"\})? ([0-9.e+]+)$', text, re.M)
    return {f"{name}.{status}" if status else name: float(value) for name, status, value in found}


def wait_settled(node: NodeProcess, instances: int, studies: int, timeout: float) -> list[dict[str, Any]]:
    """Every study's rows once each has left receiving/processing/sending. Polls the cheap counters
    first, so that the node spends little on being watched."""

    def settled() -> list[dict[str, Any]] | None:
        m = metrics(node)
        busy = ("series.receiving", "series.ready", "jobs.queued", "jobs.running", "sends.pending")
        if m.get("instances_received", 0) < instances or any(m.get(key, 0) for key in busy):
            return None
        rows: list[dict[str, Any]] = node.api("/api/studies?limit=1000")
        if len(rows) < studies or any(
            row["status"] in ("receiving", "processing", "sending") for row in rows
        ):
            return None
        return rows

    rows: list[dict[str, Any]] = wait_for(settled, timeout, "every study's results sent", interval=1.0)
    return rows


def _when(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q))


@dataclass
class LoadRun:
    orthanc_s: float  # all senders done, to Orthanc: the reference
    node_s: float  # all senders done, to the node
    studies_per_minute: float
    latency: dict[str, list[float]]  # modality → each study's last instance → last result sent, s
    quiet: dict[str, list[float]]  # modality → each study's wait for completeness (part of latency)
    peaks_mb: dict[str, list[float]]  # role → each process's peak RSS
    not_done: int


def drive(node: NodeProcess, inputs: Inputs, args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    """The workload into a running node: a study of each task first, until settled (unless
    ``args.cold``), then every sender at once. The seconds until the senders are done, and every
    study's rows once the node has settled."""
    warm_instances = warm_studies = 0
    if not args.cold:  # each model's first job after a start is not what load is about
        send_all(node.dicom_port, "AINODE", [inputs.warmup])
        warm_instances, warm_studies = len(inputs.warmup.files), len(SINGLE_IMAGE) + 1
        wait_settled(node, warm_instances, warm_studies, args.timeout)
    node_s = send_all(node.dicom_port, "AINODE", inputs.senders)
    everything = wait_settled(
        node, warm_instances + inputs.instances, warm_studies + len(inputs.modality), args.timeout
    )
    return node_s, everything


def studies_per_minute(rows: Sequence[dict[str, Any]]) -> float:
    """Studies done per minute, the workload's first instance received → its last result sent (the
    node's clock); ``rows``: the workload's studies, done or not."""
    done = [row for row in rows if row["status"] == "done"]
    first = min(_when(row["first_received_at"]).timestamp() for row in rows)
    last = max(_when(row["first_received_at"]).timestamp() + row["timings"]["total"] for row in done)
    return len(done) / (last - first) * 60


def load_run(folder: Path, inputs: Inputs, args: argparse.Namespace) -> tuple[LoadRun, Path]:
    """The senders to a fresh Orthanc (the reference), then the same to a fresh node sending its
    results to that Orthanc; returns the run and the node's configuration file."""
    orthanc = OrthancServer(folder / "orthanc").start()
    try:
        orthanc_s = send_all(orthanc.dicom_port, orthanc.aet, inputs.senders)
        senders = [*inputs.senders, inputs.warmup]
        node = NodeProcess(folder / "node", settings_for(orthanc, args, senders)).start()
        assert node.process is not None
        sampler = ProcessSampler(node.process.pid, node.dicom_port).start()
        try:
            node_s, everything = drive(node, inputs, args)
        except Exception:
            print(f"the node's log, its end:\n{node.log.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            sampler.stop()
            node.stop()
    finally:
        orthanc.stop()
    rows = [row for row in everything if row["study_uid"] in inputs.modality]
    done = [row for row in rows if row["status"] == "done"]
    latency: dict[str, list[float]] = {}
    quiet: dict[str, list[float]] = {}
    for row in done:
        modality = inputs.modality[row["study_uid"]]
        latency.setdefault(modality, []).append(row["timings"]["last_instance_to_sent"])
        quiet.setdefault(modality, []).append(row["timings"]["wait_stable"] or 0.0)
    peaks = {role: sampler.peaks_mb(role) for role in ("receiver", "main", "worker")}
    run = LoadRun(orthanc_s, node_s, studies_per_minute(rows), latency, quiet, peaks, len(rows) - len(done))
    return run, node.config


@dataclass
class Alone:
    """Peak RSS in MB of a fresh node's receiving side (the node's process and any receiver
    processes, their peaks summed), its growth over its peak before the first instance, and the
    worker's peak, for one CT sent alone."""

    receiving: float
    growth: float
    worker: float


def ct_alone(folder: Path, files: Sequence[Path], args: argparse.Namespace) -> Alone:
    """The CT to a fresh node that routes it by the head-CT route alone (its results kept, not sent)."""
    example = tomllib.loads((REPO / "config.example.toml").read_text())
    route = next(r for r in example["routes"] if r["name"] == "head-ct") | {"destinations": []}
    settings: dict[str, Any] = {"node": {}, "study": {"stable_seconds": 1}, "routes": [route]}
    if args.workers:
        settings["node"]["workers"] = args.workers
    if args.receivers and "receivers" in NodeSettings.model_fields:
        settings["node"]["receivers"] = args.receivers
    node = NodeProcess(folder, settings).start()
    assert node.process is not None
    sampler = ProcessSampler(node.process.pid, node.dicom_port).start()
    try:
        before = sampler.receiving_mb()
        send_all(node.dicom_port, "AINODE", [Sender(CT_AE, list(files))])
        wait_for(
            lambda: sum(metrics(node).get(f"jobs.{s}", 0) for s in ("done", "failed")), 600, "the CT's job"
        )
    finally:
        sampler.stop()
        node.stop()
    return Alone(
        sampler.receiving_mb(), sampler.receiving_mb() - before, max(sampler.peaks_mb("worker"), default=0.0)
    )


def median_of_runs(values: Sequence[float], digits: int = 2) -> str:
    """The median, and every run's value after it."""
    return f"{statistics.median(values):.{digits}f} (runs {', '.join(f'{v:.{digits}f}' for v in values)})"


def report(
    inputs: Inputs, config: Path, runs: Sequence[LoadRun], small: Alone, large: Alone, cold: bool
) -> None:
    settings = load_settings(config)
    node_keys = {"workers", "torch_threads", "receivers", "max_associations", "max_associations_per_address"}
    shown = {
        "node": settings.node.model_dump(include=node_keys),
        "study": settings.study.model_dump(
            include={"stable_seconds", "single_image_modalities", "forwarders"}
        ),
        "jobs": settings.jobs.model_dump(exclude={"executor"}),
    }
    size_mb = sum(f.stat().st_size for s in inputs.senders for f in s.files) / 2**20
    singles, ct = inputs.senders[:-1], inputs.senders[-1]
    print(
        f"{sum(len(s.files) for s in singles)} single-image studies (DX, OP, DMS, XC in turn) from"
        f" {len(singles)} storescu senders and a {len(ct.files)}-slice head CT from one more, all at once:"
        f" {inputs.instances} instances, {size_mb:.0f} MB. {len(runs)} runs (a fresh Orthanc and node"
        f" each{'' if cold else ', warmed up by a study of each task first'}), medians"
    )
    print(f"  node settings: {json.dumps(shown, default=str)}")
    print(
        f"  routes: config.example.toml's ({', '.join(r.name for r in settings.routes)}); results to Orthanc"
    )
    orthanc_s = [r.orthanc_s for r in runs]
    node_s = [r.node_s for r in runs]
    print("  receive, until every sender is done, s")
    print(f"    Orthanc (reference) {median_of_runs(orthanc_s)}")
    print(f"    node                {median_of_runs(node_s)}")
    ratios = [n / o for n, o in zip(node_s, orthanc_s, strict=True)]
    print(f"    ratio node / Orthanc {median_of_runs(ratios)}")
    per_minute = [r.studies_per_minute for r in runs]
    print(f"  studies per minute, first instance → last result sent: {median_of_runs(per_minute, 1)}")
    print("  last instance → last result sent, s: each run's p50 and p95, medians of runs; 'quiet': of which")
    print("  waiting for completeness (p50)")
    for modality in [name for name, _ in SINGLE_IMAGE] + ["CT"]:
        measured = [r for r in runs if modality in r.latency]
        if measured:
            p50 = statistics.median(percentile(r.latency[modality], 50) for r in measured)
            p95 = statistics.median(percentile(r.latency[modality], 95) for r in measured)
            quiet = statistics.median(percentile(r.quiet[modality], 50) for r in measured)
            n = statistics.median(len(r.latency[modality]) for r in measured)
            print(
                f"    {modality:4s} studies {n:4.0f}   p50 {p50:7.2f}   p95 {p95:7.2f}   quiet {quiet:6.2f}"
            )
    if any(r.not_done for r in runs):
        print(f"  studies not done (failed or no route), per run: {[r.not_done for r in runs]}")
    for role, what in (
        ("receiver", "receiving"),
        ("main", "node process (indexer, routing, sending)"),
        ("worker", "workers"),
    ):
        largest = [max(r.peaks_mb[role]) for r in runs if r.peaks_mb[role]]
        if largest:
            count = statistics.median(len(r.peaks_mb[role]) for r in runs)
            print(f"  peak RSS, {what} ({count:.0f} processes), largest, MB: {median_of_runs(largest, 0)}")
    print("  memory flat: peak RSS, MB, of a fresh node given one CT alone (head-CT route only), once")
    for name, alone in ((f"{len(inputs.small_ct)} slices", small), (f"{len(ct.files)} slices", large)):
        print(
            f"    {name:11s} receiving side {alone.receiving:6.0f} (+{alone.growth:.0f} while receiving)"
            f"   worker {alone.worker:6.0f}"
        )
    print(
        f"    ratio {len(ct.files)} / {len(inputs.small_ct)} slices: receiving side"
        f" {large.receiving / small.receiving:.2f}, worker {large.worker / small.worker:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--ct-slices", type=int, default=600)
    parser.add_argument("--workers", type=int, default=0, help="[node] workers (default: the node's)")
    parser.add_argument("--receivers", type=int, default=0, help="[node] receivers, where the node has it")
    parser.add_argument("--stable-seconds", type=float, default=None, help="[study] stable_seconds")
    parser.add_argument("--forwarders", action="store_true", help="declare every sender a [study] forwarder")
    parser.add_argument("--cold", action="store_true", help="no warm-up study of each task before timing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take to settle")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder / "inputs", args.studies, args.senders, args.ct_slices)
        runs = []
        for index in range(args.runs):
            run, config = load_run(folder / f"run{index}", inputs, args)
            runs.append(run)
        small = ct_alone(folder / "small", inputs.small_ct, args)
        large = ct_alone(folder / "large", inputs.senders[-1].files, args)
        report(inputs, config, runs, small, large, args.cold)
    print(f"  (the benchmark took {(time.monotonic() - began) / 60:.1f} min)")


if __name__ == "__main__":
    main()
