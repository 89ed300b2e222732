"""Conjunctival pallor: the probability of anemia from a close-up photograph of the lower eyelid's
conjunctiva, with Grad-CAM over the photograph.

Faithful to the prototype (a ResNet-18 over "anemic" / "not anemic", sclera-based brightness
normalisation, a request to retake the photo when the model is unsure), with what it lacked as a
service: a photograph in which the white of the eye cannot be found or measured — none visible, too
dark, overexposed — or in which the eye is blurred is refused with that reason instead of given a
probability that would only reflect the room's lighting or the camera's shake; and one preprocessing
path (:func:`prepare`) that the training script uses too.

Pallor is a colour, and a photograph's colours are the tissue's times the light's. The sclera is
white whatever the patient's haemoglobin, so scaling each channel until the sclera is a fixed
reference white cancels the light's brightness and colour temperature — what the prototype did, and
the reason a photograph without a visible sclera cannot be read.

Limits of the quality gate, which judges by classic image measures, not a model: the blur measure
(:func:`sharpness`) is calibrated on synthetic photographs only, with thin margins (see
:data:`SHARPNESS_MIN`), so a real camera may need it recalibrated; a smooth, lash-less eye may read as
blurred, and an eye of which too little is in view is not judged for focus at all. The camera page's
white fill (:func:`frame_fill`) is told from the photograph by colour and place alone (near-white,
holding a corner): a near-white sclera joined to such a region (a clipped eye against a white sheet
that reaches a corner) is left out with it, and is then measured on what remains of it or not found.
Only a framed capture may be mostly sclera; a tight close-up sent as a file without the frame's fill
is held to :data:`SCLERA_AREA` and refused as "no sclera found" beyond it.
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
# Of the photograph's own pixels (not the fill around a frame): smaller is specular glints, larger is
# not an eye — unless the camera page's guide framed it (its fill is found): then it is mostly eye,
# its sclera about 0.3, up to FRAMED_SCLERA_AREA.
SCLERA_AREA = (0.004, 0.2)
FRAMED_SCLERA_AREA = 0.45
SKIN_CHROMA = 0.25  # median linear saturation around a true sclera: skin and conjunctiva are never white
IRIS_SHARE = 0.1  # of the white region's convex hull that the iris between its parts must fill
IRIS_ASPECT = 3.0  # the iris is about round; a crescent's hull leaves a gap many times wider than high
CROP_WIDTH = 1.5  # the crop's width over the sclera's: the eye with its lids and lashes
CROP_DROP = 0.12  # of the sclera's width: the crop centre sits below the sclera, on the conjunctiva
SHARPNESS_WIDTH = 128  # the eye's crop is measured at this width: blur relative to the eye, not the sensor
# The crop's sharpness (see :func:`sharpness`) below which the photograph is refused as blurred. On
# synthetic photographs (training/conjunctiva_phantom.py): 120 whole ones, 320 to 1024 px wide, sharp
# 1.93 at the least, blurred with sigma 4 px at 640 px width 1.04 at the most (sigma 3 px: 1.59); 30
# framed as the camera page sends them (640 x 480, cropped to the default frame), sharp 1.18 at the
# least, blurred 0.42 at the most. Thin margins: recalibrate on real photographs.
SHARPNESS_MIN = 1.1
SHARPNESS_PIXELS = 256  # of the measured copy: fewer left to judge by, and the focus is not judged
FILL = 0.97  # every channel at least this, holding the picture's corners: the camera page's white fill


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
BLURRED = "blurred: hold the camera still and retake"


@dataclass(frozen=True)
class Prepared:
    """A photograph made ready for the model, with what the handler needs to explain it."""

    input: np.ndarray  # (3, H, W) float32 in [0, 1]: the normalised crop the model sees
    normalised: np.ndarray  # (rows, cols, 3) float32 in [0, 1]: the whole photograph, normalised
    sclera: np.ndarray  # (rows, cols) bool
    white: np.ndarray  # (3,) the sclera's measured colour in [0, 1], before normalisation
    box: tuple[int, int, int, int]  # (top, left, height, width) of the crop in source pixels


def frame_fill(image: np.ndarray) -> np.ndarray:
    """The white the camera page fills in outside its frame guide, (rows, cols) bool: the near-white
    regions (every channel at least :data:`FILL`) that hold a corner of the picture. The page crops to
    the frame's box and paints everything outside the frame white, so its fill holds the corners; a
    white sheet or wall along an edge does too and is as well left out. A sclera reaching the edge
    between corners, however bright, stays part of the photograph, where the exposure checks and the
    sclera search judge it."""
    _, parts = cv2.connectedComponents((image.min(axis=2) >= FILL).astype(np.uint8))
    corners = {int(parts[0, 0]), int(parts[0, -1]), int(parts[-1, 0]), int(parts[-1, -1])} - {0}
    return np.isin(parts, list(corners))


def _outside(fill: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``fill`` at ``size`` (cols, rows) with a band around it (a JPEG rings at its border): the
    pixels that are not the eye's, neither the sclera, nor overexposure, nor an edge to judge focus by."""
    reduced = cv2.resize(fill.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0
    return cv2.dilate(reduced.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def _chroma(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value, saturation) as in HSV: the brightest channel, and how far the others fall below it."""
    value = image.max(axis=2)
    return value, (value - image.min(axis=2)) / np.maximum(value, 1e-6)


def _white_region(
    linear: np.ndarray, selected: np.ndarray, photo: np.ndarray, largest: float
) -> np.ndarray | None:
    """The sclera if ``selected`` pixels are white: balanced by their colour, the largest one or two
    bright colourless regions of the ``photo`` pixels (not the fill around a frame), provided they pass
    as an eye's white (see :func:`find_sclera`) and cover at most ``largest`` of them."""
    level, saturation = _chroma(linear / np.maximum(linear[selected].mean(axis=0), 1e-4))
    white: np.ndarray = ((saturation < WHITE_CHROMA) & (level > WHITE_LEVEL) & photo).astype(np.uint8)
    white = cv2.morphologyEx(white, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(white)
    if count < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = [1 + int(i) for i in np.argsort(-areas)[:2] if areas[i] >= 0.25 * areas.max()]
    mask = np.isin(labels, kept)
    surround = ~cv2.dilate(white, np.ones((5, 5), np.uint8)).astype(bool) & photo
    if not SCLERA_AREA[0] <= float(mask.sum() / photo.sum()) <= largest or not surround.any():
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


def find_sclera(rgb: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
    """The visible white of the eye, (rows, cols) bool, by classic colour rules rather than a model.

    Lighting multiplies every colour by the same per-channel gains, so whatever they are, the sclera
    stays the most neutral — the least red — of the bright things in view, and usually the brightest.
    Two guesses at white are tried on the linearised photograph: its brightest pixels, and the least
    red of its bright half. Balanced by a guess, the sclera is the largest one or two bright,
    colourless regions, accepted only where they look like one: skin around them keeps its colour
    (balancing by skin makes all skin colourless) and an iris sits between them. The camera page's
    ``fill`` (:func:`frame_fill`, found here if not given) is left out. Raises NotAnalysable.
    """
    rows, cols = rgb.shape[:2]
    scale = min(1.0, SEARCH_WIDTH / cols)
    size = (max(round(cols * scale), 1), max(round(rows * scale), 1))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    fill = frame_fill(rgb) if fill is None else fill
    framed = bool(fill.any())
    photo = ~_outside(fill, size)
    if not photo.any():
        raise NotAnalysable(NO_SCLERA)
    value = small.max(axis=2)
    if float(np.percentile(value[photo], 99)) < DARK:
        raise NotAnalysable(TOO_DARK)
    unclipped = (value < CLIPPED) & photo
    if 1.0 - float(unclipped.sum() / photo.sum()) > MAX_CLIPPED_IMAGE:
        raise NotAnalysable(OVEREXPOSED)
    linear = np.power(small, DISPLAY_GAMMA)  # photographs are stored gamma-encoded (sRGB)
    brightest = unclipped & (value >= np.percentile(value[unclipped], 97))
    bright = unclipped & (value >= np.percentile(value[unclipped], 50))
    blueness = np.log(linear[..., 2] + 1e-4) - np.log(linear[..., 0] + 1e-4)
    least_red = bright & (blueness >= np.percentile(blueness[bright], 95))
    for guess in (brightest, least_red):
        mask = _white_region(linear, guess, photo, FRAMED_SCLERA_AREA if framed else SCLERA_AREA[1])
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


def sharpness(image: np.ndarray, box: tuple[int, int, int, int], fill: np.ndarray) -> float:
    """How sharp the eye is: the strongest edges' Laplacian (its 99th percentile: lashes, lid margins,
    the iris's rim), over the crop's contrast, at :data:`SHARPNESS_WIDTH` whatever the camera's
    resolution. Camera shake and missed focus flatten exactly those edges; lighting scales edges and
    contrast alike; sensor noise is spread thin by measuring on a reduced copy. Left out with their
    borders: the camera page's white ``fill`` (:func:`frame_fill`), sharp however blurred the eye, and
    where the box runs past the picture (a framed capture is wider than tall), whose repeated edge
    rows carry their noise as sharp stripes."""
    size = (SHARPNESS_WIDTH, max(round(box[2] * SHARPNESS_WIDTH / box[3]), 3))
    region = cv2.resize(crop(image, box), size, interpolation=cv2.INTER_AREA)
    grey = region.mean(axis=2)
    top, left, height, width = box
    beyond = np.pad(fill, 1, constant_values=True)  # crop() repeats this True rim past the picture
    kept = ~_outside(crop(beyond, (top + 1, left + 1, height, width)), size)
    if kept.sum() < SHARPNESS_PIXELS:  # too little of the eye to judge its focus by: not refused for it
        return float("inf")
    edges = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    return float(np.percentile(edges[kept], 99)) / max(float(grey[kept].std()), 1e-6)


def prepare(rgb: np.ndarray, size: tuple[int, int]) -> Prepared:
    """A (rows, cols, 3) uint8 photograph → the model input: found sclera, each channel scaled so
    the sclera becomes REFERENCE_WHITE, cropped around the eye (refused if blurred) and resized with
    area averaging to ``size`` (H, W). Training calls this same function. Raises NotAnalysable with
    the reason."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise NotAnalysable(f"not an RGB image: pixel array of shape {rgb.shape}")
    image = rgb.astype(np.float32) / 255.0
    fill = frame_fill(image)
    sclera = find_sclera(image, fill)
    white = measure_white(image, sclera)
    normalised = np.clip(image * (REFERENCE_WHITE / np.maximum(white, 1e-3)), 0.0, 1.0)
    box = eye_box(sclera, size)
    if sharpness(image, box, fill) < SHARPNESS_MIN:
        raise NotAnalysable(BLURRED)
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
