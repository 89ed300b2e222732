"""A worker's memory stays flat as a CT series grows: run_job reads the series with its pixel data left
on disk and the CT handler decodes, preprocesses and predicts one model batch at a time, so a series
six times longer must not need memory six times larger. Measured with tracemalloc, which sees every
numpy array and pydicom's bytes; a memory assertion, not a timing one."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from node.jobs.run import JobSpec, Task, run_job
from node.runtime.model import batch
from training.ct_phantom import write_head_ct_series

MODELS = Path(__file__).resolve().parents[1] / "models"
SHORT, LONG = 16, 96  # slices: one model batch, and six
GROWTH = 1.5  # the longest series' peak over the shortest's; holding the series makes it 3-4


def peak_bytes(files: list[Path], out_dir: Path) -> int:
    """The most memory Python and numpy held at once while one CT job ran over ``files``."""
    task = Task(
        JobSpec(1, "ct_hemorrhage", "ct-hemorrhage"), [str(f) for f in files], str(out_dir), str(MODELS)
    )
    tracemalloc.start()
    try:
        output = run_job(task)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert output.results, output.summary  # the job really analysed the series and wrote its results
    return peak


@pytest.mark.parametrize("hemorrhage", [True, False])
def test_peak_memory_does_not_grow_with_the_series(tmp_path: Path, hemorrhage: bool) -> None:
    assert batch() == SHORT  # the short series is one batch, the long one several
    short = write_head_ct_series(tmp_path / "short", SHORT, hemorrhage=hemorrhage, seed=5301)
    long = write_head_ct_series(tmp_path / "long", LONG, hemorrhage=hemorrhage, seed=5302)
    peak_bytes(short, tmp_path / "warm")  # loads the model: its weights are not what is measured
    small, large = peak_bytes(short, tmp_path / "short-out"), peak_bytes(long, tmp_path / "long-out")
    assert large < GROWTH * small, (
        f"peak {large / 2**20:.0f} MiB for {LONG} slices, {small / 2**20:.0f} MiB for {SHORT}"
    )
