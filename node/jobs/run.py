"""The body of one job: series files → handler + models → the route's outputs, as DICOM files.

Runs wherever an executor puts it (a worker process of the local pool, ``ainode infer``); knows
nothing of the database or the network, so a crash here costs one job and nothing else. The model is
resolved and verified here, once: the package's weights are hashed when it is loaded, and a loaded
model is kept for the next job until its manifest names other weights.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread

from handlers import get_handler, handler_class
from node.config import DEFAULT_OUTPUTS, OutputSpec
from node.outputs import write_outputs
from node.runtime import PackagedModel, load_model
from node.runtime.identity import ModelIdentity
from node.runtime.package import ModelMissing, select
from node.spool import write_atomic


@dataclass(frozen=True)
class JobSpec:
    """What one job is: the same whoever runs it and wherever, so it can cross processes and hosts."""

    job_id: int
    handler: str
    model: str
    model_version: str | None = None  # None: the newest installed
    companions: Mapping[str, str] = field(default_factory=dict)  # role → model package name
    options: Mapping[str, Any] = field(default_factory=dict)
    outputs: Sequence[OutputSpec] = DEFAULT_OUTPUTS


@dataclass(frozen=True)
class Task:
    """A job to run here: the spec, and where its data lies on this machine."""

    spec: JobSpec
    files: Sequence[str]  # the instances of every series the job covers (a study-level route: several)
    out_dir: str  # emptied, then filled with the results
    models_dir: str


@dataclass(frozen=True)
class WrittenResult:
    kind: str  # the output writer's kind: "SC", "SR", ...
    sop_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class JobOutput:
    model: ModelIdentity
    results: list[WrittenResult]
    summary: str
    outcome: dict[str, Any]  # Analysis.record(): findings, locations, masks, or why not analysed
    timings: dict[str, float] = field(default_factory=dict)


_models: dict[Path, PackagedModel] = {}


def loaded(models_dir: str | os.PathLike[str], name: str, version: str | None = None) -> PackagedModel:
    """The package ``name`` (at ``version``, else its newest), loaded. Models stay loaded in a worker
    between jobs; a package whose manifest now names other weights (replaced in place) is loaded
    afresh, so a job never runs old weights under the new sha256. Loading checks the sha256."""
    package = select(models_dir, name, version)
    cached = _models.get(package.path)
    if cached is None or cached.manifest.sha256 != package.manifest.sha256:
        _models[package.path] = load_model(package)
    return _models[package.path]


def _companions(task: Task) -> dict[str, PackagedModel]:
    """The route's further models, loaded; one that cannot fill its role is as good as missing."""
    roles = handler_class(task.spec.handler).companion_roles
    companions = {}
    for role, name in task.spec.companions.items():
        model = loaded(task.models_dir, name)
        if model.manifest.task != roles.get(role):
            raise ModelMissing(
                f"{task.spec.handler}: the {role} model must be a {roles.get(role) or 'no'} model, "
                f"{name} is a {model.manifest.task} model"
            )
        companions[role] = model
    return companions


def _write(out_dir: Path, kind: str, dataset: Dataset) -> WrittenResult:
    path = out_dir / f"{kind}-{dataset.SOPInstanceUID}.dcm"
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_atomic(path, buffer.getvalue())
    return WrittenResult(kind, str(dataset.SOPInstanceUID), str(dataset.SOPClassUID), str(path))


def run_job(task: Task) -> JobOutput:
    spec = task.spec
    timings: dict[str, float] = {}
    start = time.perf_counter()
    datasets = [dcmread(path) for path in task.files]
    timings["load_images"] = time.perf_counter() - start

    start = time.perf_counter()
    model = loaded(task.models_dir, spec.model, spec.model_version)
    handler = get_handler(spec.handler, _companions(task))
    timings["load_model"] = time.perf_counter() - start

    start = time.perf_counter()
    analysis = handler.analyse(datasets, model, {**model.manifest.options, **spec.options})
    timings["analyse"] = time.perf_counter() - start

    start = time.perf_counter()
    out_dir = Path(task.out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # a rerun replaces what an interrupted attempt left
    made = write_outputs(analysis, model.identity, spec.outputs)
    results = [_write(out_dir, kind, dataset) for kind, dataset in made]
    timings["write_results"] = time.perf_counter() - start
    return JobOutput(model.identity, results, analysis.summary, analysis.record(), timings)
