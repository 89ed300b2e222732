"""Run a torch package under ONNX Runtime where that is faster here, with the same results.

ONNX Runtime has no gradients, so a package qualifies only when all it is asked for comes from the
forward pass: a segmentation model, or a classifier whose explanations take the CAM fast path (a global
average pooling + linear head, ``[explain] classifier``). Its ONNX export (:mod:`node.runtime.export`)
is written once per weights file into a cache folder; then both are timed on the same inputs, the
faster one is kept and the choice is logged. Job workers do this only while idle, so no job waits
for an export (:func:`node.jobs.run.try_faster_runtime`). The ONNX model stands for the package it
was exported from: results name the package's own weights, since the export is a conversion of them
that gives the same probabilities and heatmaps (tested), not another model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from node.runtime import load_model
from node.runtime.model import PackagedModel
from node.runtime.package import ModelPackage, open_package

log = logging.getLogger(__name__)

TIMING_RUNS = 3  # medians of this many, after one warm-up run


def convertible(package: ModelPackage) -> bool:
    """Whether ONNX Runtime can do all a job asks of this package: a torch state_dict package whose
    explanations, if any, need no gradients."""
    manifest = package.manifest
    if manifest.framework != "torch" or manifest.architecture is None:
        return False
    explain = manifest.explain
    return manifest.task == "segmentation" or explain is None or explain.classifier is not None


def exported(package: ModelPackage, cache: Path) -> ModelPackage:
    """The package's ONNX export in ``cache``, written there the first time (into a scratch folder, then
    renamed into place, so workers exporting at once never see half a package)."""
    from node.runtime.export import export_package  # imports torch's ONNX exporter: only when needed

    manifest = package.manifest
    target = cache / f"{manifest.name}-{manifest.version}-{manifest.sha256[:16]}"
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=cache, prefix=".export-"))
        try:
            export_package(package.path, "onnx", scratch)
            scratch.rename(target)
        except OSError:  # another worker renamed its export into place first
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return open_package(target)


def cost_ms(model: PackagedModel) -> float:
    """Milliseconds for what a job asks of the model (:meth:`PackagedModel.exercise` with a batch of
    four), the median of a few runs after one to warm up."""
    model.exercise(4)
    runs = []
    for _ in range(TIMING_RUNS):
        start = time.perf_counter()
        model.exercise(4)
        runs.append(time.perf_counter() - start)
    return float(np.median(runs)) * 1000


def fastest(model: PackagedModel, cache: Path) -> PackagedModel:
    """``model`` (loaded as packaged), or the same package under ONNX Runtime where it qualifies and
    runs faster here. An export that fails leaves the package running as it is (said in
    ``runtime_choice``): speed is never worth a failed job."""
    package = ModelPackage(model.path, model.manifest)
    if not convertible(package):
        return model
    try:
        onnx = load_model(exported(package, cache)).standing_for(package)
    except Exception as exc:  # the exporter or ONNX Runtime cannot take this network
        model.runtime_choice = f"torch: no ONNX Runtime export ({type(exc).__name__}: {exc})"
        log.warning("%s runs under %s", package.manifest.name, model.runtime_choice, exc_info=True)
        return model
    own, converted = cost_ms(model), cost_ms(onnx)
    faster = onnx if converted < own else model
    faster.runtime_choice = (
        f"{'ONNX Runtime' if faster is onnx else 'torch'}: {converted:.1f} ms with ONNX Runtime, "
        f"{own:.1f} ms with torch (a batch of 4 and one explanation)"
    )
    log.info("%s runs under %s", package.manifest.name, faster.runtime_choice)
    return faster
