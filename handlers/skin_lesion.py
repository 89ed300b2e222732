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
from pydantic import BaseModel, ConfigDict, Field
from pydicom import Dataset

from handlers.base import (
    Analysis,
    Code,
    Explanation,
    Finding,
    Handler,
    Model,
    label_indices,
    rgb8,
    thresholds,
    validate_options,
)

TASK = "Dermoscopy skin lesion classification"
# SNOMED CT concept for each HAM10000 class; the meaning is the concept's preferred term.
CLASS_CODES: dict[str, Code] = {
    "akiec": Code("201101007", "SCT", "Actinic keratosis"),
    "bcc": Code("254701007", "SCT", "Basal cell carcinoma of skin"),
    "bkl": Code("12563001", "SCT", "Seborrheic keratosis"),
    "df": Code("72464004", "SCT", "Dermatofibroma"),
    "mel": Code("372244006", "SCT", "Malignant melanoma"),
    "nv": Code("400096001", "SCT", "Melanocytic nevus"),
    "vasc": Code("400210000", "SCT", "Hemangioma"),
}
DEFAULT_CROP = 2.0 / 3.0
# External-camera photography and dermoscopy: the modalities a skin photograph is stored under.
PHOTOGRAPHIC_MODALITIES = ("XC", "DMS")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
SKIN_BRIGHTNESS = 0.2  # mean of the centre crop in [0, 1]: darker is a lens cap or a failed exposure
BATCH = 16


class Options(BaseModel):
    """Task parameters: the manifest's ``[options]`` overlaid with a route's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_fraction: float = Field(default=DEFAULT_CROP, gt=0.2, le=1.0)
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    min_side: int = Field(default=64, ge=16)


def parse_options(options: Mapping[str, Any]) -> Options:
    return validate_options(Options, options, "skin_lesion")


def centre_crop(image: np.ndarray, fraction: float = DEFAULT_CROP) -> np.ndarray:
    """The centred square whose side is ``fraction`` of the image's shorter side: where a dermoscopy
    photograph puts its lesion (the prototype cropped 300×300 from 450×600)."""
    side = max(1, round(min(image.shape[:2]) * fraction))
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
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


class SkinLesionHandler(Handler):
    name: ClassVar[str] = "skin_lesion"

    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        opts = parse_options(options)
        indices = list(label_indices(self.name, model, list(CLASS_CODES)).values())
        cutoffs = thresholds(model, list(CLASS_CODES), opts.threshold)
        if not datasets:
            return Analysis.not_analysed(TASK, datasets, "no images")
        for ds in datasets:
            reason = refusal(ds, opts.min_side)
            if reason is not None:
                return Analysis.not_analysed(TASK, datasets, reason)
        try:
            crops = [centre_crop(rgb8(ds), opts.crop_fraction) for ds in datasets]
        except Exception as exc:  # an undecodable transfer syntax or corrupt pixel data: say so, do not guess
            return Analysis.not_analysed(TASK, datasets, f"pixel data could not be read: {exc}")
        if any(crop.ndim != 3 or crop.shape[2] != 3 for crop in crops):
            return Analysis.not_analysed(TASK, datasets, "pixel data is not three-channel colour")
        unlike = sum(not looks_like_skin(crop) for crop in crops)
        if unlike:
            return Analysis.not_analysed(
                TASK, datasets, f"does not look like a skin photograph: {unlike} of {len(crops)} images"
            )

        batch = np.stack([preprocess(crop, model.input_size, 1.0) for crop in crops])
        per_image = np.concatenate([model.predict(batch[i : i + BATCH]) for i in range(0, len(batch), BATCH)])
        probabilities = per_image[:, indices].mean(axis=0)  # several photographs of one lesion: mean
        findings = [
            Finding(code, bool(p >= cutoffs[label]), float(p), float(cutoffs[label]))
            for (label, code), p in zip(CLASS_CODES.items(), probabilities, strict=True)
        ]
        top = int(np.argmax(probabilities))
        top_label = list(CLASS_CODES)[top]
        model_index = indices[top]
        best = int(np.argmax(per_image[:, model_index]))  # the photograph that shows it best
        heatmap = model.explain(batch[best : best + 1], model_index)[0]
        crop = crops[best]
        explanation = Explanation(
            source=datasets[best],
            image=np.ascontiguousarray(crop),
            heatmap=np.clip(
                cv2.resize(heatmap, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0
            ).astype(np.float32),
            probability=float(per_image[best, model_index]),
            label=CLASS_CODES[top_label].meaning,
        )
        ranked = np.argsort(-probabilities, kind="stable")
        runner_up = list(CLASS_CODES)[int(ranked[1])]
        top_p = float(probabilities[top])
        confidence = "" if top_p >= cutoffs[top_label] else "; below its threshold, low confidence"
        summary = (
            f"Most likely {CLASS_CODES[top_label].meaning.lower()} (p={top_p:.2f}{confidence}); "
            f"next {CLASS_CODES[runner_up].meaning.lower()} (p={float(probabilities[ranked[1]]):.2f})."
        )
        return Analysis(
            task=TASK,
            sources=list(datasets),
            findings=findings,
            explanations=[explanation],
            summary=summary,
            details={
                "image_probabilities": {
                    str(ds.SOPInstanceUID): {
                        label: round(float(p), 4) for label, p in zip(CLASS_CODES, row[indices], strict=True)
                    }
                    for ds, row in zip(datasets, per_image, strict=True)
                },
                "top_class": top_label,
            },
        )
