"""Job time in a worker process, per handler on its demo input (a 30-slice 512×512 head CT with a
bleed; one pediatric chest DX with pleural effusion): the first job of a worker started by that job
and loading the model during it (cold, as before workers preloaded: the reference), and of a worker
started and preloaded before it (preloaded); and a warm job with every package under its own
framework (torch, the reference) and under ONNX Runtime where that is faster (``[jobs] onnx_runtime =
"when_faster"``). Wall seconds of ``WorkerSlot.run``, medians of several runs: each first job in a
fresh worker; the warm jobs in one worker, after a first (and, for ONNX Runtime, after the worker has
measured it while idle). A package that needs gradients (the chest model) runs under torch whatever
the setting: "–".

    .venv/bin/python -m benchmarks.inference [--runs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

from node.jobs.local import WorkerSetup, WorkerSlot
from node.jobs.run import JobOutput, JobSpec, Preloaded, Task
from node.runtime.fastest import convertible
from node.runtime.package import select
from training.chest_phantom import chest_dicom, sample
from training.ct_phantom import write_head_ct_series

MODELS = Path(__file__).resolve().parents[1] / "models"


def demo_inputs(folder: Path) -> dict[str, tuple[str, list[str]]]:
    """handler → (its model package, the files of its demo series)."""
    chest = folder / "chest" / "DX.dcm"
    chest.parent.mkdir(parents=True)
    radiograph = sample(np.random.default_rng(7), 1024, "pleural_effusion")
    chest_dicom(radiograph, "benchmark-chest").save_as(chest, enforce_file_format=True)
    ct = write_head_ct_series(folder / "ct", 30, hemorrhage=True, seed=11)
    return {
        "ct_hemorrhage": ("ct-hemorrhage", [str(path) for path in ct]),
        "chest_xray": ("chest-xray", [str(chest)]),
    }


def timed_jobs(
    setup: WorkerSetup, task: Task, jobs: int, ready: bool = True, settle: bool = False
) -> list[tuple[float, JobOutput]]:
    """``jobs`` runs of ``task`` in one fresh worker, started (and its models loaded) first where
    ``ready``, else by the first job, as the node did before workers started with the pool. With
    ``settle``, untimed jobs first until the worker says it tried the faster runtime (it does so while
    idle)."""
    notes: list[Preloaded] = []
    slot = WorkerSlot(setup, on_ready=notes.extend)
    try:
        if ready:
            slot.start()
        for _ in range(5 if settle else 0):
            slot.run(task, 600)
            if any(note.runtime.startswith(("ONNX", "torch:")) for note in notes):
                break
        out = []
        for _ in range(jobs):
            start = time.perf_counter()
            output = slot.run(task, 600)
            out.append((time.perf_counter() - start, output))
        return out
    finally:
        slot.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("| handler | first job, cold s | first job, preloaded s | cold / preloaded |", end="")
    print(" warm job, torch s | warm job, ONNX Runtime where faster s | torch / that |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for handler, (model, files) in demo_inputs(folder).items():
            task = Task(JobSpec(1, handler, model), files, str(folder / "out"), str(MODELS))
            plain = WorkerSetup(args.threads, models_dir=str(MODELS))
            preloading = WorkerSetup(args.threads, models_dir=str(MODELS), packages=[(model, None)])
            fastest = WorkerSetup(
                args.threads,
                models_dir=str(MODELS),
                packages=[(model, None)],
                runtime_cache=str(folder / "runtimes"),
            )
            cold, preloaded = [], []
            for _ in range(args.runs):
                ((seconds, output),) = timed_jobs(plain, task, 1, ready=False)
                assert output.models_loaded, "the cold worker was to load its model during the job"
                cold.append(seconds)
                ((seconds, output),) = timed_jobs(preloading, task, 1)
                assert not output.models_loaded, "the preloading worker loaded its model during the job"
                preloaded.append(seconds)
            ratio = median(cold) / median(preloaded)
            first = f"| {handler} | {median(cold):.2f} | {median(preloaded):.2f} | {ratio:.1f} |"
            torch_warm = [seconds for seconds, _ in timed_jobs(preloading, task, args.runs + 1)[1:]]
            if not convertible(select(MODELS, model)):  # it needs gradients: torch it is
                print(f"{first} {median(torch_warm):.2f} | – | – |", flush=True)
                continue
            fast_warm = [seconds for seconds, _ in timed_jobs(fastest, task, args.runs, settle=True)]
            ratio = median(torch_warm) / median(fast_warm)
            print(f"{first} {median(torch_warm):.2f} | {median(fast_warm):.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
