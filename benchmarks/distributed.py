"""Distributed workers: studies per minute with the local pool and with 1, 2 and 4 Celery workers
(``ainode worker`` processes on this machine, RabbitMQ or Redis as the broker), on the workload of
:mod:`benchmarks.load` (single-image studies of the four photo/radiograph tasks from concurrent
``storescu`` senders and a head CT from one more, every route of ``config.example.toml``, results sent
to a real Orthanc), and the latency the broker adds to a lone job.

The reference, measured in the same round: the same node (PostgreSQL, the same routes) running its
jobs on its own process pool (``[jobs] executor = "local"``, ``node.workers`` 1). Each worker runs one
job at a time with ``torch_threads = max(1, cores // workers)`` (more threads than cores collapse), the
pool's process with as many as one worker's.
Lone job: a chest radiograph sent alone to the idle node, each job's ``created_at`` → ``finished_at``
(the node's database); "until started" is created → started_at (the local pool's dispatcher claimed it;
under celery a worker took it from the broker), "work" the job's own stages (load, analyse, write); the
rest is the worker's fetch and upload and recording the outcome (celery) or the pipe to the pool's
process (local).

    .venv/bin/python -m benchmarks.distributed [--runs 3] [--celery-workers 1,2,4] [--broker rabbitmq|redis]
        [--studies 40] [--senders 4] [--ct-slices 60] [--lone 5] [--torch-threads N]

Every setup starts a fresh node, its own database and broker, and fresh workers; a round runs every
setup once against one fresh Orthanc; medians of the rounds. Timings mean something only on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import Inputs, drive, median_of_runs, settings_for, studies_per_minute, write_inputs
from node.db import JobStatus
from tests.cluster import Broker, Cluster, rabbitmq_vhost, redis_database
from tests.conftest import postgres_database
from tests.peers import OrthancServer

LONE_GAP_SECONDS = 1.0  # between lone jobs: the node idle again, as between studies at night


@dataclass
class Setup:
    workers: int  # 0: the local pool

    @property
    def name(self) -> str:
        return "local pool" if self.workers == 0 else f"celery, {self.workers} worker(s)"


@dataclass
class Measured:
    studies_per_minute: float
    lone_s: list[float]  # each lone job, created → finished
    claim_s: list[float]  # each lone job, created → started_at (claimed by the pool / taken by a worker)
    work_s: list[float]  # each lone job's own stages
    not_done: int


@contextlib.contextmanager
def broker_of(kind: str) -> Iterator[Broker]:
    with rabbitmq_vhost() if kind == "rabbitmq" else redis_database() as broker:
        yield broker


def lone_jobs(cluster: Cluster, count: int) -> tuple[list[float], list[float], list[float]]:
    """``count`` chest radiographs sent one at a time, each once the one before is done."""
    lone, claim, work = [], [], []
    for _ in range(count):
        before = len([job for job in cluster.jobs() if job.status == JobStatus.DONE])
        time.sleep(LONE_GAP_SECONDS)
        cluster.send(1)
        job = cluster.wait_done(before + 1, timeout=120)[-1]
        assert job.finished_at is not None and job.started_at is not None
        lone.append((job.finished_at - job.created_at).total_seconds())
        claim.append((job.started_at - job.created_at).total_seconds())
        work.append(sum(job.timings.values()))
    return lone, claim, work


def measure(
    folder: Path, setup: Setup, orthanc: OrthancServer, inputs: Inputs, args: argparse.Namespace
) -> Measured:
    cores = os.cpu_count() or 1
    with broker_of(args.broker) as broker, postgres_database() as database_url:
        settings = settings_for(orthanc, args, [*inputs.senders, inputs.warmup])
        threads = args.torch_threads or max(1, cores // max(1, setup.workers))  # the pool's: as 1 worker's
        settings["node"]["torch_threads"] = threads
        cluster = Cluster(
            folder, broker, database_url, settings=settings, executor="celery" if setup.workers else "local"
        )
        try:
            cluster.start()
            names = [f"worker-{n + 1}" for n in range(setup.workers)]
            for name in names:
                cluster.worker(name, wait=False, torch_threads=threads)
            cluster.wait_up(*names)
            _, everything = drive(cluster.node, inputs, args)
            rows = [row for row in everything if row["study_uid"] in inputs.modality]
            lone = lone_jobs(cluster, args.lone)
        except Exception:
            print(f"{setup.name}: the node's log, its end:\n{cluster.node.log.read_text()[-4000:]}")
            raise
        finally:
            cluster.stop()
    not_done = len([row for row in rows if row["status"] != "done"])
    return Measured(studies_per_minute(rows), *lone, not_done)


def report(
    setups: list[Setup], rounds: list[dict[int, Measured]], inputs: Inputs, args: argparse.Namespace
) -> None:
    singles, ct = inputs.senders[:-1], inputs.senders[-1]
    print(
        f"benchmarks.load's workload: {sum(len(s.files) for s in singles)} single-image studies from"
        f" {len(singles)} senders and a {len(ct.files)}-slice head CT, all at once, after a warm-up study"
        f" of each task; broker {args.broker}; {os.cpu_count()} cores; torch threads"
        f" {args.torch_threads or 'cores // workers'}; {len(rounds)} rounds, medians"
    )
    local = [r[0] for r in rounds]
    print(f"  {'setup':22s} {'studies/min':>34s}   {'ratio to local':>30s}")
    for setup in setups:
        per_minute = [r[setup.workers].studies_per_minute for r in rounds]
        ratios = [
            r[setup.workers].studies_per_minute / m.studies_per_minute
            for r, m in zip(rounds, local, strict=True)
        ]
        print(f"  {setup.name:22s} {median_of_runs(per_minute, 1):>34s}   {median_of_runs(ratios):>30s}")
    print(f"  a lone chest radiograph, created → finished, s ({args.lone} a round: their median; medians)")
    for setup in setups:
        lone = [statistics.median(r[setup.workers].lone_s) for r in rounds]
        claim = [statistics.median(r[setup.workers].claim_s) for r in rounds]
        work = [statistics.median(r[setup.workers].work_s) for r in rounds]
        added = [
            statistics.median(r[setup.workers].lone_s) - statistics.median(m.lone_s)
            for r, m in zip(rounds, local, strict=True)
        ]
        print(
            f"    {setup.name:22s} {median_of_runs(lone)}   until started {statistics.median(claim):.2f}"
            f"   the job's own work {statistics.median(work):.2f}"
            f"   more than the local pool {median_of_runs(added)}"
        )
    if any(m.not_done for r in rounds for m in r.values()):
        print(
            "  studies not done, per round and setup:",
            [{s: m.not_done for s, m in r.items()} for r in rounds],
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--celery-workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--broker", choices=("rabbitmq", "redis"), default="rabbitmq")
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--ct-slices", type=int, default=60)
    parser.add_argument("--lone", type=int, default=5, help="lone jobs a setup")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="each worker's and the pool's (0: cores // workers)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take to settle")
    args = parser.parse_args()
    # what benchmarks.load's settings_for and drive read: the node's defaults, warmed up
    args.workers, args.receivers, args.stable_seconds, args.forwarders, args.cold = 0, 0, None, False, False
    setups = [Setup(0), *(Setup(int(n)) for n in args.celery_workers.split(","))]
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder / "inputs", args.studies, args.senders, args.ct_slices)
        rounds = []
        for index in range(args.runs):
            orthanc = OrthancServer(folder / f"orthanc{index}").start()
            try:
                rounds.append(
                    {
                        s.workers: measure(folder / f"run{index}-{s.workers}", s, orthanc, inputs, args)
                        for s in setups
                    }
                )
            finally:
                orthanc.stop()
            print(f"  (round {index + 1} done after {(time.monotonic() - began) / 60:.1f} min)", flush=True)
        report(setups, rounds, inputs, args)
    print(f"  (the benchmark took {(time.monotonic() - began) / 60:.1f} min)")


if __name__ == "__main__":
    main()
