"""Issue 11, Proof: a bounded fuzzing run of the PDU layer and of the C-STORE data set parser, on loopback
against the node as users run it, and of ``Ingest.accept`` in process (tests/fuzz.py makes the cases).

What must hold whatever comes in: every connection is answered (an A-ASSOCIATE-AC/RJ, an A-ABORT, a
response, or the node closing it) within a deadline; every C-STORE gets a status; every Success is a file
in the spool, indexed or set aside; the node stays up, its threads come back down, and afterwards it
still echoes, stores, reports healthy and keeps an intact audit chain.

``FUZZ_SECONDS`` sets each layer's budget (default 20 s: the three together take about a minute and a
half with the nodes' start-up); ``FUZZ_SEED`` moves the first seed, for a run that tries new cases (not
AINODE_*: the node reads those as its settings). A failure names its seeds: ``tests.fuzz.pdu_case(seed)``
or ``dataset_case(seed)`` replays one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import pydicom
import pytest
from sqlalchemy import select

from node import audit
from node.config import Settings, StudySettings
from node.db import AuditEvent, Database, Instance
from node.ingest.accept import CANNOT_UNDERSTAND, Ingest, Origin, Refused
from node.ingest.index import Indexer
from node.spool import Spool
from tests.fuzz import DatasetCase, Outcome, base_dataset, dataset_case, pdu_case, play, store_raw
from tests.peers import REPO, NodeProcess, echoscu, storescu, wait_for

# pydicom warns of every malformed value it reads: here that is the input, not news.
pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("ignore::UserWarning")]

BUDGET = float(os.environ.get("FUZZ_SECONDS", "20"))
FIRST_SEED = int(os.environ.get("FUZZ_SEED", "0"))
WORKERS = 4  # connections at once
# The node's limits for the run: every deadline short, so a quiet connection ends soon; room for many
# connections from loopback's one address (the node retires a connection a client dropped a moment
# later, and the cases drop them fast), so the cases reach past the connection limits.
LISTENER = {
    "network_timeout": 5.0,
    "association_setup_seconds": 5.0,
    "pdu_seconds": 5.0,
    "max_associations": 16 * WORKERS,
    "max_associations_per_address": 16 * WORKERS,
}
DEADLINE = 20.0  # a connection neither answered nor closed by then has hung
SUCCESS = 0x0000
SPARE_THREADS = 3  # the scheduler's pool may grow a little while idle; each association left over is 2
T = TypeVar("T")
# Cases earlier runs found a fault with, replayed first by every run. PatientName with a VR of FD or XX:
# the name could not be read, so the instance was refused as the node's own failure (0xA700) and the name
# went into the log inside pydicom's error. An empty Affected SOP Instance UID: the association dropped
# with no status (pynetdicom's chunked receive failed writing the meta information). An announced UID of
# 81 characters: aborted like the empty one, which the judge had not expected.
FOUND_OVER_THE_NETWORK = [157, 371, 559, 51642]
FOUND_IN_PROCESS = [51642, 1052487, 1053897]


def proc_status(pid: int) -> dict[str, int]:
    """The node's resident memory (kB) and thread count, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"])}


def run_for(seconds: float, workers: int, case: Callable[[int], T], found: Sequence[int] = ()) -> list[T]:
    """``case(seed)`` for the ``found`` seeds, then consecutive ones, on ``workers`` threads until
    ``seconds`` have passed."""
    stop = time.monotonic() + seconds
    counter = itertools.chain(found, itertools.count(FIRST_SEED))
    results: list[T] = []
    errors: list[Exception] = []

    def loop() -> None:
        try:
            while time.monotonic() < stop:
                results.append(case(next(counter)))
        except Exception as exc:  # a fault of the harness itself: fail the test, not just this thread
            errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def fuzz_node(tmp_path: Path) -> tuple[NodeProcess, dict[str, int]]:
    """A node for the run, and its memory and threads once warm: its scheduler's and listener's threads
    start as they are first needed, so the count is taken after an echo and a few seconds' rest."""
    node = NodeProcess(tmp_path / "node", {"node": dict(LISTENER)}).start()
    assert node.process is not None
    assert echoscu(node.dicom_port).returncode == 0
    time.sleep(4)
    return node, proc_status(node.process.pid)


def assert_node_whole(node: NodeProcess, start: dict[str, int], tmp_path: Path) -> None:
    """After a run: alive, threads back near where they started, and every service as before."""
    assert node.process is not None and node.process.poll() is None, node.log.read_text()[-3000:]
    pid = node.process.pid
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: proc_status(pid)["threads"] <= start["threads"] + SPARE_THREADS, DEADLINE, "threads")
    after = proc_status(pid)
    print(f"node before the run {start}, after it {after}")
    assert after["threads"] <= start["threads"] + SPARE_THREADS, f"threads left over: {start} -> {after}"
    echo = echoscu(node.dicom_port)
    assert echo.returncode == 0, echo.stderr
    ds = base_dataset(random.Random("after the run"), "ct")  # no case draws these UIDs
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp_path / "after.dcm"
    ds.save_as(path, enforce_file_format=True)
    stored = storescu(node.dicom_port, [path])
    assert stored.returncode == 0, stored.stderr
    wait_for(lambda: node.study(str(ds.StudyInstanceUID)), 30, "the stored instance indexed")
    health = httpx.get(f"{node.url}/healthz", timeout=10)
    assert health.status_code == 200, health.text
    verify = subprocess.run(
        [sys.executable, "-m", "node.cli", "audit", "verify", "--config", str(node.config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stdout + verify.stderr


def summary(outcomes: list[Outcome]) -> str:
    ends = Counter(outcome.ended for outcome in outcomes)
    firsts = Counter(outcome.answers[0] if outcome.answers else "-" for outcome in outcomes)
    longest = max((outcome.seconds for outcome in outcomes), default=0.0)
    return f"{len(outcomes)} connections (longest {longest:.1f} s): ended {dict(ends)}; first {dict(firsts)}"


@pytest.mark.slow
def test_pdu_layer(tmp_path: Path) -> None:
    node, start = fuzz_node(tmp_path)
    try:
        outcomes = run_for(BUDGET, WORKERS, lambda seed: play(pdu_case(seed), node.dicom_port, DEADLINE))
        print(f"\nPDU layer: {summary(outcomes)}")
        print("kinds:", dict(Counter(o.kind for o in outcomes)))
        unanswered = [(o.seed, o.kind, o.answers, o.ended) for o in outcomes if o.unanswered]
        assert not unanswered, (
            f"{len(unanswered)} connections not answered in {DEADLINE:.0f} s: {unanswered[:20]}"
        )
        assert_node_whole(node, start, tmp_path)
        assert_no_phi(node.log.read_text())
        receiving = Path(node.settings["node"]["data_dir"]) / "receiving"
        with contextlib.suppress(TimeoutError):  # each is deleted as its connection ends
            wait_for(lambda: not partial_files(receiving), 10, "partial data sets deleted")
        left = partial_files(receiving)
        print(f"left in {receiving.name}/: {len(left)} files, {sum(p.stat().st_size for p in left)} bytes")
        assert not left, f"data sets of C-STOREs that never ended still on disk: {len(left)}"
        assert len(outcomes) >= 20, "too few cases ran to prove anything"
        valid = [o for o in outcomes if o.kind == "valid"]
        assert all(o.answers[0] == "A-ASSOCIATE-AC" and o.statuses == [SUCCESS] for o in valid), valid
    finally:
        node.stop()


PHI = re.compile(r"FUZZ\^CASE|FZ\d+")  # every case's PatientName and PatientID (tests.fuzz.base_dataset)


def assert_no_phi(log: str) -> None:
    """Plain log lines name no patient, even when what they report is a value that could not be read."""
    found = sorted({match.group() for match in PHI.finditer(log)})
    assert not found, f"patient names or IDs in the log: {found[:5]}"


def partial_files(receiving: Path) -> list[Path]:
    """What the listener is still writing, or left behind, of C-STOREs received to disk."""
    return sorted(receiving.iterdir()) if receiving.is_dir() else []


def judge(results: list[tuple[DatasetCase, int | None]]) -> list[DatasetCase]:
    """Every C-STORE got a status; malformed data never one that tells the sender to retry it as it is
    (0xA7xx, out of resources: the node's own failure); every valid instance was stored. Returns the
    cases stored."""
    print("statuses:", dict(Counter("none" if s is None else f"0x{s:04X}" for _, s in results)))
    unanswered = [(case.seed, case.mutations) for case, status in results if status is None]
    assert not unanswered, f"C-STOREs without a status: {unanswered[:20]}"
    retry = [
        (case.seed, case.mutations) for case, status in results if status is not None and status >> 8 == 0xA7
    ]
    assert not retry, f"malformed data answered 'out of resources', so it is retried forever: {retry[:20]}"
    refused_valid = [
        (case.seed, status) for case, status in results if not case.mutations and status != SUCCESS
    ]
    assert not refused_valid, f"valid instances refused: {refused_valid[:20]}"
    stored = [case for case, status in results if status == SUCCESS]
    assert stored, "no case was stored: the run proves nothing about what is acknowledged"
    return stored


def assert_kept(stored: list[DatasetCase], data_dir: Path, db: Database) -> None:
    """Every instance answered Success is in the spool as it was sent, and indexed (set aside to
    quarantine/, audited, only for a UID conflict the index found)."""
    wanted = {case.sop_instance_uid for case in stored}
    wait_for(lambda: wanted <= known(db), 60, "every acknowledged instance indexed or set aside")
    for case in stored:
        files = [*data_dir.glob(f"*/*/*/{case.sop_instance_uid}.dcm")]
        assert len(files) == 1 and files[0].read_bytes().endswith(case.data), (case.seed, files)
    with db.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.set_aside"))
        reasons = {str(event.detail.get("sop_uid")): str(event.detail.get("reason")) for event in events}
    aside = {uid: reasons[uid] for uid in wanted - indexed(db)}
    print(f"stored {len(stored)}: {len(stored) - len(aside)} indexed, set aside {sorted(aside.values())}")
    # Set aside is the net under the index, not a way to deal with a value: an instance whose header was
    # read well enough to be acknowledged is indexed (a UID conflict found only now is the exception).
    unindexable = sorted(reason for reason in aside.values() if reason.startswith("cannot be indexed"))
    assert not unindexable, f"acknowledged, then not indexable: {unindexable[:10]}"


def indexed(db: Database) -> set[str]:
    with db.session() as session:
        return set(session.scalars(select(Instance.sop_uid)))


def known(db: Database) -> set[str]:
    """SOP Instance UIDs the node indexed or set aside (audited)."""
    with db.session() as session:
        aside = session.scalars(select(AuditEvent).where(AuditEvent.action == "instance.set_aside"))
        return indexed(db) | {str(event.detail.get("sop_uid")) for event in aside}


@pytest.mark.slow
def test_data_sets_over_the_network(tmp_path: Path) -> None:
    node, start = fuzz_node(tmp_path)
    try:

        def one(seed: int) -> tuple[DatasetCase, Outcome]:
            case = dataset_case(seed)
            return case, store_raw(case, node.dicom_port, DEADLINE)

        results = run_for(BUDGET, 2, one, FOUND_OVER_THE_NETWORK)
        print(f"\ndata sets: {summary([outcome for _, outcome in results])}")
        unanswered = [(o.seed, o.answers, o.ended) for _, o in results if o.unanswered]
        assert not unanswered, (
            f"{len(unanswered)} C-STOREs not answered in {DEADLINE:.0f} s: {unanswered[:20]}"
        )
        assert_node_whole(node, start, tmp_path)
        rejected = [(case.seed, o.answers) for case, o in results if o.answers[0] != "A-ASSOCIATE-AC"]
        assert not rejected, (
            f"associations for a valid SOP class and transfer syntax refused: {rejected[:20]}"
        )
        # A request pynetdicom cannot take as one (no Affected SOP Instance UID, or one over 64 characters)
        # has no status to get: the association is aborted at once, rather than leave the sender waiting.
        invalid = [(case.seed, o.answers, o.seconds) for case, o in results if not case.request_readable]
        assert invalid, "the requests without a readable Affected SOP Instance UID were not replayed"
        prompt = float(LISTENER["network_timeout"])  # the idle limit would abort it too, later
        assert all(answers[-1].startswith("A-ABORT") and took < prompt for _, answers, took in invalid), (
            invalid
        )
        stored = judge([(case, o.statuses[0]) for case, o in results if case.request_readable])
        data_dir = Path(node.settings["node"]["data_dir"])
        db = Database(f"sqlite:///{data_dir / 'ainode.db'}")
        try:
            assert_kept(stored, data_dir, db)
        finally:
            db.dispose()
        assert_no_phi(node.log.read_text())
    finally:
        node.stop()


ORIGIN = Origin(calling_ae="FUZZER", called_ae="AINODE", address="127.0.0.1:0")


def test_accept_in_process(db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Thousands of cases straight into Ingest.accept (other seeds than the network's): only Refused may
    come out, judged as the listener would answer it."""
    caplog.set_level(logging.INFO)
    indexer = Indexer(db, StudySettings(stable_seconds=0), on_ready=lambda: None)
    ingest = Ingest(Settings(), db, Spool(tmp_path / "data"), indexer)
    indexer.start()
    escaped: list[tuple[int, str]] = []
    results: list[tuple[DatasetCase, int | None]] = []
    stop = time.monotonic() + BUDGET / 2  # the two databases share the layer's budget
    try:
        for seed in itertools.chain(FOUND_IN_PROCESS, itertools.count(FIRST_SEED + 1_000_000)):
            if time.monotonic() > stop and seed not in FOUND_IN_PROCESS:
                break
            case = dataset_case(seed)
            try:
                ingest.accept(case.meta(), case.data, ORIGIN)
            except Refused as refusal:
                results.append((case, refusal.status))
            except Exception as exc:  # the listener would have answered this one 'out of resources'
                escaped.append((seed, repr(exc)[:200]))
            else:
                results.append((case, SUCCESS))
    finally:
        indexer.stop()
    print(f"\naccept: {len(results) + len(escaped)} cases")
    assert not escaped, f"exceptions other than Refused: {escaped[:20]}"
    assert_no_phi(caplog.text)
    empty = [status for case, status in results if not case.sop_instance_uid]
    assert all(status == CANNOT_UNDERSTAND for status in empty), f"no announced SOP Instance UID: {empty}"
    assert_kept(judge(results), tmp_path / "data", db)
    assert audit.verify(db) is None
