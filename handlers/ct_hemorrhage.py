"""Head-CT hemorrhage: per-slice probabilities of intracranial hemorrhage, a study-level finding, and
Grad-CAM over the slices that drive it.

Faithful to the prototype: CT window levelling into three channels, validation that rejects what is not
a head CT (with a reason, never a made-up probability), a confidence-based sentence, and one
preprocessing path (:func:`preprocess`) that the training script uses too — the prototype's lesson.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.pixels import pixel_array
from pydicom.tag import Tag

from handlers.base import (
    SIDES,
    Analysis,
    Code,
    Explanation,
    Finding,
    Handler,
    Model,
    Site,
    TaskOptions,
    model_labels,
)
from node.runtime.model import batch as batch_images

TASK = "Head CT hemorrhage detection"
HEMORRHAGE_LABEL = "hemorrhage"  # the model output this handler reads
# (centre, width) in HU: brain, subdural, bone — the prototype's window levelling, one per channel.
DEFAULT_WINDOWS = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
BONE_HU = 300.0
BRAIN_HU = (0.0, 90.0)
HEAD_LIKE_FRACTION = 0.5  # of the usable slices that must show brain inside a skull
BRAIN = Code("12738006", "SCT", "Brain")  # the finding site, with a side and a part where the peak names one
ANTERIOR, POSTERIOR = Code("255549009", "SCT", "Anterior"), Code("255551008", "SCT", "Posterior")
LEFT, RIGHT = SIDES["L"], SIDES["R"]
REGION_MARGIN = 0.15  # of the head's half-width: closer to the centre than this is not called a side
PIXEL_DATA = Tag(0x7FE0, 0x0010)


class Options(TaskOptions):
    windows: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = DEFAULT_WINDOWS
    aggregation: Literal["max", "top_k_mean"] = "max"
    top_k: int = Field(default=3, ge=1)
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    explain_slices: int = Field(default=3, ge=0, le=20)
    min_slices: int = Field(default=5, ge=1)

    @field_validator("windows")
    @classmethod
    def _positive_widths(cls, windows: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if any(width <= 0 for _, width in windows):
            raise ValueError("every window width must be positive")
        return windows


def parse_options(options: Mapping[str, Any]) -> Options:
    return Options.parse(options, "ct_hemorrhage")


def window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map a CT window to [0, 1], like a viewer's window levelling."""
    return np.clip((hu - (centre - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def preprocess(
    hu: np.ndarray, size: tuple[int, int], windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS
) -> np.ndarray:
    """One slice in HU → the model input (channels, H, W) float32 in [0, 1]: one channel per window,
    resized with area averaging. Training calls this same function, so both see identical inputs."""
    height, width = size
    channels = [
        cv2.resize(window(hu, centre, w), (width, height), interpolation=cv2.INTER_AREA)
        for centre, w in windows
    ]
    return np.stack(channels).astype(np.float32)


def stored_pixels(ds: Dataset) -> np.ndarray:
    """The slice's stored values, decoded without keeping them: from its file while the Dataset has left
    the pixel data there (read with ``defer_size``), else from the Dataset without pydicom's cache —
    a series' worth of pixel data held by its Datasets would grow with the series."""
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None and isinstance(ds.filename, str):
        return pixel_array(ds.filename)
    return pixel_array(ds)


def hounsfield(ds: Dataset) -> np.ndarray:
    """Stored pixel values → HU via the Modality LUT's rescale."""
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return stored_pixels(ds).astype(np.float32) * slope + intercept


def slice_position(ds: Dataset) -> float | None:
    """Position along the slice normal (mm), or None without Image Plane geometry."""
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return float(np.dot(normal, np.asarray(position, float)))


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Slices in anatomical order: by position along the normal, or by InstanceNumber when any slice
    lacks geometry. File or arrival order means nothing."""
    positions = [slice_position(ds) for ds in datasets]
    if all(p is not None for p in positions):
        order = sorted(
            range(len(datasets)), key=lambda i: (positions[i], int(datasets[i].get("InstanceNumber") or 0))
        )
    else:
        order = sorted(range(len(datasets)), key=lambda i: int(datasets[i].get("InstanceNumber") or 0))
    return [datasets[i] for i in order]


def is_localizer(ds: Dataset) -> bool:
    image_type = [str(value).upper() for value in ds.get("ImageType", [])]
    return "LOCALIZER" in image_type


def intracranial(hu: np.ndarray) -> np.ndarray | None:
    """The inside of the skull: what the largest closed ring of bone encloses, bone excluded; None
    where no bone ring is found."""
    bone = (hu > BONE_HU).astype(np.uint8)
    if bone.mean() < 0.002:
        return None
    side = max(3, min(hu.shape) // 100)
    closed = cv2.morphologyEx(bone, cv2.MORPH_CLOSE, np.ones((side, side), np.uint8))
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    interior = np.zeros_like(bone)
    cv2.drawContours(interior, [max(contours, key=cv2.contourArea)], -1, 1, thickness=cv2.FILLED)
    return interior.astype(bool) & (hu <= BONE_HU)


def looks_like_head(hu: np.ndarray) -> bool:
    """A head CT slice shows brain-density tissue inside a ring of bone; a blank image, a phantom of
    something else or a body CT does not."""
    inside = intracranial(hu)
    if inside is None or inside.sum() < 0.03 * hu.size:
        return False
    brain = (hu >= BRAIN_HU[0]) & (hu <= BRAIN_HU[1])
    return float(brain[inside].mean()) >= 0.6


def source_heatmap(heatmap: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """A heatmap at model input size → the source slice's rows and columns, in [0, 1] and kept to the
    inside of the skull: intracranial blood can only be there, while a Grad-CAM cell near the skull
    also sees the scalp and the air beyond it."""
    resized = cv2.resize(heatmap, (hu.shape[1], hu.shape[0]), interpolation=cv2.INTER_LINEAR)
    inside = intracranial(hu)
    if inside is not None and inside.any():
        resized = resized * inside
    peak = float(resized.max())
    return np.clip(resized / peak if peak > 0 else resized, 0.0, 1.0).astype(np.float32)


def aggregate(probabilities: np.ndarray, options: Options) -> float:
    """Study-level probability from the per-slice ones."""
    if options.aggregation == "max":
        return float(probabilities.max())
    k = min(options.top_k, len(probabilities))
    return float(np.sort(probabilities)[-k:].mean())


def _image_numbers(slices: Sequence[Dataset], indices: Sequence[int]) -> str:
    """Slice numbers as a reader looks them up: "slices 14–16" for a run, "slices 3, 14" otherwise;
    InstanceNumber as the viewer shows it, or the position in the sorted series when a slice has none."""
    numbers = sorted(int(slices[i].get("InstanceNumber") or i + 1) for i in indices)
    if len(numbers) == 1:
        return f"slice {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"slices {numbers[0]}–{numbers[-1]}"
    return "slices " + ", ".join(map(str, numbers))


def site(ds: Dataset, hu: np.ndarray, heatmap: np.ndarray) -> Site:
    """Where in the brain the heatmap peak lies — the prototype's estimate of the region: its side and
    whether anterior or posterior, from the image orientation, relative to the centre of the head on
    that slice; near the centre, or for a heatmap without heat, neither is named."""
    rows, cols = np.nonzero(hu > -300.0)
    if not float(heatmap.max()) > 0.0 or not len(rows):
        return Site(BRAIN)
    peak_row, peak_col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    half_width = max(float(np.ptp(rows)), float(np.ptp(cols)), 1.0) / 2.0
    orientation = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    # Patient coordinates are LPS: +x towards the patient's left, +y towards the back.
    offset = (
        orientation[:3] * (peak_col - cols.mean()) + orientation[3:] * (peak_row - rows.mean())
    ) / half_width
    side = None if abs(offset[0]) <= REGION_MARGIN else LEFT if offset[0] > 0 else RIGHT
    part = None if abs(offset[1]) <= REGION_MARGIN else POSTERIOR if offset[1] > 0 else ANTERIOR
    return Site(BRAIN, side, part)


class CTHemorrhageHandler(Handler):
    name: ClassVar[str] = "ct_hemorrhage"

    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        opts = parse_options(options)
        labels = model_labels(self.name, model, [HEMORRHAGE_LABEL], opts.threshold)
        label_index = labels.index[HEMORRHAGE_LABEL]
        hemorrhage, threshold = labels.code[HEMORRHAGE_LABEL], labels.threshold[HEMORRHAGE_LABEL]

        modalities = sorted({str(ds.get("Modality", "")) or "none" for ds in datasets})
        if modalities != ["CT"]:
            return Analysis.not_analysed(
                TASK, datasets, f"not a CT series (Modality {', '.join(modalities)})"
            )
        usable = [ds for ds in datasets if not is_localizer(ds) and "PixelData" in ds]
        dropped = len(datasets) - len(usable)
        if len(usable) < opts.min_slices:
            return Analysis.not_analysed(
                TASK,
                datasets,
                f"too few axial images: {len(usable)} usable ({dropped} localizer or empty images dropped), "
                f"at least {opts.min_slices} needed",
            )
        slices = sort_slices(usable)
        # A model's batch at a time, keeping only each slice's probability: the inputs of a 600-slice
        # series would hold 360 MB, its pixels 300 MB. The few slices explained are converted again below.
        passes, head_like, size = [], 0, batch_images()
        for start in range(0, len(slices), size):
            inputs = []
            for ds in slices[start : start + size]:
                try:
                    hu = hounsfield(ds)
                except Exception as exc:  # an undecodable transfer syntax or corrupt pixel data: say so
                    return Analysis.not_analysed(TASK, datasets, f"pixel data could not be read: {exc}")
                if hu.ndim != 2:
                    return Analysis.not_analysed(
                        TASK,
                        datasets,
                        "multi-frame or colour images are not supported; expected axial slices",
                    )
                head_like += looks_like_head(hu)
                inputs.append(preprocess(hu, model.input_size, opts.windows))
            passes.append(model.predict(np.stack(inputs))[:, label_index])
        if head_like < max(1, math.ceil(HEAD_LIKE_FRACTION * len(slices))):
            return Analysis.not_analysed(
                TASK,
                datasets,
                f"does not look like a head CT: {head_like} of {len(slices)} images show brain-density "
                "tissue inside a skull",
            )

        probabilities = np.concatenate(passes)
        probability = aggregate(probabilities, opts)
        present = probability >= threshold
        ranked = [int(i) for i in np.argsort(-probabilities, kind="stable")]

        # A positive result shows the slices that drive it; a negative one the slice the model found
        # most suspicious, so the reader sees what it looked at. Every result is explained.
        count = opts.explain_slices if present else min(1, opts.explain_slices)
        chosen = ranked[:count]
        volume = {index: hounsfield(slices[index]) for index in chosen}  # the slices shown
        shown = [preprocess(volume[index], model.input_size, opts.windows) for index in chosen]
        heatmaps = [
            source_heatmap(heatmap, volume[index]) * np.float32(probabilities[index])
            for index, heatmap in zip(
                chosen, model.explain(np.stack(shown), label_index) if chosen else [], strict=True
            )
        ]
        # Where: the prototype's estimate, from the strongest slice's heatmap, for a positive result.
        where = site(slices[ranked[0]], volume[ranked[0]], heatmaps[0]) if present and heatmaps else None
        finding = Finding(hemorrhage, bool(present), probability, float(threshold), where, slices[ranked[0]])
        explanations = [
            Explanation(
                source=slices[index],
                image=np.repeat(
                    (window(volume[index], *opts.windows[0]) * 255.0).round().astype(np.uint8)[:, :, None],
                    3,
                    axis=2,
                ),
                # Grad-CAM is scaled to its own peak; weighting it by the slice's probability keeps a
                # negative slice's overlay faint instead of showing a confident hot spot.
                heatmap=heatmap,
                probability=float(probabilities[index]),
                label=hemorrhage.meaning,
                finding=finding,
            )
            for index, heatmap in zip(chosen, heatmaps, strict=True)
        ]

        figures = f"p={probability:.2f}, threshold {threshold:.2f}"
        if present:
            strongest = _image_numbers(slices, ranked[: max(1, opts.explain_slices)])
            if where is not None:
                strongest += f", {where.words.lower() if where.laterality or where.modifier else 'central'}"
            summary = f"Intracranial hemorrhage suspected ({figures}); strongest on {strongest}."
        else:
            summary = f"No intracranial hemorrhage detected ({figures})."
        return Analysis(
            task=TASK,
            sources=slices,
            findings=[finding],
            explanations=explanations,
            summary=summary,
            details={
                "slice_probabilities": {
                    str(ds.SOPInstanceUID): round(float(p), 4)
                    for ds, p in zip(slices, probabilities, strict=True)
                },
                "aggregation": opts.aggregation if opts.aggregation == "max" else f"top_{opts.top_k}_mean",
                "images_dropped": dropped,
            },
        )
