"""Conjunctival pallor: the probability of anemia from a close-up photograph of the lower eyelid's
conjunctiva, with Grad-CAM over the photograph.

Faithful to the prototype (a ResNet-18 over "anemic" / "not anemic", sclera-based brightness
normalisation, a request to retake the photo when the model is unsure), with what it lacked as a
service: a photograph in which the white of the eye cannot be found or measured — none visible, too
dark, overexposed — is refused with that reason instead of given a probability that would only
reflect the room's lighting; and one preprocessing path (:func:`prepare`) that the training script
uses too.

Pallor is a colour, and a photograph's colours are the tissue's times the light's. The sclera is
white whatever the patient's haemoglobin, so scaling each channel until the sclera is a fixed
reference white cancels the light's brightness and colour temperature — what the prototype did, and
the reason a photograph without a visible sclera cannot be read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    Model,
    Site,
    TaskOptions,
    model_labels,
)
from node.dicom.attributes import laterality

TASK = "Conjunctival pallor (anemia) screening"
CONJUNCTIVA = Code("29445007", "SCT", "Conjunctiva")  # the finding site
ANEMIC_LABEL = "anemic"  # the model output this handler reads
MODALITIES = ("XC", "OP")  # external-camera (VL Photographic) and ophthalmic photography
PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422")  # pydicom decodes the YBR ones to RGB
REFERENCE_WHITE = 0.9  # what the sclera becomes in every channel; leaves headroom for brighter specks
SEARCH_WIDTH = 320  # the sclera is searched on a copy at most this wide: it is a large, smooth region
DARK = 50 / 255  # a brightest region (or a sclera) below this is mostly noise
CLIPPED = 250 / 255  # a channel at or above this may have been cut off by the sensor
MAX_CLIPPED_IMAGE = 0.3  # of the photograph's pixels
MAX_CLIPPED_SCLERA = 0.5  # of the sclera's pixels: beyond this its true brightness is unknown
DISPLAY_GAMMA = 2.2  # stored value ** this ≈ light: the search compares colours in linear light
WHITE_CHROMA = 0.2  # linear saturation below which a pixel is white after balancing by a guess at white
WHITE_LEVEL = 0.5  # of the guess's linear level: the sclera is among the brightest things in view
SCLERA_AREA = (0.004, 0.2)  # of the photograph: smaller is specular glints, larger is not an eye
SKIN_CHROMA = 0.25  # median linear saturation around a true sclera: skin and conjunctiva are never white
IRIS_SHARE = 0.1  # of the white region's convex hull that the iris between its parts must fill
IRIS_ASPECT = 3.0  # the iris is about round; a crescent's hull leaves a gap many times wider than high
CROP_WIDTH = 1.5  # the crop's width over the sclera's: the eye with its lids and lashes
CROP_DROP = 0.12  # of the sclera's width: the crop centre sits below the sclera, on the conjunctiva


class Options(TaskOptions):
    threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    retake_margin: float = Field(default=0.1, ge=0.0, lt=0.5)  # |p - threshold| below this: unsure
    explain_images: int = Field(default=2, ge=0, le=10)


def parse_options(options: Mapping[str, Any]) -> Options:
    return Options.parse(options, "conjunctiva_anemia")


class NotAnalysable(ValueError):
    """The photograph cannot be normalised; the message is the reason a reader sees."""


NO_SCLERA = "no sclera found: the white of the eye must be visible to correct for the lighting"
TOO_DARK = "too dark: retake the photo in better light"
OVEREXPOSED = "overexposed: the white of the eye is clipped; retake the photo with less light"


@dataclass(frozen=True)
class Prepared:
    """A photograph made ready for the model, with what the handler needs to explain it."""

    input: np.ndarray  # (3, H, W) float32 in [0, 1]: the normalised crop the model sees
    normalised: np.ndarray  # (rows, cols, 3) float32 in [0, 1]: the whole photograph, normalised
    sclera: np.ndarray  # (rows, cols) bool
    white: np.ndarray  # (3,) the sclera's measured colour in [0, 1], before normalisation
    box: tuple[int, int, int, int]  # (top, left, height, width) of the crop in source pixels


def _chroma(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, saturation) as in HSV: the brightest channel, and how far the others fall below it."""
    value = image.max(axis=2)
    return value, (value - image.min(axis=2)) / np.maximum(value, 1e-6)


def _white_region(linear: np.ndarray, selected: np.ndarray) -> np.ndarray | None:
    """The sclera if ``selected`` pixels are white: balanced by their colour, the largest one or two
    bright colourless regions, provided they pass as an eye's white (see :func:`find_sclera`)."""
    level, saturation = _chroma(linear / np.maximum(linear[selected].mean(axis=0), 1e-4))
    white: np.ndarray = ((saturation < WHITE_CHROMA) & (level > WHITE_LEVEL)).astype(np.uint8)
    white = cv2.morphologyEx(white, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(white)
    if count < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = [1 + int(i) for i in np.argsort(-areas)[:2] if areas[i] >= 0.25 * areas.max()]
    mask = np.isin(labels, kept)
    surround = ~cv2.dilate(white, np.ones((5, 5), np.uint8)).astype(bool)
    if not SCLERA_AREA[0] <= float(mask.mean()) <= SCLERA_AREA[1] or not surround.any():
        return None
    if float(np.median(saturation[surround])) < SKIN_CHROMA:  # the "white" was skin: all of it is
        return None
    return mask if _iris_beside(mask) else None


def _iris_beside(mask: np.ndarray) -> bool:
    """Whether the white region wraps around an iris: within its convex hull, a compact region that is
    not white and fills a good part of it. A pale conjunctiva taken for white is a crescent whose hull
    leaves only a long thin lens; a patch of skin leaves nothing."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    hull = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    gap = cv2.morphologyEx(hull & ~mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(gap)
    if count < 2:
        return False
    biggest = stats[1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))]
    compact = biggest[cv2.CC_STAT_WIDTH] <= IRIS_ASPECT * biggest[cv2.CC_STAT_HEIGHT]
    return bool(compact and biggest[cv2.CC_STAT_AREA] >= IRIS_SHARE * hull.sum())


def find_sclera(rgb: np.ndarray) -> np.ndarray:
    """The visible white of the eye, (rows, cols) bool, by classic colour rules rather than a model.

    Lighting multiplies every colour by the same per-channel gains, so whatever they are, the sclera
    stays the most neutral — the least red — of the bright things in view, and usually the brightest.
    Two guesses at white are tried on the linearised photograph: its brightest pixels, and the least
    red of its bright half. Balanced by a guess, the sclera is the largest one or two bright,
    colourless regions, accepted only where they look like one: skin around them keeps its colour
    (balancing by skin makes all skin colourless) and an iris sits between them. Raises NotAnalysable.
    """
    rows, cols = rgb.shape[:2]
    scale = min(1.0, SEARCH_WIDTH / cols)
    size = (max(round(cols * scale), 1), max(round(rows * scale), 1))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    value = small.max(axis=2)
    if float(np.percentile(value, 99)) < DARK:
        raise NotAnalysable(TOO_DARK)
    unclipped = value < CLIPPED
    if 1.0 - float(unclipped.mean()) > MAX_CLIPPED_IMAGE:
        raise NotAnalysable(OVEREXPOSED)
    linear = np.power(small, DISPLAY_GAMMA)  # photographs are stored gamma-encoded (sRGB)
    brightest = unclipped & (value >= np.percentile(value[unclipped], 97))
    bright = unclipped & (value >= np.percentile(value[unclipped], 50))
    blueness = np.log(linear[..., 2] + 1e-4) - np.log(linear[..., 0] + 1e-4)
    least_red = bright & (blueness >= np.percentile(blueness[bright], 95))
    for guess in (brightest, least_red):
        mask = _white_region(linear, guess)
        if mask is not None:
            return cv2.resize(mask.astype(np.uint8), (cols, rows), interpolation=cv2.INTER_NEAREST).astype(
                bool
            )
    raise NotAnalysable(NO_SCLERA)


def measure_white(rgb: np.ndarray, sclera: np.ndarray) -> np.ndarray:
    """The sclera's colour, (3,) in [0, 1]: the median of its interior (its rim blends into lids and
    iris). Raises NotAnalysable when it is clipped or too dark to measure."""
    side = max(3, round(min(rgb.shape[:2]) / 100)) | 1
    interior = cv2.erode(sclera.astype(np.uint8), np.ones((side, side), np.uint8)).astype(bool)
    pixels = rgb[interior if interior.sum() >= 20 else sclera]
    if float((pixels.max(axis=1) >= CLIPPED).mean()) > MAX_CLIPPED_SCLERA:
        raise NotAnalysable(OVEREXPOSED)
    white = np.median(pixels, axis=0).astype(np.float32)
    if float(white.max()) < DARK:
        raise NotAnalysable(TOO_DARK)
    return white


def eye_box(sclera: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop around the eye, with the model's aspect ratio: the
    sclera's width times CROP_WIDTH, centred a little below the sclera so the conjunctiva and the
    lower lashes are inside. It may run past the image's edges."""
    ys, xs = np.nonzero(sclera)
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    eye_width = max(float(x1 - x0), 8.0)
    width = round(CROP_WIDTH * eye_width)
    height = round(width * size[0] / size[1])
    centre_y = (y0 + y1) / 2 + CROP_DROP * eye_width
    return round(centre_y - height / 2), round((x0 + x1) / 2 - width / 2), height, width


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``image`` inside ``box``, repeating the edge where the box runs past it."""
    top, left, height, width = box
    rows, cols = image.shape[:2]
    pad = [(max(-top, 0), max(top + height - rows, 0)), (max(-left, 0), max(left + width - cols, 0))]
    padded = np.pad(image, pad + [(0, 0)] * (image.ndim - 2), mode="edge")
    top, left = top + pad[0][0], left + pad[1][0]
    return padded[top : top + height, left : left + width]


def prepare(rgb: np.ndarray, size: tuple[int, int]) -> Prepared:
    """A (rows, cols, 3) uint8 photograph → the model input: found sclera, each channel scaled so
    the sclera becomes REFERENCE_WHITE, cropped around the eye and resized with area averaging to
    ``size`` (H, W). Training calls this same function. Raises NotAnalysable with the reason."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise NotAnalysable(f"not an RGB image: pixel array of shape {rgb.shape}")
    image = rgb.astype(np.float32) / 255.0
    sclera = find_sclera(image)
    white = measure_white(image, sclera)
    normalised = np.clip(image * (REFERENCE_WHITE / np.maximum(white, 1e-3)), 0.0, 1.0)
    box = eye_box(sclera, size)
    patch = cv2.resize(crop(normalised, box), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return Prepared(np.ascontiguousarray(patch.transpose(2, 0, 1)), normalised, sclera, white, box)


def preprocess(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The model input (3, H, W) float32 of a photograph; see :func:`prepare`."""
    return prepare(rgb, size).input


def source_heatmap(heatmap: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """A heatmap over the model's input → the photograph's ``shape`` (rows, cols), placed on the crop
    ``box`` and zero outside it, in [0, 1] with its peak at 1."""
    top, left, height, width = box
    rows, cols = shape
    placed = np.zeros((rows + 2 * height, cols + 2 * width), np.float32)  # room for a box past the edges
    placed[top + height : top + 2 * height, left + width : left + 2 * width] = cv2.resize(
        heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    inside = np.clip(placed[height : height + rows, width : width + cols], 0.0, None)
    peak = float(inside.max())
    return (inside / peak if peak > 0 else inside).astype(np.float32)


def _rgb(ds: Dataset) -> np.ndarray:
    """The photograph as (rows, cols, 3) uint8; raises NotAnalysable for what is not one."""
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRIC:
        raise NotAnalysable(f"not a colour photograph (PhotometricInterpretation {photometric or 'none'})")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # an undecodable transfer syntax or corrupt pixel data: say so, do not guess
        raise NotAnalysable(f"pixel data could not be read: {exc}") from exc
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise NotAnalysable(f"not a single RGB photograph: pixel array of shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise NotAnalysable(f"not an 8-bit photograph (BitsAllocated {ds.get('BitsAllocated')})")
    return pixels


def _check(ds: Dataset) -> None:
    """Refuse what a PACS may send that is not an eye photograph."""
    modality = str(ds.get("Modality", "")) or "none"
    if modality not in MODALITIES:
        raise NotAnalysable(f"not a photograph (Modality {modality})")
    body_part = str(ds.get("BodyPartExamined", "")).upper()
    if body_part and body_part != "EYE":
        raise NotAnalysable(f"not an eye photograph (BodyPartExamined {body_part})")
    if "PixelData" not in ds:
        raise NotAnalysable("no pixel data")


class ConjunctivaAnemiaHandler(Handler):
    name: ClassVar[str] = "conjunctiva_anemia"

    def analyse(self, datasets: Sequence[Dataset], model: Model, options: Mapping[str, Any]) -> Analysis:
        opts = parse_options(options)
        labels = model_labels(self.name, model, [ANEMIC_LABEL], opts.threshold)
        label_index = labels.index[ANEMIC_LABEL]
        anemia, threshold = labels.code[ANEMIC_LABEL], labels.threshold[ANEMIC_LABEL]

        usable: list[tuple[Dataset, Prepared]] = []
        refused: dict[str, str] = {}
        for ds in datasets:
            try:
                _check(ds)
                usable.append((ds, prepare(_rgb(ds), model.input_size)))
            except NotAnalysable as exc:
                refused[str(ds.get("SOPInstanceUID", f"#{len(refused) + 1}"))] = str(exc)
        if not usable:
            reasons = list(dict.fromkeys(refused.values()))  # unique, in order
            return Analysis.not_analysed(
                TASK, datasets, reasons[0] if len(reasons) == 1 else "; ".join(reasons)
            )

        batch = np.stack([prepared.input for _, prepared in usable])
        probabilities = model.predict(batch)[:, label_index]
        # Both eyes and retakes show the same blood: the patient's probability is their mean.
        probability = float(probabilities.mean())
        present = probability >= threshold
        unsure = abs(probability - threshold) < opts.retake_margin

        # Anemia is the patient's, seen in the conjunctiva: of one side where every photograph shows it.
        sides = {laterality(ds) for ds, _ in usable}
        side = sides.pop() if len(sides) == 1 else None
        finding = Finding(
            anemia,
            bool(present),
            probability,
            float(threshold),
            Site.on(CONJUNCTIVA, side),
            usable[int(np.argmax(probabilities))][0],
        )
        explanations: list[Explanation] = []
        chosen = [int(i) for i in np.argsort(-probabilities, kind="stable")[: opts.explain_images]]
        if chosen:
            heatmaps = model.explain(batch[chosen], label_index)
            for index, heatmap in zip(chosen, heatmaps, strict=True):
                ds, prepared = usable[index]
                image_probability = float(probabilities[index])
                explanations.append(
                    Explanation(
                        source=ds,
                        image=(prepared.normalised * 255.0).round().astype(np.uint8),
                        # Weighted by the probability, a not-anemic image's overlay stays faint.
                        heatmap=source_heatmap(heatmap, prepared.box, prepared.sclera.shape)
                        * np.float32(image_probability),
                        probability=image_probability,
                        label=anemia.meaning,
                        finding=finding,
                    )
                )

        figures = f"p={probability:.2f}, threshold {threshold:.2f}"
        summary = (
            f"Conjunctival pallor suggests anemia ({figures})"
            if present
            else f"No conjunctival pallor suggesting anemia ({figures})"
        )
        summary += "; low confidence near the threshold: retake the photo in better light." if unsure else "."
        return Analysis(
            task=TASK,
            sources=list(datasets),
            findings=[finding],
            explanations=explanations,
            summary=summary,
            details={
                "image_probabilities": {
                    str(ds.SOPInstanceUID): round(float(p), 4)
                    for (ds, _), p in zip(usable, probabilities, strict=True)
                },
                "sclera_white": {
                    str(ds.SOPInstanceUID): [round(float(c) * 255.0, 1) for c in prepared.white]
                    for ds, prepared in usable
                },
                "images_not_analysed": refused,
                "low_confidence": bool(unsure),
            },
        )
