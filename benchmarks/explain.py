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

from node.runtime import load_model
from node.runtime.export import export_package
from node.runtime.model import set_threads
from node.runtime.package import discover
from training.common import timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", type=Path, default=Path("models"))
    args = parser.parse_args()
    set_threads(2)
    print("| model | runtime | predict ms | Grad-CAM by gradients ms | CAM fast path ms | gradients / fast |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for package in discover(args.models):
            if package.manifest.task != "classification":
                continue
            variants = [("torch", package.path)]
            explain = package.manifest.explain
            if package.manifest.architecture is not None and explain is not None and explain.classifier:
                # ONNX Runtime explains by the fast path only, so only GAP + linear heads are exported
                variants.append(
                    ("onnx", export_package(package.path, "onnx", Path(tmp) / package.manifest.name).path)
                )
            for runtime, path in variants:
                print(row(package.manifest.name, runtime, path, args.runs), flush=True)


def row(name: str, runtime: str, path: Path, runs: int) -> str:
    """One table row: the model's medians, "–" where the runtime lacks the method."""
    model = load_model(path)
    times = timings(model, len(model.labels) - 1, runs)
    keys = ("predict_ms", "explain_gradient_ms", "explain_cam_ms")
    cells = [f"{times[key]:.1f}" if key in times else "–" for key in keys]
    both = {"explain_gradient_ms", "explain_cam_ms"} <= times.keys()
    ratio = f"{times['explain_gradient_ms'] / times['explain_cam_ms']:.2f}" if both else "–"
    return f"| {name} | {runtime} | {' | '.join(cells)} | {ratio} |"


if __name__ == "__main__":
    main()
