"""The handler contract: a clinical task turns a series of source images into an :class:`Analysis`.

A handler knows the clinical task — which images it can read, how to preprocess them, how per-image
model outputs become a study-level finding. It does not know about networking, the database or DICOM
writing: the job hands it datasets and loaded models, and gives its Analysis to the output writers,
which need nothing else. What a model's labels mean (their codes) is the model package's word, read
from its manifest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Self

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from pydicom import Dataset
from pydicom.sr.coding import Code

if TYPE_CHECKING:
    from node.runtime.identity import ModelIdentity

__all__ = [
    "Analysis",
    "Code",
    "Explanation",
    "Finding",
    "Handler",
    "Location",
    "Mask",
    "Model",
    "SIDES",
    "Site",
    "outline",
]

# The sides a finding site names (SNOMED CT, DICOM CID 244), by the letters DICOM's laterality uses
# ("B": both).
SIDES: Mapping[str, Code] = {
    "R": Code("24028007", "SCT", "Right"),
    "L": Code("7771000", "SCT", "Left"),
    "B": Code("51440002", "SCT", "Right and left"),
}
HOT = 0.5  # of a heatmap's peak: the hot area a finding's outline encloses
_MAX_VERTICES = 48  # an outline is simplified until it has at most this many vertices


@dataclass(frozen=True)
class Site:
    """Where in the body a finding lies (DICOM TID 1419 "Finding Site"): an anatomic structure, its
    side where it has one, and where within it (e.g. anterior)."""

    structure: Code
    laterality: Code | None = None
    modifier: Code | None = None

    @classmethod
    def on(cls, structure: Code, side: str | None, modifier: Code | None = None) -> Site:
        """The site on the side DICOM's laterality letter names ("R", "L", "B"; None or another
        letter: no side)."""
        return cls(structure, SIDES.get(side or ""), modifier)

    @property
    def words(self) -> str:
        """The site as a reader says it: "Left posterior brain"."""
        parts = [c.meaning for c in (self.laterality, self.modifier) if c is not None]
        return " ".join([*parts, self.structure.meaning]).capitalize()


@dataclass(frozen=True)
class Finding:
    """What the model says about one label, for the whole series (or, with a site, for one part of
    the patient, e.g. one eye)."""

    concept: Code
    present: bool
    probability: float
    threshold: float
    site: Site | None = None
    # The source image that shows the finding most, where the handler knows it: the report anchors a
    # finding that no explanation shows on this image.
    image: Dataset | None = field(default=None, compare=False, repr=False)
    note: str = ""  # how the finding was reached, where the report should say it (two eyes combined)


def outline(mask: np.ndarray, around: tuple[int, int] | None = None) -> np.ndarray:
    """The outer contour of a region of ``mask`` as (N, 2) float (column, row) pixel positions,
    simplified to at most a few dozen vertices: the region holding the pixel ``around`` (row,
    column), else the largest. Empty (0, 2) when the mask is empty."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2), np.float64)
    chosen = max(contours, key=cv2.contourArea)
    if around is not None:
        point = (float(around[1]), float(around[0]))
        inside = [c for c in contours if cv2.pointPolygonTest(c, point, False) >= 0]
        chosen = inside[0] if inside else chosen
    tolerance = 0.5
    simplified = chosen
    while len(simplified) > _MAX_VERTICES:
        simplified = cv2.approxPolyDP(chosen, tolerance, closed=True)
        tolerance *= 1.5
    return simplified.reshape(-1, 2).astype(np.float64)


@dataclass(frozen=True)
class Location:
    """Where on one source image a finding shows most, in that image's pixels: the heatmap's peak
    (row, column), and the outline of the hot area around it ((column, row) vertices, closed
    implicitly; fewer than three vertices when the hot area is too small to outline)."""

    source: Dataset
    row: float
    column: float
    label: str
    outline: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)), compare=False, repr=False)


@dataclass(frozen=True)
class Explanation:
    """One source image a finding rests on, with the Grad-CAM heatmap over it."""

    source: Dataset
    image: np.ndarray  # (H, W, 3) uint8: the image as the handler showed it to the model (e.g. windowed)
    heatmap: np.ndarray  # (H, W) float32 in [0, 1], same H and W as image; 1 = strong evidence
    probability: float  # the probability of the explained label on this image
    label: str  # human-readable name of the explained label
    # (top, left, height, width) of the source pixels that ``image`` shows, scaled to its size; None:
    # the whole source image.
    region: tuple[int, int, int, int] | None = None
    finding: Finding | None = field(default=None, compare=False)  # the finding this image explains

    @property
    def source_region(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the source pixels ``image`` shows."""
        return self.region or (0, 0, int(self.source.Rows), int(self.source.Columns))

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """(column, row) pixel positions in ``image`` → the same places in the source's pixels."""
        top, left, height, width = self.source_region
        scale = np.array([width / self.heatmap.shape[1], height / self.heatmap.shape[0]])
        return np.array([left, top]) + (np.asarray(points, np.float64) + 0.5) * scale - 0.5

    @property
    def location(self) -> Location | None:
        """The heatmap's peak and the outline of the hot area around it, on the source image; None
        for a heatmap without any heat."""
        peak = float(self.heatmap.max())
        if not peak > 0.0:
            return None
        row, column = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        hot = outline(self.heatmap >= HOT * peak, around=(int(row), int(column)))
        (source_column, source_row), *border = self.to_source(np.array([[column, row], *hot]))
        return Location(
            self.source, float(source_row), float(source_column), self.label, np.array(border).reshape(-1, 2)
        )


@dataclass(frozen=True)
class Mask:
    """A segmented region of one source image, in that image's pixels: what a DICOM SEG carries."""

    source: Dataset
    pixels: np.ndarray  # (rows, columns) bool, the source's size
    concept: Code
    label: str
    model: ModelIdentity | None = None  # the model that drew it, where not the job's own (a companion)


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
    masks: Sequence[Mask] = ()

    @classmethod
    def not_analysed(cls, task: str, sources: Sequence[Dataset], reason: str) -> Analysis:
        """The answer for images that cannot be analysed: the reason, and no probability at all."""
        return cls(task=task, sources=list(sources), not_analysed_reason=reason)

    @property
    def analysed(self) -> bool:
        return self.not_analysed_reason is None

    @property
    def locations(self) -> list[Location]:
        """Where each explained finding shows most, one per explanation."""
        return [place for e in self.explanations if (place := e.location) is not None]

    def __post_init__(self) -> None:
        if self.not_analysed_reason is not None and (self.findings or self.explanations or self.masks):
            raise ValueError("an image that was not analysed cannot carry findings")
        if self.not_analysed_reason is None and not self.findings:
            raise ValueError("an analysed series must carry at least one finding")

    def record(self) -> dict[str, Any]:
        """What the job table keeps of the answer (JSON): the findings, where they show, the masks."""
        return {
            "analysed": self.analysed,
            "not_analysed_reason": self.not_analysed_reason,
            "findings": [
                {
                    "code": f.concept.value,
                    "scheme": f.concept.scheme_designator,
                    "meaning": f.concept.meaning,
                    "present": f.present,
                    "probability": round(float(f.probability), 4),
                    "threshold": f.threshold,
                    **({"site": f.site.words} if f.site else {}),
                }
                for f in self.findings
            ],
            "locations": [
                {
                    "sop_uid": str(place.source.SOPInstanceUID),
                    "label": place.label,
                    "row": round(place.row, 1),
                    "column": round(place.column, 1),
                }
                for place in self.locations
            ],
            "masks": [
                {
                    "sop_uid": str(mask.source.SOPInstanceUID),
                    "label": mask.label,
                    "pixels": int(mask.pixels.sum()),
                }
                for mask in self.masks
            ],
        }


class TaskOptions(BaseModel):
    """A handler's task parameters: the model manifest's ``[options]`` overlaid with a route's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, options: Mapping[str, Any], handler: str) -> Self:
        """The options checked against the schema; the ValueError names each bad option, so a route's
        author can fix it."""
        try:
            return cls.model_validate(dict(options))
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
    def codes(self) -> Mapping[str, Code]:
        """The coded concept each label stands for, as the package's manifest states it."""
        ...

    @property
    def thresholds(self) -> Mapping[str, float]:
        """Decision thresholds the package's manifest sets, per label (labels without one are absent)."""
        ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → (N, n_labels) probabilities."""
        ...

    def explain(self, batch: np.ndarray, label_index: int | Sequence[int]) -> np.ndarray:
        """(N, C, H, W) float32 → Grad-CAM heatmaps in [0, 1]: (N, H, W) for one label, (N, L, H, W) for
        a sequence of labels, which share one forward pass."""
        ...


class SegmentationModel(Protocol):
    """What a handler needs from a loaded segmentation model (manifest ``task = "segmentation"``)."""

    @property
    def labels(self) -> Sequence[str]: ...

    @property
    def codes(self) -> Mapping[str, Code]: ...

    @property
    def thresholds(self) -> Mapping[str, float]: ...

    @property
    def input_size(self) -> tuple[int, int]: ...

    @property
    def identity(self) -> ModelIdentity:
        """Which model this is: the masks it draws name it."""
        ...

    def segment(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → (N, n_labels, H, W) per-pixel probabilities (softmax over labels)."""
        ...


DEFAULT_THRESHOLD = 0.5  # a label's decision threshold where neither the route nor the manifest sets one


@dataclass(frozen=True)
class Labels:
    """What a handler needs to know of the model's labels it uses."""

    index: dict[str, int]  # where each label sits in the model's outputs
    code: dict[str, Code]  # the concept each reported label stands for, from the manifest
    threshold: dict[str, float]  # each reported label's decision threshold


def model_labels(
    handler: str,
    model: Model | SegmentationModel,
    reported: Sequence[str],
    threshold: float | Mapping[str, float] | None = None,
    read: Sequence[str] = (),
) -> Labels:
    """The ``reported`` labels (findings with codes) and the other labels ``read``, looked up in the
    model. A model lacking one is refused, and so is a manifest that leaves a reported label
    uncoded: a route pointing a handler at the wrong model fails loudly, never with shuffled or
    unnamed findings. A threshold is the route's (``threshold``: one for all labels, or per label),
    else the manifest's, else DEFAULT_THRESHOLD."""
    names = list(model.labels)
    missing = [label for label in (*read, *reported) if label not in names]
    if missing:
        raise ValueError(f"{handler} needs a model with labels {[*read, *reported]}, missing {missing}")
    codes = model.codes
    uncoded = [label for label in reported if label not in codes]
    if uncoded:
        raise ValueError(f"{handler}: the model's manifest gives no code for labels {uncoded}")
    routed: Mapping[str, float | None] = (
        threshold if isinstance(threshold, Mapping) else dict.fromkeys(reported, threshold)
    )
    chosen = {label: routed.get(label) for label in reported}
    return Labels(
        index={label: names.index(label) for label in (*read, *reported)},
        code={label: codes[label] for label in reported},
        threshold={
            label: float(model.thresholds.get(label, DEFAULT_THRESHOLD)) if value is None else float(value)
            for label, value in chosen.items()
        },
    )


Task = Literal["classification", "segmentation"]


class Handler(ABC):
    """One clinical task. Subclasses set ``name`` and implement :meth:`analyse`.

    ``companion_roles`` names the further models a task can use besides its main one, by role, with
    the manifest task each must have (e.g. a segmentation model that outlines what the classifier
    names); a route supplies them in its ``models`` table and the handler finds them, loaded, in
    ``self.companions``."""

    name: ClassVar[str]
    companion_roles: ClassVar[Mapping[str, Task]] = {}

    def __init__(self, companions: Mapping[str, Any] | None = None) -> None:
        self.companions: Mapping[str, Any] = dict(companions or {})

    @abstractmethod
    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        """Analyse one series. ``options`` are the model manifest's task parameters overlaid with
        the route's ``options``; a handler validates them and names a bad one in its error."""
