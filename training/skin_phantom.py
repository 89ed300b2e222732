"""Synthetic dermoscopy photographs of the seven HAM10000 lesion classes, each with its exact lesion mask.

No patient photograph may be used here, yet the skin-lesion classifier and the lesion segmentation model
must be trained, measured and tested: a phantom knows which pixels are lesion, so a Grad-CAM peak or a
predicted outline can be scored, not just looked at. Each class carries the dermoscopic structures a
dermatologist names for it (pigment network, blue-white veil, arborizing vessels, milia-like cysts,
central white patch, lacunae…) over skin with texture, hair, uneven illumination and the dark circular
vignette of a contact dermoscope. Lengths are fractions of the image's shorter side, so a 240-pixel
phantom is a coarser view of the same scene as a 450-pixel one. Every lesion lies inside the centre
crop the handler takes (``CROP_FRACTION`` of the shorter side), as a dermoscopy photograph is centred on
its lesion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.uid import DermoscopicPhotographyImageStorage

from training.demo_dicom import Code, photograph

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CROP_FRACTION = 2.0 / 3.0  # the prototype: 300 of 450 rows; every lesion fits inside this centre square
SOURCE_SIZE = (450, 600)  # (rows, columns) of a HAM10000 image
SKIN: Code = ("39937001", "SCT", "Skin")  # CID 4029 Dermatology Anatomic Site
MAX_EXTENT = 0.3  # of the shorter side: the farthest a lesion reaches from the image centre (crop: 1/3)

Colour = tuple[float, float, float]


@dataclass(frozen=True)
class SkinPhantom:
    rgb: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, the lesion
    kind: str  # one of CLASSES


@dataclass(frozen=True)
class _Frame:
    """Pixel grids relative to the lesion: ``rho`` is 1 on its border, ``theta`` the polar angle,
    ``u, v`` its axes in units of the shorter side; ``radius`` the mean radius in pixels."""

    rho: np.ndarray
    theta: np.ndarray
    u: np.ndarray
    v: np.ndarray
    radius: float
    centre: tuple[float, float]  # (row, col) in pixels
    side: int


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A smooth random field with unit standard deviation; ``sigma`` is a fraction of the shorter side.
    Drawn on a grid as coarse as its smoothness allows and interpolated up, which keeps it cheap."""
    side = min(shape)
    step = max(1, int(sigma * side / 2))
    coarse = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2)).astype(np.float32)
    field = cv2.GaussianBlur(coarse, (0, 0), max(sigma * side / step, 0.5))
    field = cv2.resize(field, ((shape[1] // step + 2) * step, (shape[0] // step + 2) * step))
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _jitter(rng: np.random.Generator, colour: Colour, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0).astype(
        np.float32
    )


def _skin(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Skin of a random tone with blotchy redness and fine texture, (H, W, 3) float in [0, 1]."""
    light, medium = np.array([0.94, 0.78, 0.68], np.float32), np.array([0.76, 0.55, 0.42], np.float32)
    tone = light + float(rng.uniform(0, 1)) * (medium - light)
    image = np.broadcast_to(tone, (*shape, 3)).copy()
    image *= 1.0 + 0.04 * smooth_noise(rng, shape, 0.15)[..., None]
    redness = np.clip(smooth_noise(rng, shape, 0.08), 0, None)[..., None] * float(rng.uniform(0.0, 0.05))
    image += redness * np.array([0.6, -0.6, -0.5], np.float32)
    image *= 1.0 + 0.025 * smooth_noise(rng, shape, 0.006)[..., None]  # skin furrows
    return image


def _frame(
    rng: np.random.Generator, shape: tuple[int, int], radius: float, wobble: float, ratio: float
) -> _Frame:
    """A lesion outline: an ellipse of aspect ``ratio`` whose radius varies with angle by low-order
    harmonics of total amplitude about ``wobble``, placed so it stays within MAX_EXTENT of the centre."""
    side = min(shape)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    radius = min(radius, MAX_EXTENT / (1.0 + wobble))
    offset = MAX_EXTENT - radius * (1.0 + wobble)
    centre = (
        shape[0] / 2 + float(rng.uniform(-offset, offset)) * side * 0.5,
        shape[1] / 2 + float(rng.uniform(-offset, offset)) * side * 0.5,
    )
    angle = float(rng.uniform(0, np.pi))
    dy, dx = (rows - centre[0]) / side, (cols - centre[1]) / side
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    theta = np.arctan2(v, u)
    harmonics = sum(
        float(rng.uniform(0, 1)) * np.cos(k * theta + float(rng.uniform(0, 2 * np.pi))) for k in range(2, 7)
    )
    outline = 1.0 + wobble * harmonics / max(float(np.abs(harmonics).max()), 1e-6)
    rho = np.sqrt(u**2 + (v / ratio) ** 2) / (radius * outline)
    return _Frame(rho, theta, u, v, radius * side, centre, side)


def _blend(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """Paint ``colour`` ((3,) or (H, W, 3)) over ``image`` with per-pixel opacity ``alpha`` in place."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    image *= 1.0 - a
    image += a * colour


def _body(frame: _Frame, edge: float) -> np.ndarray:
    """Opacity of the lesion body: 1 inside, fading to 0 exactly at the outline over ``edge`` (in rho),
    so nothing is painted outside the mask."""
    return np.clip((1.0 - frame.rho) / edge, 0.0, 1.0)


def _dots(
    rng: np.random.Generator, frame: _Frame, count: int, size: float, within: tuple[float, float]
) -> np.ndarray:
    """Opacity of ``count`` round dots of radius ``size`` (fraction of the lesion radius) whose centres
    lie between ``within`` (rho range)."""
    out = np.zeros(frame.rho.shape, np.uint8)
    inside = np.argwhere((frame.rho >= within[0]) & (frame.rho < within[1]))
    if len(inside) == 0:
        return out.astype(np.float32)
    for row, col in inside[rng.integers(len(inside), size=count)]:
        r = max(1, round(size * frame.radius * float(rng.uniform(0.6, 1.3))))
        cv2.circle(out, (int(col), int(row)), r, 255, -1, lineType=cv2.LINE_AA)
    return out.astype(np.float32) / 255.0


def _network(frame: _Frame, period: float, phase: float) -> np.ndarray:
    """A reticular pigment network (dark lines in a honeycomb-like grid) in [0, 1]."""
    scale = 2 * np.pi / (period * frame.radius / frame.side)
    cells = np.cos(frame.u * scale + phase) * np.cos(frame.v * scale - phase)
    return np.clip(1.0 - np.abs(cells) * 2.2, 0.0, 1.0)


def _vessels(rng: np.random.Generator, frame: _Frame, count: int) -> np.ndarray:
    """Arborizing vessels: thick trunks that branch and taper, in [0, 1]."""
    out = np.zeros(frame.rho.shape, np.uint8)
    base = max(1, round(frame.side / 160))

    def branch(row: float, col: float, angle: float, length: float, width: int, depth: int) -> None:
        steps = 6
        for _ in range(steps):
            angle += float(rng.normal(0, 0.25))
            nrow = row + math.sin(angle) * length / steps
            ncol = col + math.cos(angle) * length / steps
            cv2.line(out, (round(col), round(row)), (round(ncol), round(nrow)), 255, width, cv2.LINE_AA)
            row, col = nrow, ncol
        if depth > 0:
            for turn in (-0.6, 0.6):
                branch(
                    row,
                    col,
                    angle + turn + float(rng.normal(0, 0.2)),
                    length * 0.6,
                    max(1, width - 1),
                    depth - 1,
                )

    for _ in range(count):
        angle = float(rng.uniform(0, 2 * np.pi))
        start = float(rng.uniform(0.2, 0.6)) * frame.radius
        row = frame.centre[0] + math.sin(angle) * start
        col = frame.centre[1] + math.cos(angle) * start
        branch(row, col, angle + float(rng.uniform(1.5, 4.7)), frame.radius * 0.6, base + 1, 2)
    return out.astype(np.float32) / 255.0


def _nv(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Melanocytic nevus: round, symmetric, one shade of brown, a regular network fading at the rim."""
    frame = _frame(rng, shape, float(rng.uniform(0.1, 0.2)), 0.05, float(rng.uniform(0.85, 1.0)))
    body = _body(frame, 0.12)
    brown = _jitter(rng, (0.48, 0.30, 0.20), 0.05)
    _blend(image, brown, body * 0.9)
    _blend(
        image, brown * 0.6, body * _network(frame, 0.35, float(rng.uniform(0, 6))) * 0.5 * (1.2 - frame.rho)
    )
    return frame.rho < 1.0


def _mel(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Melanoma: large, asymmetric, irregular border, several colours (dark brown, black, blue-grey),
    a blue-white veil, an atypical network and irregular globules off-centre."""
    frame = _frame(rng, shape, float(rng.uniform(0.14, 0.22)), 0.35, float(rng.uniform(0.6, 0.9)))
    body = _body(frame, 0.1)
    _blend(image, _jitter(rng, (0.42, 0.26, 0.17)), body)
    zones = smooth_noise(rng, shape, 0.05)
    _blend(image, _jitter(rng, (0.14, 0.08, 0.06), 0.04), body * np.clip(zones - 0.2, 0, 1) * 1.5)
    _blend(image, _jitter(rng, (0.62, 0.45, 0.32)), body * np.clip(-zones - 0.4, 0, 1) * 1.5)
    veil_angle = float(rng.uniform(-np.pi, np.pi))
    veil = np.clip(np.cos(frame.theta - veil_angle) * 1.5 - 0.3, 0, 1) * np.clip(0.95 - frame.rho, 0, 1) * 2.0
    _blend(image, _jitter(rng, (0.55, 0.62, 0.76), 0.05), body * veil * 0.75)
    _blend(image, _jitter(rng, (0.33, 0.38, 0.50), 0.05), body * np.clip(zones[::-1] - 0.8, 0, 1) * 2.0)
    network = _network(frame, float(rng.uniform(0.25, 0.45)), float(rng.uniform(0, 6)))
    _blend(image, np.array([0.1, 0.06, 0.05], np.float32), body * network * np.clip(zones + 0.3, 0, 1) * 0.6)
    _blend(image, np.array([0.12, 0.07, 0.06], np.float32), _dots(rng, frame, 12, 0.05, (0.5, 0.95)) * body)
    return frame.rho < 1.0


def _bcc(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Basal cell carcinoma: a pink, shiny, translucent plaque with arborizing red vessels and a few
    blue-grey ovoid nests."""
    frame = _frame(rng, shape, float(rng.uniform(0.12, 0.22)), 0.2, float(rng.uniform(0.7, 1.0)))
    body = _body(frame, 0.2)
    _blend(image, _jitter(rng, (0.90, 0.66, 0.66), 0.04), body * 0.85)
    _blend(
        image,
        np.array([0.97, 0.90, 0.90], np.float32),
        body * np.clip(smooth_noise(rng, shape, 0.03) - 0.8, 0, 1),
    )
    _blend(
        image, _jitter(rng, (0.72, 0.10, 0.16), 0.05), _vessels(rng, frame, int(rng.integers(2, 5))) * body
    )
    _blend(
        image,
        _jitter(rng, (0.36, 0.40, 0.50), 0.04),
        _dots(rng, frame, int(rng.integers(0, 4)), 0.12, (0.2, 0.7)) * 0.8,
    )
    return frame.rho < 1.0


def _akiec(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Actinic keratosis / Bowen's disease: an ill-defined red-pink patch with white-yellow scale and
    the 'strawberry' pattern of pale follicular openings on red."""
    frame = _frame(rng, shape, float(rng.uniform(0.12, 0.22)), 0.3, float(rng.uniform(0.65, 1.0)))
    body = _body(frame, 0.25)
    _blend(image, _jitter(rng, (0.84, 0.42, 0.42), 0.05), body * 0.9)
    scale = np.clip(smooth_noise(rng, shape, 0.012) - 0.6, 0, 1) * 2.0
    _blend(image, _jitter(rng, (0.93, 0.89, 0.78), 0.03), body * scale * 0.85)
    _blend(image, np.array([0.95, 0.85, 0.82], np.float32), _dots(rng, frame, 40, 0.025, (0.0, 0.85)) * body)
    return frame.rho < 1.0


def _bkl(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Benign keratosis (seborrheic keratosis): a sharply bordered, waxy light-brown plaque with
    cerebriform ridges, milia-like cysts (white dots) and comedo-like openings (dark dots)."""
    frame = _frame(rng, shape, float(rng.uniform(0.12, 0.22)), 0.12, float(rng.uniform(0.65, 0.95)))
    body = _body(frame, 0.04)
    _blend(image, _jitter(rng, (0.68, 0.50, 0.33), 0.05), body)
    ridges = np.sin(smooth_noise(rng, shape, 0.02) * 6.0)
    _blend(image, np.array([0.45, 0.32, 0.20], np.float32), body * np.clip(ridges, 0, 1) * 0.35)
    _blend(
        image,
        _jitter(rng, (0.96, 0.94, 0.84), 0.02),
        _dots(rng, frame, int(rng.integers(5, 14)), 0.05, (0, 0.85)),
    )
    _blend(
        image,
        np.array([0.25, 0.17, 0.10], np.float32),
        _dots(rng, frame, int(rng.integers(4, 12)), 0.04, (0, 0.85)),
    )
    return frame.rho < 1.0


def _df(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Dermatofibroma: a small firm papule, a central white scar-like patch inside a delicate brown
    ring of fine network."""
    frame = _frame(rng, shape, float(rng.uniform(0.09, 0.16)), 0.1, float(rng.uniform(0.75, 1.0)))
    body = _body(frame, 0.25)
    _blend(image, _jitter(rng, (0.58, 0.40, 0.30), 0.05), body * np.clip(frame.rho * 1.6 - 0.3, 0, 1) * 0.9)
    _blend(image, np.array([0.45, 0.30, 0.22], np.float32), body * _network(frame, 0.3, 0.0) * 0.4)
    patch = np.clip((0.5 + 0.12 * smooth_noise(rng, shape, 0.03) - frame.rho) / 0.12, 0, 1)
    _blend(image, _jitter(rng, (0.95, 0.90, 0.87), 0.02), patch * 0.95)
    return frame.rho < 1.0


def _vasc(rng: np.random.Generator, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Vascular lesion (angioma): sharply bordered, red to purple lacunae separated by pale septa."""
    frame = _frame(rng, shape, float(rng.uniform(0.1, 0.2)), 0.1, float(rng.uniform(0.75, 1.0)))
    body = _body(frame, 0.06)
    _blend(image, _jitter(rng, (0.88, 0.72, 0.72), 0.03), body)  # the septa
    red, purple = _jitter(rng, (0.70, 0.10, 0.18), 0.05), _jitter(rng, (0.42, 0.10, 0.34), 0.05)
    mix = np.clip(0.5 + 0.5 * smooth_noise(rng, shape, 0.06), 0, 1)[..., None]
    lacunae = _dots(rng, frame, int(rng.integers(12, 25)), 0.16, (0.0, 0.8)) * body
    _blend(image, red * (1 - mix) + purple * mix, lacunae)
    return frame.rho < 1.0


_PAINTERS: dict[str, Callable[[np.random.Generator, np.ndarray, tuple[int, int]], np.ndarray]] = {
    "akiec": _akiec,
    "bcc": _bcc,
    "bkl": _bkl,
    "df": _df,
    "mel": _mel,
    "nv": _nv,
    "vasc": _vasc,
}


def _hair(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Dark, gently curved hairs crossing the field, lesion included (dermoscopy does not shave)."""
    shape = image.shape[:2]
    layer = np.zeros(shape, np.uint8)
    width = max(1, round(min(shape) / 300))
    for _ in range(count):
        row, col = float(rng.uniform(0, shape[0])), float(rng.uniform(0, shape[1]))
        angle, length = float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.2, 0.7)) * min(shape)
        points = []
        for _ in range(12):
            points.append((round(col), round(row)))
            angle += float(rng.normal(0, 0.08))
            row, col = row + math.sin(angle) * length / 11, col + math.cos(angle) * length / 11
        cv2.polylines(layer, [np.array(points, np.int32)], False, 255, width, cv2.LINE_AA)
    _blend(image, _jitter(rng, (0.18, 0.12, 0.09), 0.05), layer.astype(np.float32) / 255.0 * 0.85)


def _optics(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Uneven illumination, the dermoscope's dark circular vignette (most photographs), white
    balance, blur and sensor noise."""
    shape = image.shape[:2]
    side = min(shape)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    distance = np.hypot(rows - shape[0] / 2, cols - shape[1] / 2) / side
    angle = float(rng.uniform(0, 2 * np.pi))
    ramp = ((cols - shape[1] / 2) * math.cos(angle) + (rows - shape[0] / 2) * math.sin(angle)) / side
    light = (1.0 + float(rng.uniform(0, 0.15)) * ramp) * (1.0 - float(rng.uniform(0, 0.25)) * distance**2)
    image *= light[..., None]
    if rng.random() < 0.75:
        radius = float(rng.uniform(0.55, 0.8))  # of the shorter side; the centre crop stays inside
        inside = np.clip((radius - distance) / 0.02, 0, 1)[..., None]
        image[:] = image * inside + (1 - inside) * float(rng.uniform(0.02, 0.08))
    image *= _jitter(rng, (1.0, 1.0, 1.0), 0.05)
    image[:] = cv2.GaussianBlur(image, (0, 0), max(0.4, side / 600))
    image += rng.normal(0, 0.012, image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def render(rng: np.random.Generator, kind: str, shape: tuple[int, int] = SOURCE_SIZE) -> SkinPhantom:
    """One dermoscopy photograph of a lesion of class ``kind``, (rows, columns) ``shape``."""
    if kind not in _PAINTERS:
        raise ValueError(f"unknown lesion class {kind!r}; there are {', '.join(CLASSES)}")
    image = _skin(rng, shape)
    mask = _PAINTERS[kind](rng, image, shape)
    _hair(rng, image, int(rng.choice([0, 0, 1, 2, 4, 8])))
    return SkinPhantom(_optics(rng, image), mask, kind)


def sample(rng: np.random.Generator, shape: tuple[int, int] = SOURCE_SIZE) -> SkinPhantom:
    """A phantom of a class drawn uniformly: the training set is balanced (the prototype's HAM10000 is
    two-thirds nevi; balance here replaces class weights)."""
    return render(rng, CLASSES[int(rng.integers(len(CLASSES)))], shape)


def dermoscopy_dataset(phantom: SkinPhantom, key: str) -> Dataset:
    """The phantom as a dermatoscope sends it: Dermoscopic Photography Image (Modality DMS), the skin
    as the anatomic region (no Body Part Examined: DICOM defines no term for skin), unpaired."""
    return photograph(
        phantom.rgb,
        key,
        study="Dermoscopy",
        series=f"Dermoscopy of skin lesion ({phantom.kind})",
        body_part="",
        laterality="U",
        region=SKIN,
        sop_class_uid=DermoscopicPhotographyImageStorage,
    )


def write_dermoscopy(folder: Path, kind: str, seed: int, shape: tuple[int, int] = SOURCE_SIZE) -> Path:
    """Render one phantom of ``kind`` and write it as a DICOM file; returns its path."""
    phantom = render(np.random.default_rng(seed), kind, shape)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"dermoscopy-{kind}-{seed}.dcm"
    dermoscopy_dataset(phantom, f"skin-{kind}-{seed}").save_as(path, enforce_file_format=True)
    return path
