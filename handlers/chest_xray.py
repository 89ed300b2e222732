"""Pediatric chest X-ray: per-finding probabilities for six findings, "normal" in the summary, and
Grad-CAM over the image for each finding called (or the most likely one when none is).

Faithful to the prototype (CheXNet: a DenseNet121-family network, 7-class softmax over normal and six
findings, CLAHE before the network), made a DICOM service: it reads CR and DX images as a PACS sends
them (MONOCHROME1 or 2, rescale and VOI LUT applied), keeps to frontal chest views, and answers "not
analysed" with a reason instead of a probability for anything else. :func:`preprocess` is the one path
from display pixels to model input, shared with the training script.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import cv2
import numpy as np
from pydantic import Field, field_validator
from pydicom import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from handlers.base import (
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
from node.dicom.attributes import patient_orientation
from node.dicom.display import display_pixels

TASK = "Pediatric chest X-ray findings"
NORMAL_LABEL = "normal"
# The model's outputs besides "normal": one coded finding each (the codes are the manifest's).
FINDINGS = ("pneumonia", "pleural_effusion", "pneumothorax", "cardiomegaly", "atelectasis", "nodule")
LUNG, HEART = Code("39607008", "SCT", "Lung"), Code("80891009", "SCT", "Heart")  # finding sites
UNILATERAL = ("pneumonia", "pleural_effusion", "pneumothorax", "atelectasis", "nodule")
RADIOGRAPHY = ("CR", "DX")
SOP_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation)
DISPLAY_MAX = 1024  # longest side of the image shown in an explanation
SIDE_MARGIN = 0.08  # of the width: a heatmap peak closer to the middle than this is not called a side
LUNG_AREA = 0.04  # of the image: the smallest enclosed dark region taken for a lung field
LUNG_CONTRAST = 0.2  # of the display range: aerated lung against the tissue around it


class Options(TaskOptions):
    clahe_clip_limit: float = Field(default=2.0, gt=0.0)
    clahe_tiles: int = Field(default=8, ge=1, le=64)
    thresholds: dict[str, float] = Field(default_factory=dict)  # per finding, overriding the manifest's
    views: tuple[str, ...] = Field(default=("PA", "AP"), min_length=1)  # ViewPosition values analysed
    max_explanations: int = Field(default=3, ge=0, le=len(FINDINGS))

    @field_validator("thresholds")
    @classmethod
    def _known_findings(cls, thresholds: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(thresholds) - set(FINDINGS))
        if unknown:
            raise ValueError(f"unknown findings {unknown}; expected some of {list(FINDINGS)}")
        if any(not 0.0 < value < 1.0 for value in thresholds.values()):
            raise ValueError("every threshold must lie strictly between 0 and 1")
        return thresholds


def parse_options(options: Mapping[str, Any]) -> Options:
    return Options.parse(options, "chest_xray")


def clahe(image: np.ndarray, clip_limit: float, tiles: int) -> np.ndarray:
    """(H, W) in [0, 1] → contrast-limited adaptive histogram equalisation, as uint8."""
    eight_bit = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(eight_bit)


def preprocess(
    image: np.ndarray, size: tuple[int, int], clip_limit: float = 2.0, tiles: int = 8
) -> np.ndarray:
    """A radiograph as displayed, (H, W) in [0, 1] with bone white, → the model input (1, H, W) float32
    in [0, 1]: area-averaged to the model's size, then CLAHE as the prototype did. Equalising at the
    model's size keeps each tile the same part of the chest whatever the detector's matrix. Training
    calls this same function."""
    height, width = size
    small = cv2.resize(image.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
    return (clahe(small, clip_limit, tiles).astype(np.float32) / 255.0)[None]


def looks_like_chest(image: np.ndarray) -> bool:
    """A frontal chest film shows at least one lung field: a large dark region enclosed by the brighter
    chest wall, mediastinum and diaphragm (the other lung may be white-out). A blank image, a limb or
    noise has no such enclosed region."""
    small = np.rint(cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA) * 255.0).astype(np.uint8)
    _, dark = cv2.threshold(small, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    if (
        not dark.any()
        or dark.all()
        or small[dark == 0].mean() - small[dark == 1].mean() < LUNG_CONTRAST * 255
    ):
        return False
    count, components, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=4)
    border = set(components[0]) | set(components[-1]) | set(components[:, 0]) | set(components[:, -1])
    return any(
        stats[label, cv2.CC_STAT_AREA] >= LUNG_AREA * small.size
        for label in range(1, count)
        if label not in border
    )


def source_heatmap(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A heatmap at model input size → ``shape`` (rows, columns), in [0, 1] with its peak at 1."""
    resized = cv2.resize(heatmap, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    peak = float(resized.max())
    return np.clip(resized / peak if peak > 0 else resized, 0.0, 1.0).astype(np.float32)


def side(ds: Dataset, heatmap: np.ndarray) -> str | None:
    """The patient's side of the heatmap peak, "R" or "L", from the direction the columns run in
    (Patient Orientation, else Image Orientation); None near the middle, for a heatmap without heat,
    or where the image does not say which way it hangs."""
    orientation = patient_orientation(ds)
    if orientation is None or orientation[0] not in ("L", "R") or not float(heatmap.max()) > 0.0:
        return None
    column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)[1]
    offset = column / max(heatmap.shape[1] - 1, 1) - 0.5
    if abs(offset) < SIDE_MARGIN:
        return None
    towards = orientation[0]  # the side the columns run towards
    return towards if offset > 0 else {"L": "R", "R": "L"}[towards]


def _site(name: str, side: str | None) -> Site:
    """A lung finding's site is its lung (with the side where its heatmap names one); the heart's is
    the heart."""
    return Site.on(LUNG, side) if name in UNILATERAL else Site(HEART)


def _side_words(site: Site | None) -> str:
    """ ", right lung" where the site names a side, else nothing."""
    return f", {site.words.lower()}" if site is not None and site.laterality is not None else ""


def _refusal(ds: Dataset, options: Options) -> str | None:
    """Why this image is not a frontal chest radiograph the model can read, or None when it is."""
    modality = str(ds.get("Modality", "")) or "none"
    if modality not in RADIOGRAPHY:
        return f"not a radiograph (Modality {modality}; CR or DX expected)"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == DigitalXRayImageStorageForProcessing:
        return "a DX image 'for processing' (raw detector data); send the 'for presentation' image"
    if sop_class not in SOP_CLASSES:
        return f"SOP class {sop_class} is not CR or DX for presentation"
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part and body_part != "CHEST":
        return f"body part {body_part}, not CHEST"
    view = str(ds.get("ViewPosition", "")).upper()
    if view and view not in options.views:
        return f"view {view}; frontal views ({', '.join(options.views)}) only"
    if "PixelData" not in ds:
        return "no pixel data"
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return "colour or multi-frame image; a single greyscale radiograph expected"
    return None


class ChestXRayHandler(Handler):
    name: ClassVar[str] = "chest_xray"

    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        opts = parse_options(options)
        labels = model_labels(self.name, model, FINDINGS, opts.thresholds, read=[NORMAL_LABEL])
        columns, codes, cutoffs = labels.index, labels.code, labels.threshold

        refusals = [_refusal(ds, opts) for ds in datasets]
        usable = [ds for ds, reason in zip(datasets, refusals, strict=True) if reason is None]
        if not usable:
            return Analysis.not_analysed(
                TASK, datasets, "; ".join(sorted({r for r in refusals if r})) or "no images"
            )
        try:
            images = [display_pixels(ds) for ds in usable]
        except Exception as exc:  # an undecodable transfer syntax or corrupt pixel data: say so, do not guess
            return Analysis.not_analysed(TASK, datasets, f"pixel data could not be read: {exc}")
        if any(image.ndim != 2 for image in images):
            return Analysis.not_analysed(
                TASK, datasets, "a single greyscale radiograph per instance expected"
            )
        chest_like = [looks_like_chest(image) for image in images]
        if not any(chest_like):
            return Analysis.not_analysed(
                TASK,
                datasets,
                "does not look like a frontal chest radiograph: no lung fields darker than the mediastinum",
            )
        usable = [ds for ds, ok in zip(usable, chest_like, strict=True) if ok]
        images = [image for image, ok in zip(images, chest_like, strict=True) if ok]

        batch = np.stack(
            [preprocess(image, model.input_size, opts.clahe_clip_limit, opts.clahe_tiles) for image in images]
        )
        probabilities = model.predict(batch)  # (images, labels): a study holds one or a few frontal films
        # Per finding, the study's probability is that of the image showing it most.
        study = {name: float(probabilities[:, columns[name]].max()) for name in FINDINGS}
        called = sorted((name for name in FINDINGS if study[name] >= cutoffs[name]), key=lambda n: -study[n])
        # Every result is explained: the findings called, or else the most likely one, faintly.
        explained = (
            called[: opts.max_explanations] or [max(study, key=study.__getitem__)][: opts.max_explanations]
        )
        shown: dict[str, Explanation] = {}
        sides: dict[str, str | None] = {}
        best = {name: int(probabilities[:, columns[name]].argmax()) for name in FINDINGS}  # its image
        heatmaps: dict[str, np.ndarray] = {}
        for image in sorted({best[name] for name in explained}):  # one forward pass per image explained
            names = [name for name in explained if best[name] == image]
            maps = model.explain(batch[image][None], [columns[name] for name in names])[0]
            heatmaps |= zip(names, maps, strict=True)
        for name in explained:
            image = best[name]
            probability = float(probabilities[image, columns[name]])
            explanation = _explain(
                heatmaps[name],
                usable[image],
                images[image],
                probability,
                codes[name].meaning,
                opts,
            )
            sides[name] = side(usable[image], explanation.heatmap)
            if name not in called:  # scaled by the probability, so an unconvincing overlay stays faint
                explanation = replace(explanation, heatmap=explanation.heatmap * np.float32(study[name]))
            shown[name] = explanation
        findings = {
            name: Finding(
                code,
                study[name] >= cutoffs[name],
                study[name],
                float(cutoffs[name]),
                _site(name, sides.get(name) if name in called else None),
                usable[best[name]],
            )
            for name, code in codes.items()
        }
        explanations = [replace(explanation, finding=findings[name]) for name, explanation in shown.items()]

        normal = float(probabilities[:, columns[NORMAL_LABEL]].min())
        if called:
            parts = [
                f"{codes[name].meaning.lower()}{_side_words(findings[name].site)} (p={study[name]:.2f})"
                for name in called
            ]
            summary = f"Suspected {_join(parts)}; normal p={normal:.2f}."
        else:
            top = max(study, key=study.__getitem__)
            summary = (
                f"No finding above threshold (normal p={normal:.2f}; most likely "
                f"{codes[top].meaning.lower()}, p={study[top]:.2f})."
            )
        return Analysis(
            task=TASK,
            sources=list(datasets),
            findings=list(findings.values()),
            explanations=explanations,
            summary=summary,
            details={
                "image_probabilities": {
                    str(ds.SOPInstanceUID): {
                        label: round(float(p), 4) for label, p in zip(model.labels, row, strict=True)
                    }
                    for ds, row in zip(usable, probabilities, strict=True)
                },
                "images_dropped": len(datasets) - len(usable),
                "reasons_dropped": sorted({r for r in refusals if r}),
            },
        )


def _explain(
    cam: np.ndarray,
    source: Dataset,
    image: np.ndarray,
    probability: float,
    label: str,
    opts: Options,
) -> Explanation:
    """Grad-CAM ``cam`` (at the model's input size) over the image as shown (CLAHE, at most DISPLAY_MAX
    pixels a side)."""
    scale = min(1.0, DISPLAY_MAX / max(image.shape))
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    shown = cv2.resize(image, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else image
    heatmap = source_heatmap(cam, shown.shape)
    return Explanation(
        source=source,
        image=np.repeat(clahe(shown, opts.clahe_clip_limit, opts.clahe_tiles)[:, :, None], 3, axis=2),
        heatmap=heatmap,
        probability=probability,
        label=label,
    )


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
