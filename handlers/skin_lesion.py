"""Skin lesions on dermoscopy photographs: the seven HAM10000 classes, the most likely one named, and
Grad-CAM over the lesion that drives it.

Faithful to the prototype: a centre crop of the photograph (300 of 450 rows) resized to the model's
input, one preprocessing path (:func:`preprocess`) that the training script uses too, and a probability
for every class. Images that are not colour photographs of skin are refused with a reason, never given
a made-up probability.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import cv2
import numpy as np
from pydantic import Field
from pydicom import Dataset

from handlers.base import (
    Analysis,
    Code,
    Explanation,
    Finding,
    Handler,
    Mask,
    Model,
    SegmentationModel,
    Site,
    Task,
    TaskOptions,
    model_labels,
)
from node.dicom.attributes import laterality
from node.dicom.display import rgb8

TASK = "Dermoscopy skin lesion classification"
# The seven HAM10000 classes, as the model's labels; each is reported as a coded finding.
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
LESION_LABEL = "lesion"  # the segmentation companion's label for the lesion's pixels
DEFAULT_CROP = 2.0 / 3.0
# External-camera photography and dermoscopy: the modalities a skin photograph is stored under.
PHOTOGRAPHIC_MODALITIES = ("XC", "DMS")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
SKIN_BRIGHTNESS = 0.2  # mean of the centre crop in [0, 1]: darker is a lens cap or a failed exposure


class Options(TaskOptions):
    crop_fraction: float = Field(default=DEFAULT_CROP, gt=0.2, le=1.0)
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    min_side: int = Field(default=64, ge=16)


def parse_options(options: Mapping[str, Any]) -> Options:
    return Options.parse(options, "skin_lesion")


def crop_box(shape: tuple[int, ...], fraction: float = DEFAULT_CROP) -> tuple[int, int, int, int]:
    """(top, left, side, side): the centred square whose side is ``fraction`` of the shorter side,
    where a dermoscopy photograph puts its lesion (the prototype cropped 300×300 from 450×600)."""
    side = max(1, round(min(shape[:2]) * fraction))
    return (shape[0] - side) // 2, (shape[1] - side) // 2, side, side


def centre_crop(image: np.ndarray, fraction: float = DEFAULT_CROP) -> np.ndarray:
    """``image`` inside :func:`crop_box`."""
    top, left, side, _ = crop_box(image.shape, fraction)
    return image[top : top + side, left : left + side]


def preprocess(rgb: np.ndarray, size: tuple[int, int], crop_fraction: float = DEFAULT_CROP) -> np.ndarray:
    """An (H, W, 3) uint8 photograph → the model input (3, H, W) float32 in [0, 1]: centre crop, then
    area-averaged resize. Training calls this same function, so both see identical inputs."""
    crop = centre_crop(rgb, crop_fraction)
    resized = cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return (resized.astype(np.float32) / 255.0).transpose(2, 0, 1).copy()


def refusal(ds: Dataset, min_side: int) -> str | None:
    """Why this instance is not a colour photograph the model can read, or None if it is."""
    modality = str(ds.get("Modality", "")) or "none"
    if modality not in PHOTOGRAPHIC_MODALITIES:
        return f"not a skin photograph (Modality {modality}; expected {' or '.join(PHOTOGRAPHIC_MODALITIES)})"
    if "PixelData" not in ds:
        return "no pixel data"
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if int(ds.get("SamplesPerPixel", 1)) != 3 or photometric not in COLOUR:
        return f"not a colour image (Photometric Interpretation {photometric or 'none'})"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame images are not supported; expected one photograph per instance"
    if min(int(ds.Rows), int(ds.Columns)) < min_side:
        return f"image too small ({ds.Rows}×{ds.Columns}; at least {min_side} pixels a side)"
    return None


def looks_like_skin(crop: np.ndarray) -> bool:
    """Skin reflects more red than blue and is not dark: a blank frame, a grey test card or an
    image of something else is refused rather than classified."""
    mean = crop.reshape(-1, 3).mean(axis=0) / 255.0
    return bool(mean.mean() >= SKIN_BRIGHTNESS and mean[0] > mean[2] + 0.03 and crop.std() > 2.0)


def body_site(ds: Dataset) -> Site | None:
    """Where on the body the lesion is, as the photograph's Anatomic Region Sequence codes it (with
    the side its laterality names); None when the photograph does not say."""
    regions = ds.get("AnatomicRegionSequence") or []
    if not regions or not all(
        k in regions[0] for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
    ):
        return None
    item = regions[0]
    return Site.on(
        Code(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)), laterality(ds)
    )


class SkinLesionHandler(Handler):
    """With a ``segmentation`` companion model, the lesion is also outlined: a mask on each photograph."""

    name: ClassVar[str] = "skin_lesion"
    companion_roles: ClassVar[Mapping[str, Task]] = {"segmentation": "segmentation"}

    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        opts = parse_options(options)
        labels = model_labels(self.name, model, CLASSES, opts.threshold)
        indices, codes, cutoffs = [labels.index[c] for c in CLASSES], labels.code, labels.threshold
        if not datasets:
            return Analysis.not_analysed(TASK, datasets, "no images")
        for ds in datasets:
            reason = refusal(ds, opts.min_side)
            if reason is not None:
                return Analysis.not_analysed(TASK, datasets, reason)
        try:
            photos = [rgb8(ds) for ds in datasets]
        except Exception as exc:  # an undecodable transfer syntax or corrupt pixel data: say so, do not guess
            return Analysis.not_analysed(TASK, datasets, f"pixel data could not be read: {exc}")
        if any(photo.ndim != 3 or photo.shape[2] != 3 for photo in photos):
            return Analysis.not_analysed(TASK, datasets, "pixel data is not three-channel colour")
        boxes = [crop_box(photo.shape, opts.crop_fraction) for photo in photos]
        crops = [centre_crop(photo, opts.crop_fraction) for photo in photos]
        unlike = sum(not looks_like_skin(crop) for crop in crops)
        if unlike:
            return Analysis.not_analysed(
                TASK, datasets, f"does not look like a skin photograph: {unlike} of {len(crops)} images"
            )

        batch = np.stack([preprocess(crop, model.input_size, 1.0) for crop in crops])
        per_image = model.predict(batch)
        probabilities = per_image[:, indices].mean(axis=0)  # several photographs of one lesion: mean
        where = body_site(datasets[0])
        shows = per_image.argmax(axis=0)  # per model output: the photograph that shows it best
        findings = [
            Finding(
                codes[label],
                bool(p >= cutoffs[label]),
                float(p),
                float(cutoffs[label]),
                where,
                datasets[shows[i]],
            )
            for label, i, p in zip(CLASSES, indices, probabilities, strict=True)
        ]
        top = int(np.argmax(probabilities))
        top_label = CLASSES[top]
        model_index = indices[top]
        best = int(shows[model_index])
        heatmap = model.explain(batch[best : best + 1], model_index)[0]
        crop = crops[best]
        explanation = Explanation(
            source=datasets[best],
            image=np.ascontiguousarray(crop),
            heatmap=np.clip(
                cv2.resize(heatmap, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0
            ).astype(np.float32),
            probability=float(per_image[best, model_index]),
            label=codes[top_label].meaning,
            region=boxes[best],
            finding=findings[top],
        )
        ranked = np.argsort(-probabilities, kind="stable")
        runner_up = CLASSES[int(ranked[1])]
        top_p = float(probabilities[top])
        confidence = "" if top_p >= cutoffs[top_label] else "; below its threshold, low confidence"
        summary = (
            f"Most likely {codes[top_label].meaning.lower()} (p={top_p:.2f}{confidence}); "
            f"next {codes[runner_up].meaning.lower()} (p={float(probabilities[ranked[1]]):.2f})."
        )
        segmentation = self.companions.get("segmentation")
        masks = [] if segmentation is None else _outline(segmentation, datasets, crops, boxes)
        return Analysis(
            task=TASK,
            sources=list(datasets),
            findings=findings,
            explanations=[explanation],
            summary=summary,
            masks=masks,
            details={
                "image_probabilities": {
                    str(ds.SOPInstanceUID): {
                        label: round(float(p), 4) for label, p in zip(CLASSES, row[indices], strict=True)
                    }
                    for ds, row in zip(datasets, per_image, strict=True)
                },
                "top_class": top_label,
            },
        )


def _outline(
    model: SegmentationModel,
    datasets: Sequence[Dataset],
    crops: Sequence[np.ndarray],
    boxes: Sequence[tuple[int, int, int, int]],
) -> list[Mask]:
    """The lesion on each photograph: the segmentation of the same crop the classifier saw, its lesion
    probability resized to the crop and cut at the label's threshold (the manifest's, else one half),
    placed where the crop lies."""
    labels = model_labels("skin_lesion segmentation", model, [LESION_LABEL])
    lesion, concept, cut = (
        labels.index[LESION_LABEL],
        labels.code[LESION_LABEL],
        labels.threshold[LESION_LABEL],
    )
    masks = []
    for ds, crop, (top, left, side, _) in zip(datasets, crops, boxes, strict=True):
        probability = model.segment(preprocess(crop, model.input_size, 1.0)[None])[0, lesion]
        pixels = np.zeros((int(ds.Rows), int(ds.Columns)), bool)
        pixels[top : top + side, left : left + side] = (
            cv2.resize(probability, (side, side), interpolation=cv2.INTER_LINEAR) >= cut
        )
        masks.append(Mask(ds, pixels, concept, concept.meaning, model.identity))
    return masks
