"""Grad-CAM cost per model: milliseconds per image, batch 1, two threads, by gradients and by the CAM fast
path, with predict as the reference measured in the same run; medians of several runs. Each package
with a global-average-pooling head is also exported to ONNX and timed under ONNX Runtime (fast path
only: it has no gradients).

    .venv/bin/python -m benchmarks.explain [--runs 7] [--models models]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from node.runtime import load_model
from node.runtime.export import export_package
from node.runtime.model import set_threads
from node.runtime.package import discover
from training.common import median_ms, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", type=Path, default=Path("models"))
    args = parser.parse_args()
    set_threads(2)
    print("| model | runtime | predict ms | Grad-CAM by gradients ms | CAM fast path ms | gradients / fast |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        variants = []
        for package in discover(args.models):
            if package.manifest.task != "classification":
                continue
            variants.append((package.manifest.name, "torch", package.path))
            explain = package.manifest.explain
            if package.manifest.architecture is not None and explain is not None and explain.classifier:
                # ONNX Runtime explains by the fast path only, so only GAP + linear heads are exported
                exported = export_package(package.path, "onnx", Path(tmp) / package.manifest.name).path
                variants.append((package.manifest.name, "onnx", exported))
        for name, runtime, path in variants:
            print(row(name, runtime, path, args.runs), flush=True)
        print("\n| model | runtime | labels | one at a time ms | together ms | one at a time / together |")
        print("|---|---|---|---|---|---|")
        for name, runtime, path in variants:
            print(labels_row(name, runtime, path, args.runs), flush=True)


def row(name: str, runtime: str, path: Path, runs: int) -> str:
    """One table row: the model's medians, "–" where the runtime lacks the method."""
    model = load_model(path)
    times = timings(model, len(model.labels) - 1, runs)
    keys = ("predict_ms", "explain_gradient_ms", "explain_cam_ms")
    cells = [f"{times[key]:.1f}" if key in times else "–" for key in keys]
    both = {"explain_gradient_ms", "explain_cam_ms"} <= times.keys()
    ratio = f"{times['explain_gradient_ms'] / times['explain_cam_ms']:.2f}" if both else "–"
    return f"| {name} | {runtime} | {' | '.join(cells)} | {ratio} |"


def labels_row(name: str, runtime: str, path: Path, runs: int) -> str:
    """One image, its last three labels explained one at a time and together (the default method)."""
    model = load_model(path)
    x = np.random.default_rng(0).random((1, model.manifest.input.channels, *model.input_size), np.float32)
    labels = list(range(len(model.labels)))[-3:]
    alone = median_ms(lambda: [model.explain(x, label) for label in labels], runs)
    together = median_ms(lambda: model.explain(x, labels), runs)
    return f"| {name} | {runtime} | {len(labels)} | {alone:.1f} | {together:.1f} | {alone / together:.2f} |"


if __name__ == "__main__":
    main()
