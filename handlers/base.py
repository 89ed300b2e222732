"""The handler contract: a clinical task turns a series of source images into an :class:`Analysis`.

A handler knows the clinical task — which images it can read, how to preprocess them, how per-image
model outputs become a study-level finding with codes. It does not know about networking, the
database or DICOM writing: the pipeline hands it datasets and a loaded model, and gives its Analysis
to the results writers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from pydicom import Dataset


@dataclass(frozen=True)
class Code:
    """A coded concept (SNOMED CT "SCT", RadLex "RADLEX", DICOM "DCM")."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Finding:
    """What the model says about one label, for the whole series."""

    concept: Code
    present: bool
    probability: float
    threshold: float


@dataclass(frozen=True)
class Explanation:
    """One source image a finding rests on, with the Grad-CAM heatmap over it."""

    source: Dataset
    image: np.ndarray  # (H, W, 3) uint8: the image as the handler showed it to the model (e.g. windowed)
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], same H and W as image; 1 = strong evidence
    probability: float  # the probability of the explained label on this image
    label: str  # human-readable name of the explained label


@dataclass(frozen=True)
class Analysis:
    """A handler's answer. Either findings, or the reason the images could not be analysed."""

    task: str  # human-readable task name, e.g. "Head CT hemorrhage detection"
    sources: Sequence[Dataset]  # every image that was analysed (or rejected), referenced by the results
    findings: Sequence[Finding] = ()
    explanations: Sequence[Explanation] = ()
    summary: str = ""  # one sentence a radiologist reads first
    not_analysed_reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)  # per-image figures for the API/audit

    @classmethod
    def not_analysed(cls, task: str, sources: Sequence[Dataset], reason: str) -> Analysis:
        """The answer for images that cannot be analysed: the reason, and no probability at all."""
        return cls(task=task, sources=list(sources), not_analysed_reason=reason)

    @property
    def analysed(self) -> bool:
        return self.not_analysed_reason is None

    def __post_init__(self) -> None:
        if self.not_analysed_reason is not None and (self.findings or self.explanations):
            raise ValueError("an image that was not analysed cannot carry findings")
        if self.not_analysed_reason is None and not self.findings:
            raise ValueError("an analysed series must carry at least one finding")


OptionsT = TypeVar("OptionsT", bound=BaseModel)


def validate_options(schema: type[OptionsT], options: Mapping[str, Any], handler: str) -> OptionsT:
    """A handler's options (the manifest's ``[options]`` overlaid with a route's) checked against its
    schema; the ValueError names each bad option, so a route's author can fix it."""
    try:
        return schema.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"option {'.'.join(str(part) for part in error['loc'])!r}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(f"{handler}: {problems}") from exc


class Model(Protocol):
    """What a handler needs from a loaded model (see node.runtime)."""

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def thresholds(self) -> Mapping[str, float]:
        """Decision thresholds the package's manifest sets, per label (labels without one are absent)."""
        ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → (N, n_labels) probabilities."""
        ...

    def explain(self, batch: np.ndarray, label_index: int) -> np.ndarray:
        """(N, C, H, W) float32 → (N, H, W) Grad-CAM heatmaps in [0, 1] for one label."""
        ...


class SegmentationModel(Protocol):
    """What a handler needs from a loaded segmentation model (manifest ``task = "segmentation"``)."""

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    def segment(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → (N, n_labels, H, W) per-pixel probabilities (softmax over labels)."""
        ...


def rgb8(ds: Dataset) -> np.ndarray:
    """A colour photograph as (H, W, 3) uint8 RGB (pydicom converts YBR colour spaces to RGB); more
    than 8 bits stored are scaled down, not clipped."""
    pixels = ds.pixel_array
    bits = int(ds.get("BitsStored", 8))
    if bits > 8:
        pixels = np.rint(pixels.astype(np.float32) * (255.0 / (2**bits - 1)))
    return np.clip(pixels, 0, 255).astype(np.uint8)


DEFAULT_THRESHOLD = 0.5  # a label's decision threshold where neither the route nor the manifest sets one


def label_indices(handler: str, model: Model, labels: Sequence[str]) -> dict[str, int]:
    """Where each label ``handler`` reads sits in the model's outputs; a model lacking one is refused
    (a route pointing a handler at the wrong model fails loudly, not with shuffled findings)."""
    names = list(model.labels)
    missing = [label for label in labels if label not in names]
    if missing:
        raise ValueError(f"{handler} needs a model with labels {list(labels)}, missing {missing}")
    return {label: names.index(label) for label in labels}


def thresholds(
    model: Model, labels: Sequence[str], override: float | Mapping[str, float] | None
) -> dict[str, float]:
    """Each label's decision threshold: the route's option (one value for all labels, or per label),
    else the package manifest's, else DEFAULT_THRESHOLD."""
    routed: Mapping[str, float | None] = (
        override if isinstance(override, Mapping) else dict.fromkeys(labels, override)
    )
    chosen = {label: routed.get(label) for label in labels}
    return {
        label: float(model.thresholds.get(label, DEFAULT_THRESHOLD)) if value is None else float(value)
        for label, value in chosen.items()
    }


class Handler(ABC):
    """One clinical task. Subclasses set ``name`` and implement :meth:`analyse`."""

    name: ClassVar[str]

    @abstractmethod
    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        """Analyse one series. ``options`` are the model manifest's task parameters overlaid with
        the route's ``options``; a handler validates them and names a bad one in its error."""
