"""The body of one job: series files → handler + model → DICOM result files.

Runs in a worker process (see node.jobs) and in ``ainode infer``; knows nothing of the database or
the network, so a crash here costs one job and nothing else.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from handlers import get_handler
from node.results import secondary_captures, structured_report
from node.runtime import PackagedModel, load_model
from node.runtime.identity import ModelIdentity
from node.runtime.package import open_package
from node.spool import write_atomic

OVERLAY_SERIES_NUMBER = 9000
REPORT_SERIES_NUMBER = 9001


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    files: Sequence[str]
    handler: str
    model_dir: str
    options: Mapping[str, Any]
    out_dir: str


@dataclass(frozen=True)
class WrittenResult:
    kind: str  # "SC", "SR"
    sop_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class JobOutput:
    model: ModelIdentity
    results: list[WrittenResult]
    summary: str
    outcome: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


_models: dict[str, PackagedModel] = {}


def _model(model_dir: str) -> PackagedModel:
    """Models stay loaded in a worker between jobs. A package whose manifest now names other weights
    (replaced in place) is loaded afresh, so a job never runs the old ones under the new sha256; each
    load checks the sha256."""
    cached = _models.get(model_dir)
    if cached is None or cached.manifest.sha256 != open_package(model_dir).manifest.sha256:
        _models[model_dir] = load_model(Path(model_dir))
    return _models[model_dir]


def _write(out_dir: Path, kind: str, dataset: Dataset) -> WrittenResult:
    path = out_dir / f"{kind}-{dataset.SOPInstanceUID}.dcm"
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_atomic(path, buffer.getvalue())
    return WrittenResult(kind, str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), str(path))


def run_job(spec: JobSpec) -> JobOutput:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    datasets = [dcmread(path) for path in spec.files]
    timings["load_images"] = time.perf_counter() - start

    start = time.perf_counter()
    model = _model(spec.model_dir)
    handler = get_handler(spec.handler)
    timings["load_model"] = time.perf_counter() - start

    start = time.perf_counter()
    analysis = handler.analyse(datasets, model, {**model.manifest.options, **spec.options})
    timings["analyse"] = time.perf_counter() - start

    start = time.perf_counter()
    out_dir = Path(spec.out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # a rerun replaces what an interrupted attempt left
    overlays = secondary_captures(analysis, model.identity, OVERLAY_SERIES_NUMBER)
    report = structured_report(analysis, model.identity, REPORT_SERIES_NUMBER, evidence=overlays)
    results = [_write(out_dir, "SC", ds) for ds in overlays] + [_write(out_dir, "SR", report)]
    timings["write_results"] = time.perf_counter() - start

    outcome: dict[str, Any] = {
        "analysed": analysis.analysed,
        "not_analysed_reason": analysis.not_analysed_reason,
        "findings": [
            {
                "code": f.concept.value,
                "scheme": f.concept.scheme,
                "meaning": f.concept.meaning,
                "present": f.present,
                "probability": round(float(f.probability), 4),
                "threshold": f.threshold,
            }
            for f in analysis.findings
        ],
    }
    return JobOutput(model.identity, results, analysis.summary, outcome, timings)
