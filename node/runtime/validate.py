"""``ainode models validate``: what a hospital runs on a model package before deploying it.

Loads the package the way a job does (manifest, sha256, network), runs a smoke inference on a
generated input and a Grad-CAM for every label, and checks what comes out — so a wrong label count,
a bad target layer or broken weights show up here, not in a radiologist's worklist.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from handlers import get_handler
from node.runtime import PackagedModel, load_model
from node.runtime.package import ModelRefused, open_package


class ValidationFailed(Exception):
    """The package cannot be deployed; the message says which check failed."""


@dataclass(frozen=True)
class Check:
    name: str
    detail: str


def validate_package(path: str | os.PathLike[str], seed: int = 0) -> list[Check]:
    """Every check that passed, in order; raises ValidationFailed at the first that does not."""
    checks: list[Check] = []
    try:
        package = open_package(path)
    except ValueError as exc:
        raise ValidationFailed(f"manifest: {exc}") from exc
    manifest = package.manifest
    checks.append(Check("manifest", f"{manifest.name} {manifest.version}, {manifest.framework}"))
    try:
        get_handler(manifest.handler)
    except ValueError as exc:
        raise ValidationFailed(f"handler: {exc}") from exc
    checks.append(Check("handler", manifest.handler))

    start = time.perf_counter()
    try:
        model = load_model(package)  # verifies the sha256 first
    except (ModelRefused, ValueError, NotImplementedError) as exc:
        raise ValidationFailed(f"load: {exc}") from exc
    checks.append(
        Check(
            "weights",
            f"sha256 {manifest.sha256[:16]}… matches; loaded in {time.perf_counter() - start:.2f} s",
        )
    )

    height, width = model.input_size
    batch = np.random.default_rng(seed).random((2, manifest.input.channels, height, width), dtype=np.float32)
    if manifest.task == "segmentation":
        checks.append(_check_segment(model, batch))
        return checks
    start = time.perf_counter()
    probabilities = model.predict(batch)
    elapsed = (time.perf_counter() - start) / len(batch)
    if probabilities.shape != (len(batch), len(model.labels)):
        raise ValidationFailed(
            f"predict: shape {probabilities.shape}, expected {(len(batch), len(model.labels))}"
        )
    _check_probabilities("predict", probabilities, axis=1)
    checks.append(Check("predict", f"{len(model.labels)} labels, {elapsed * 1000:.0f} ms per image"))

    assert manifest.explain is not None  # the manifest schema requires it for classifiers
    for index, label in enumerate(model.labels):
        timings = []
        for method in model.explain_methods:
            start = time.perf_counter()
            maps = model.explain(batch, index, method=method)
            timings.append(f"{method} {(time.perf_counter() - start) / len(batch) * 1000:.0f} ms")
            if maps.shape != (len(batch), height, width):
                raise ValidationFailed(
                    f"explain {label} ({method}): shape {maps.shape}, expected {(len(batch), height, width)}"
                )
            if not np.all(np.isfinite(maps)) or maps.min() < 0 or maps.max() > 1:
                raise ValidationFailed(f"explain {label} ({method}): heatmap values outside [0, 1]")
        checks.append(
            Check(
                f"explain {label}",
                f"Grad-CAM on {manifest.explain.target_layer}, per image: {', '.join(timings)}",
            )
        )
    return checks


def _check_probabilities(step: str, values: np.ndarray, axis: int) -> None:
    if not np.all(np.isfinite(values)) or not np.allclose(values.sum(axis=axis), 1.0, atol=1e-4):
        raise ValidationFailed(f"{step}: probabilities are not finite or do not sum to 1")


def _check_segment(model: PackagedModel, batch: np.ndarray) -> Check:
    start = time.perf_counter()
    masks = model.segment(batch)
    elapsed = (time.perf_counter() - start) / len(batch)
    expected = (len(batch), len(model.labels), *model.input_size)
    if masks.shape != expected:
        raise ValidationFailed(f"segment: shape {masks.shape}, expected {expected}")
    _check_probabilities("segment", masks, axis=1)
    return Check("segment", f"{len(model.labels)} labels per pixel, {elapsed * 1000:.0f} ms per image")
