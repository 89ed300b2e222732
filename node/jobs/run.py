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

from highdicom._standard_utils import get_module_attribute_map
from pydicom import Dataset, dcmread

from handlers import get_handler, handler_class
from node.config import DEFAULT_OUTPUTS, OutputSpec
from node.outputs import write_outputs
from node.runtime import PackagedModel, load_model
from node.runtime.fastest import fastest
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
    models_loaded: tuple[str, ...] = ()  # packages this job had to load (none where the worker preloaded)


PackageRef = tuple[str, str | None]  # a package's name and version (None: its newest)
_models: dict[Path, PackagedModel] = {}
_loads: list[str] = []  # every package this process loaded, in order: a job names those it had to load
_runtime_cache: Path | None = None  # see prefer_faster_runtime
_runtime_tried: set[Path] = set()  # packages try_faster_runtime has measured (and kept as they ran faster)


def prefer_faster_runtime(cache: str | os.PathLike[str] | None) -> None:
    """Let :func:`try_faster_runtime` move loaded torch packages that ONNX Runtime can run alike to
    whichever of the two is faster on this machine, keeping the ONNX exports in ``cache``
    (:mod:`node.runtime.fastest`); None: every package under its own framework."""
    global _runtime_cache
    _runtime_cache = None if cache is None else Path(cache)


def loaded(models_dir: str | os.PathLike[str], name: str, version: str | None = None) -> PackagedModel:
    """The package ``name`` (at ``version``, else its newest), loaded. Models stay loaded in a worker
    between jobs; a package whose manifest now names other weights (replaced in place) is loaded
    afresh, so a job never runs old weights under the new sha256. Loading checks the sha256."""
    package = select(models_dir, name, version)
    cached = _models.get(package.path)
    if cached is None or cached.manifest.sha256 != package.manifest.sha256:
        _models[package.path] = load_model(package)
        _runtime_tried.discard(package.path)
        _loads.append(f"{package.manifest.name} {package.manifest.version}")
    return _models[package.path]


@dataclass(frozen=True)
class Preloaded:
    """One package a worker loaded (before its first job, or under another runtime), or why not."""

    name: str
    seconds: float
    runtime: str = ""  # the class that runs it (TorchModel), or why the measured choice fell where it did
    error: str = ""


def preload(models_dir: str | os.PathLike[str], packages: Sequence[PackageRef]) -> list[Preloaded]:
    """Load ``packages`` now and run each once, so the first job that needs one does not wait 3-9 s
    for it; and read the DICOM standard's tables highdicom reads the first time it writes a result
    (0.4 s). One package that cannot be loaded is reported and skipped: the others still load, and
    only its jobs fail."""
    get_module_attribute_map()  # cached for the process: every output writer's first object reads it
    report = []
    for name, version in packages:
        start = time.perf_counter()
        try:
            model = loaded(models_dir, name, version)
            model.exercise()
            runtime = model.runtime_choice or type(model).__name__
        except Exception as exc:  # missing, refused (sha256), or a network that does not build
            report.append(Preloaded(name, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"))
        else:
            report.append(Preloaded(name, time.perf_counter() - start, runtime))
    return report


def try_faster_runtime() -> Preloaded | None:
    """Measure one loaded package not measured yet under ONNX Runtime against its own framework, and
    keep the faster (:func:`node.runtime.fastest.fastest`); None when none is left, or when
    :func:`prefer_faster_runtime` is off. Exporting takes seconds, so a worker calls this only while
    no job waits: under load it keeps running what it loaded, never slower than that."""
    if _runtime_cache is None:
        return None
    path = next((path for path in _models if path not in _runtime_tried), None)
    if path is None:
        return None
    _runtime_tried.add(path)
    start, model = time.perf_counter(), _models[path]
    _models[path] = fastest(model, _runtime_cache)
    runtime = _models[path].runtime_choice or type(_models[path]).__name__
    return Preloaded(model.manifest.name, time.perf_counter() - start, runtime)


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


DEFER_SIZE = 64 * 1024  # bytes: a value this large (pixel data, not a header's) is read when accessed


def run_job(task: Task) -> JobOutput:
    spec = task.spec
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Values over DEFER_SIZE (pixel data) stay in the file until a handler asks for them: a series'
    # worth of pixel data read up front would grow a worker's memory with the series.
    datasets = [dcmread(path, defer_size=DEFER_SIZE) for path in task.files]
    timings["load_images"] = time.perf_counter() - start

    start, loads = time.perf_counter(), len(_loads)
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
    return JobOutput(
        model.identity, results, analysis.summary, analysis.record(), timings, tuple(_loads[loads:])
    )
