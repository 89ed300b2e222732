"""Colour fundus photographs: diabetic retinopathy, age-related macular degeneration and branch retinal
vein occlusion, per eye, with Grad-CAM over the photograph that drives each eye's result.

Faithful to the prototype (a ResNet-18 over four classes, both eyes of a patient used together), with
what it lacked as a service: validation that refuses what is not a photograph of the fundus (with a
reason, never a made-up probability), a field-of-view crop and illumination normalisation that make
cameras and exposures comparable, and one preprocessing path (:func:`preprocess`) that the training
script uses too. A batch holding both eyes (a route with ``group = "study"`` hands over both eyes' series)
is analysed per eye: every finding is one eye's, its finding site the eye with its side; the patient's
screen combines them by one rule, a condition is reported for the patient when either eye shows it
(the summary and ``details["patient"]``). Each eye gets its own overlay, and the eye is named in the
summary, the details and, where both eyes are shown, in each explanation's label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field
from pydicom import Dataset
from pydicom.uid import (
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    WideFieldOphthalmicPhotography3DCoordinatesImageStorage,
    WideFieldOphthalmicPhotographyStereographicProjectionImageStorage,
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
from node.dicom.attributes import laterality
from node.dicom.display import rgb8

TASK = "Fundus photograph screening"
NORMAL_LABEL = "normal"
# The model's labels that report a coded condition; "normal" has no finding of its own.
CONDITIONS = ("diabetic_retinopathy", "macular_degeneration", "branch_vein_occlusion")
MODALITIES = ("OP", "XC")  # ophthalmic photography; external-camera (VL Photographic) fundus images
OPHTHALMIC_SOP_CLASSES = {
    OphthalmicPhotography8BitImageStorage,
    OphthalmicPhotography16BitImageStorage,
    WideFieldOphthalmicPhotographyStereographicProjectionImageStorage,
    WideFieldOphthalmicPhotography3DCoordinatesImageStorage,
}
PATIENT_RULE = "The visit's result: a condition either eye shows, at that eye's probability"
EYE = Code("81745001", "SCT", "Eye")  # every finding's site, with the eye's side where it is known
EYES = {"R": "right eye", "L": "left eye", None: "eye of unknown laterality"}
FOV_SEARCH_SIDE = 256  # the field of view is found on a copy this size: it is a large, smooth shape
CORNER = 0.06  # of each side: the corner patches that must be dark around a fundus camera's field
BACKGROUND_SIGMA = 1 / 14  # of the input side: illumination varies more slowly than this; lesions faster
LOG_GAIN = 0.5  # log-contrast → [0, 1] around 0.5
AGGREGATE: dict[str, Callable[[np.ndarray], Any]] = {"mean": np.mean, "max": np.max}  # photographs of one eye


class Options(TaskOptions):
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)  # for every condition, over the manifest
    aggregation: Literal["mean", "max"] = "mean"  # over several photographs of the same eye
    explain: bool = True
    min_brightness: float = Field(default=20.0, ge=0.0, le=255.0)  # median of the field of view, 8-bit


def parse_options(options: Mapping[str, Any]) -> Options:
    return Options.parse(options, "fundus")


class NoFieldOfView(ValueError):
    """The photograph shows no usable fundus; the message says why, for the reader."""


@dataclass(frozen=True)
class FieldOfView:
    """Where the camera's round field lies: its mask, and the square around it that the model sees
    (in source pixels; it may run past the image where the field is clipped at the top and bottom)."""

    mask: np.ndarray  # (H, W) bool
    top: int
    left: int
    side: int
    brightness: float  # median of the brightest channel inside the field, 0–255


def find_field_of_view(rgb: np.ndarray, min_brightness: float = 20.0) -> FieldOfView:
    """The bright round field on a dark surround that every fundus camera produces: Otsu's threshold
    on the brightest channel, the largest region's convex hull (dark lesions and vessels at its edge do
    not bite into it). Raises NoFieldOfView for a dark or blank image, or one without a dark surround."""
    brightest = rgb.max(axis=2)
    height, width = brightest.shape
    scale = FOV_SEARCH_SIDE / max(height, width)
    small = cv2.resize(
        brightest, (max(round(width * scale), 1), max(round(height * scale), 1)), interpolation=cv2.INTER_AREA
    )
    small = cv2.GaussianBlur(small, (5, 5), 0)
    if float(small.max()) < min_brightness:
        raise NoFieldOfView(
            f"image too dark: brightest region {small.max():.0f} of 255, at least {min_brightness:.0f} needed"
        )
    level, foreground = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground)
    if count < 2:
        raise NoFieldOfView("no field of view found: the image has no bright region on a dark surround")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < 0.1 * small.size:
        raise NoFieldOfView("no field of view found: the bright region covers less than a tenth of the image")
    corner = max(1, round(CORNER * min(small.shape)))
    lit_corners = sum(
        float((labels[rows, cols] == largest).mean()) > 0.5
        for rows in (slice(0, corner), slice(-corner, None))
        for cols in (slice(0, corner), slice(-corner, None))
    )
    if lit_corners >= 3:
        raise NoFieldOfView(
            "no field of view found: the image has no dark surround, so it is not a fundus photograph"
        )
    contours, _ = cv2.findContours(
        (labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    hull = cv2.convexHull(max(contours, key=cv2.contourArea)).astype(np.float64) / scale
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.rint(hull).astype(np.int32)], 1)
    inside = mask.astype(bool)
    brightness = float(np.median(brightest[inside]))
    if brightness < min_brightness:
        raise NoFieldOfView(
            f"image too dark: median brightness {brightness:.0f} of 255 in the field of view, "
            f"at least {min_brightness:.0f} needed"
        )
    left, top, w, h = cv2.boundingRect(mask)
    side = max(w, h)
    return FieldOfView(inside, top + (h - side) // 2, left + (w - side) // 2, side, brightness)


def _square(image: np.ndarray, fov: FieldOfView) -> np.ndarray:
    """The field's square from ``image``, zero where it runs past the image's edges."""
    out = np.zeros((fov.side, fov.side, *image.shape[2:]), image.dtype)
    rows = slice(max(fov.top, 0), min(fov.top + fov.side, image.shape[0]))
    cols = slice(max(fov.left, 0), min(fov.left + fov.side, image.shape[1]))
    out[rows.start - fov.top : rows.stop - fov.top, cols.start - fov.left : cols.stop - fov.left] = image[
        rows, cols
    ]
    return out


def preprocess(rgb: np.ndarray, size: tuple[int, int], fov: FieldOfView | None = None) -> np.ndarray:
    """A photograph (H, W, 3) uint8 → the model input (3, h, w) float32 in [0, 1]: the field of view
    cropped to a square and resized, then each channel divided by its local background (a normalised
    Gaussian blur inside the field) on a log scale — exposure, colour cast, vignetting and uneven light
    cancel, lesions keep their contrast and colour. Outside the field is 0.5 (no contrast). Training
    calls this same function, so both see identical inputs."""
    fov = fov if fov is not None else find_field_of_view(rgb)
    height, width = size
    image = (
        cv2.resize(_square(rgb, fov), (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)
        / 255.0
    )
    inside = cv2.resize(
        _square(fov.mask.astype(np.float32), fov), (width, height), interpolation=cv2.INTER_AREA
    )
    inside = cv2.erode((inside > 0.5).astype(np.float32), np.ones((5, 5), np.uint8))  # the field's soft rim
    sigma = BACKGROUND_SIGMA * max(height, width)
    weight = np.maximum(cv2.GaussianBlur(inside, (0, 0), sigma), 1e-3)[..., None]
    background = cv2.GaussianBlur(image * inside[..., None], (0, 0), sigma) / weight
    contrast = np.log((image + 0.02) / (background + 0.02))
    out = np.where(inside[..., None] > 0, np.clip(0.5 + LOG_GAIN * contrast, 0.0, 1.0), 0.5)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def source_heatmap(heatmap: np.ndarray, fov: FieldOfView) -> np.ndarray:
    """A heatmap at model input size → the source photograph's rows and columns, in [0, 1], kept to
    the field of view (outside it there is nothing to explain)."""
    square = cv2.resize(heatmap.astype(np.float32), (fov.side, fov.side), interpolation=cv2.INTER_LINEAR)
    height, width = fov.mask.shape
    out = np.zeros((height, width), np.float32)
    rows = slice(max(fov.top, 0), min(fov.top + fov.side, height))
    cols = slice(max(fov.left, 0), min(fov.left + fov.side, width))
    out[rows, cols] = square[
        rows.start - fov.top : rows.stop - fov.top, cols.start - fov.left : cols.stop - fov.left
    ]
    out *= fov.mask
    peak = float(out.max())
    return np.clip(out / peak if peak > 0 else out, 0.0, 1.0).astype(np.float32)


def refusal(ds: Dataset) -> str | None:
    """Why this instance is not a colour photograph of the eye, or None when it is one."""
    modality = str(ds.get("Modality", "")) or "none"
    if modality not in MODALITIES:
        return f"not an eye photograph (Modality {modality})"
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part != "EYE" and str(ds.get("SOPClassUID", "")) not in OPHTHALMIC_SOP_CLASSES:
        return (
            f"not a photograph of the eye (Body Part Examined {body_part or 'empty'}, "
            "not an ophthalmic SOP class)"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 3:
        interpretation = ds.get("PhotometricInterpretation", "none")
        return f"not a colour photograph (Photometric Interpretation {interpretation})"
    if int(ds.get("NumberOfFrames") or 1) > 1:
        return "multi-frame images are not supported; expected one photograph per instance"
    if "PixelData" not in ds:
        return "no pixel data"
    return None


@dataclass
class _Photo:
    source: Dataset
    rgb: np.ndarray
    fov: FieldOfView
    eye: str | None


def _read(datasets: Sequence[Dataset], min_brightness: float) -> tuple[list[_Photo], dict[str, str]]:
    """The usable photographs, and why each other instance was set aside (by SOP Instance UID)."""
    photos, set_aside = [], {}
    for ds in datasets:
        reason = refusal(ds)
        if reason is None:
            try:
                rgb = rgb8(ds)
            except Exception as exc:  # an undecodable transfer syntax or corrupt pixel data: say so
                reason = f"pixel data could not be read: {exc}"
            else:
                try:
                    photos.append(_Photo(ds, rgb, find_field_of_view(rgb, min_brightness), laterality(ds)))
                except NoFieldOfView as exc:
                    reason = str(exc)
        if reason is not None:
            set_aside[str(ds.get("SOPInstanceUID", "?"))] = reason
    return photos, set_aside


def _eye_sentence(
    eye: str, probabilities: Mapping[str, float], cutoffs: Mapping[str, float], codes: Mapping[str, Code]
) -> str:
    present = [label for label in CONDITIONS if probabilities[label] >= cutoffs[label]]
    if present:
        calls = " and ".join(
            f"{codes[label].meaning.lower()} (p={probabilities[label]:.2f}, threshold {cutoffs[label]:.2f})"
            for label in present
        )
        return f"{eye}: {calls} suspected"
    top = max(CONDITIONS, key=lambda label: probabilities[label])
    highest = f"{codes[top].meaning.lower()}, p={probabilities[top]:.2f}"
    return f"{eye}: no condition detected (highest {highest})"


class FundusHandler(Handler):
    name: ClassVar[str] = "fundus"

    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        opts = parse_options(options)
        labels = model_labels(self.name, model, CONDITIONS, opts.threshold, read=[NORMAL_LABEL])
        columns, codes, cutoffs = labels.index, labels.code, labels.threshold

        photos, set_aside = _read(datasets, opts.min_brightness)
        if not photos:
            reasons = sorted(set(set_aside.values()))
            return Analysis.not_analysed(TASK, datasets, "; ".join(reasons) if reasons else "no images")
        batch = np.stack([preprocess(photo.rgb, model.input_size, photo.fov) for photo in photos])
        probabilities = model.predict(batch)

        eyes = [eye for eye in EYES if any(photo.eye == eye for photo in photos)]  # right, left, unknown
        members = {eye: [i for i, photo in enumerate(photos) if photo.eye == eye] for eye in eyes}
        per_eye = {
            eye: {
                label: float(AGGREGATE[opts.aggregation](probabilities[indices, columns[label]]))
                for label in CONDITIONS
            }
            for eye, indices in members.items()
        }
        # The findings are per eye (finding site: the eye, with its side). The patient's screen
        # combines them: a condition is reported for the patient when either eye shows it.
        best = {  # per eye and condition: the photograph showing it most
            (eye, label): max(members[eye], key=lambda i: float(probabilities[i, columns[label]]))
            for eye in eyes
            for label in CONDITIONS
        }
        findings = {
            (eye, label): Finding(
                codes[label],
                per_eye[eye][label] >= cutoffs[label],
                per_eye[eye][label],
                float(cutoffs[label]),
                Site.on(EYE, eye),
                photos[best[eye, label]].source,
            )
            for eye in eyes
            for label in CONDITIONS
        }
        # With both eyes, the visit's result comes first: per condition, the eye that shows it more.
        visit = [
            replace(
                findings[max(eyes, key=lambda eye: per_eye[eye][label]), label],
                site=Site.on(EYE, "B"),
                note=PATIENT_RULE,
            )
            for label in CONDITIONS
            if len(eyes) > 1
        ]

        explanations: list[Explanation] = []
        if opts.explain:
            for eye in eyes:  # each eye's most likely condition, on the photograph that shows it most
                label = max(CONDITIONS, key=lambda name: per_eye[eye][name])
                index = best[eye, label]
                photo, probability = photos[index], float(probabilities[index, columns[label]])
                heatmap = model.explain(batch[index : index + 1], columns[label])[0]
                meaning = codes[label].meaning
                explanations.append(
                    Explanation(
                        source=photo.source,
                        image=photo.rgb,
                        # Grad-CAM is scaled to its own peak; weighting it by the probability keeps an
                        # unlikely condition's overlay faint instead of showing a confident hot spot.
                        heatmap=source_heatmap(heatmap, photo.fov) * np.float32(probability),
                        probability=probability,
                        # With both eyes the label names the eye, so an overlay never reads as the
                        # other eye's verdict.
                        label=meaning if len(eyes) == 1 else f"{meaning}, {EYES[eye]}",
                        finding=findings[eye, label],
                    )
                )

        summary = "; ".join(_eye_sentence(EYES[eye], per_eye[eye], cutoffs, codes) for eye in eyes)
        return Analysis(
            task=TASK,
            sources=[photo.source for photo in photos],
            findings=[*visit, *findings.values()],
            explanations=explanations,
            summary=summary[0].upper() + summary[1:] + ".",
            details={
                "eyes": {
                    EYES[eye]: {
                        "images": len(members[eye]),
                        "probabilities": {label: round(p, 4) for label, p in per_eye[eye].items()},
                        "present": [label for label in CONDITIONS if per_eye[eye][label] >= cutoffs[label]],
                    }
                    for eye in eyes
                },
                "image_probabilities": {
                    str(photo.source.SOPInstanceUID): dict(
                        zip(model.labels, np.round(probabilities[i].astype(float), 4).tolist(), strict=True)
                    )
                    for i, photo in enumerate(photos)
                },
                "patient": {  # either eye
                    label: any(per_eye[eye][label] >= cutoffs[label] for eye in eyes) for label in CONDITIONS
                },
                "images_set_aside": set_aside,
                "aggregation": opts.aggregation,
            },
        )
