"""Synthetic close-up eye photographs for conjunctival pallor, with the ground truth of every pixel.

The lower eyelid is pulled down, exposing the palpebral conjunctiva: a red band whose colour pales
continuously as haemoglobin falls. Above it the white sclera and the iris, around it skin, lashes and
the caruncle (red, but not conjunctiva). An :class:`Eye` (the patient) and a :class:`Lighting` (the
camera and room) are drawn separately, so one eye can be photographed under many lightings — the
situation the handler's sclera-based normalisation exists for. Reflectances are linear; the camera
multiplies them by the illumination, applies the sRGB-like gamma, blurs, adds noise and quantises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset

from training.demo_dicom import Code, photograph

HB_RANGE = (6.0, 16.0)  # g/dL, drawn uniformly
# Anaemic below this haemoglobin: WHO's cut-off for pregnancy and children of 6–59 months, used here
# for every phantom (real cut-offs depend on age, sex and pregnancy).
ANEMIA_HB = 11.0
CONJUNCTIVA_PALE = (0.80, 0.50, 0.48)  # linear reflectance at the lowest haemoglobin
CONJUNCTIVA_RED = (0.55, 0.11, 0.13)  # and at the highest
SKIN_LIGHT, SKIN_DARK = (0.72, 0.47, 0.33), (0.26, 0.14, 0.08)
SCLERA = (0.86, 0.84, 0.80)
IRISES = ((0.20, 0.11, 0.06), (0.26, 0.20, 0.10), (0.15, 0.22, 0.30), (0.14, 0.20, 0.14))
GAMMA = 1 / 2.2
KINDS = ("eye", "no_sclera", "dark", "bright")
SOURCE_SIZES = ((240, 320), (300, 400), (360, 480))  # (rows, columns): 4:3 phone-camera crops
STUDY = "External eye photography"
SERIES = "Lower eyelid conjunctiva"
CONJUNCTIVA: Code = ("29445007", "SCT", "Conjunctiva")  # CID 4209 Ophthalmic Anatomic Structure Imaged


@dataclass(frozen=True)
class Eye:
    """One patient's eye. Lengths are fractions of the image width; ``seed`` fixes its textures."""

    hb: float  # g/dL
    side: str  # "L" or "R": the caruncle sits at the nasal corner
    centre: tuple[float, float]  # (row, col) of the eye's centre, fractions of height and width
    half_width: float  # of the palpebral fissure
    angle: float  # tilt, radians
    upper: float  # upper lid height over half_width
    lower: float  # lower limbus depth over half_width
    band: float  # exposed conjunctiva's thickness over half_width
    iris: tuple[float, float, float]  # (dx, dy, radius) over half_width
    conjunctiva: tuple[float, float, float]  # reflectance
    sclera: tuple[float, float, float]
    skin: tuple[float, float, float]
    iris_colour: tuple[float, float, float]
    sclera_visible: bool  # False: a close-up that shows the conjunctiva but not the white of the eye
    seed: int

    @property
    def anemic(self) -> bool:
        return self.hb < ANEMIA_HB


@dataclass(frozen=True)
class Lighting:
    """The room and camera: what the sclera normalisation must cancel (or reject)."""

    exposure: float  # scene brightness multiplier
    gains: tuple[float, float, float]  # colour temperature: warm light raises red, cool light blue
    gradient: tuple[float, float]  # (strength, direction in radians) of a linear brightness ramp
    shadow: tuple[float, float, float, float]  # (row, col, radius, depth): a soft shadow; depth 0 = none
    noise: float  # sensor noise, standard deviation in 8-bit levels
    blur: float  # focus blur, Gaussian sigma as a fraction of the width
    seed: int


@dataclass(frozen=True)
class ConjunctivaPhantom:
    rgb: np.ndarray  # (H, W, 3) uint8, the photograph
    conjunctiva: np.ndarray  # (H, W) bool, the exposed palpebral conjunctiva
    sclera: np.ndarray  # (H, W) bool, the visible white of the eye
    hb: float
    kind: str  # one of KINDS
    side: str

    @property
    def anemic(self) -> bool:
        return self.hb < ANEMIA_HB


def _jitter(rng: np.random.Generator, colour: tuple[float, ...], spread: float) -> tuple[float, float, float]:
    r, g, b = (c * float(rng.uniform(1 - spread, 1 + spread)) for c in colour)
    return (r, g, b)


def conjunctiva_colour(hb: float) -> np.ndarray:
    """Reflectance of a conjunctiva at haemoglobin ``hb``: pale to red, linear in haemoglobin."""
    redness = float(np.clip((hb - HB_RANGE[0]) / (HB_RANGE[1] - HB_RANGE[0]), 0.0, 1.0))
    pale, red = np.array(CONJUNCTIVA_PALE), np.array(CONJUNCTIVA_RED)
    return (pale + (red - pale) * redness).astype(np.float32)


def random_eye(rng: np.random.Generator, hb: float | None = None, sclera_visible: bool = True) -> Eye:
    hb = float(rng.uniform(*HB_RANGE)) if hb is None else hb
    tone = float(rng.uniform(0, 1))
    skin = tuple(lo + (hi - lo) * tone for lo, hi in zip(SKIN_LIGHT, SKIN_DARK, strict=True))
    # Patients of the same haemoglobin differ a little in conjunctival colour: the task is not trivial.
    conjunctiva = conjunctiva_colour(hb) * rng.normal(1.0, 0.035, 3)
    return Eye(
        hb=hb,
        side=str(rng.choice(["L", "R"])),
        centre=(float(rng.uniform(0.36, 0.46)), float(rng.uniform(0.42, 0.58))),
        half_width=float(rng.uniform(0.23, 0.30)),
        angle=float(rng.uniform(-0.12, 0.12)),
        upper=float(rng.uniform(0.38, 0.52)),
        lower=float(rng.uniform(0.22, 0.30)),
        band=float(rng.uniform(0.26, 0.38)),
        iris=(
            float(rng.uniform(-0.15, 0.15)),
            float(rng.uniform(-0.05, 0.08)),
            float(rng.uniform(0.36, 0.44)),
        ),
        conjunctiva=(float(conjunctiva[0]), float(conjunctiva[1]), float(conjunctiva[2])),
        sclera=_jitter(rng, tuple(c * rng.uniform(0.93, 1.03) for c in SCLERA), 0.02),
        skin=_jitter(rng, skin, 0.06),
        iris_colour=_jitter(rng, IRISES[int(rng.integers(len(IRISES)))], 0.15),
        sclera_visible=sclera_visible,
        seed=int(rng.integers(2**31)),
    )


def random_lighting(rng: np.random.Generator, kind: str = "eye") -> Lighting:
    """Lighting of a usable photograph, or one too dark or overexposed to measure the sclera."""
    exposure = {"dark": (0.004, 0.015), "bright": (2.2, 3.5)}.get(kind, (0.3, 0.75))
    temperature, tint = float(rng.uniform(-1, 1)), float(rng.uniform(-0.05, 0.05))
    shadow = (
        (
            float(rng.uniform(0, 1)),
            float(rng.uniform(0, 1)),
            float(rng.uniform(0.15, 0.4)),
            float(rng.uniform(0.1, 0.35)),
        )
        if rng.random() < 0.5
        else (0.0, 0.0, 1.0, 0.0)
    )
    return Lighting(
        exposure=float(math.exp(rng.uniform(math.log(exposure[0]), math.log(exposure[1])))),
        gains=(1.0 + 0.22 * temperature, 1.0 + tint, 1.0 - 0.28 * temperature),
        gradient=(float(rng.uniform(0, 0.3)), float(rng.uniform(0, 2 * np.pi))),
        shadow=shadow,
        noise=float(rng.uniform(0.5, 4.0)),
        blur=float(rng.uniform(0.0, 0.0025)),
        seed=int(rng.integers(2**31)),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A smooth random field of unit standard deviation with features of ``sigma`` pixels."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray | tuple[float, ...]) -> None:
    """Composite ``colour`` (RGB, or an (H, W, 3) image) over ``image`` with coverage ``alpha``."""
    a = alpha[..., None]
    image[:] = image * (1 - a) + np.asarray(colour, np.float32) * a


def _strokes(
    rng: np.random.Generator,
    shape: tuple[int, int],
    roots: np.ndarray,
    directions: np.ndarray,
    length: float,
    width: int,
) -> np.ndarray:
    """Anti-aliased curved strokes (lashes, vessels) from ``roots`` along ``directions``, as coverage."""
    layer = np.zeros(shape, np.float32)
    for (x, y), (dx, dy) in zip(roots, directions, strict=True):
        bend = rng.normal(0, 0.25)
        points = []
        for t in np.linspace(0, 1, 6):
            step = length * t * rng.uniform(0.7, 1.0) if t else 0.0
            points.append((x + step * (dx - bend * dy * t), y + step * (dy + bend * dx * t)))
        cv2.polylines(layer, [np.array(points, np.int32)], False, 1.0, width, cv2.LINE_AA)
    return layer


def _scene(eye: Eye, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear reflectance (H, W, 3) of the left-eye layout, with conjunctiva and sclera masks."""
    rows, cols = shape
    rng = np.random.default_rng(eye.seed)
    a = eye.half_width * cols
    cy, cx = eye.centre[0] * rows, eye.centre[1] * cols
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cos, sin = math.cos(eye.angle), math.sin(eye.angle)
    u = ((xx - cx) * cos + (yy - cy) * sin) / a  # along the eye, -1 at the nasal corner
    v = (-(xx - cx) * sin + (yy - cy) * cos) / a  # down, in half-widths
    profile = np.clip(1 - u**2, 0, None) ** 0.8
    upper_lid, lower_lid = -eye.upper * profile, eye.lower * profile
    opening = (np.abs(u) < 1) & (v > upper_lid) & (v < lower_lid)
    band = eye.band * np.clip(1 - (u / 0.92) ** 2, 0, None) ** 0.6
    conjunctiva = (np.abs(u) < 0.92) & (v >= lower_lid) & (v < lower_lid + band)

    image = np.empty((rows, cols, 3), np.float32)
    skin_texture = 1 + 0.05 * _smooth_noise(rng, shape, 0.02 * cols)
    image[:] = np.asarray(eye.skin, np.float32) * skin_texture[..., None]
    crease = np.exp(-(((v - (upper_lid - 0.35 * np.clip(1 - u**2, 0, None))) / 0.04) ** 2)) * (
        np.abs(u) < 1.1
    )
    _paint(image, 0.35 * crease, np.asarray(eye.skin) * 0.5)

    if eye.sclera_visible:
        idx, idy, radius = eye.iris
        iris_r = np.hypot(u - idx, v - idy)
        iris = opening & (iris_r < radius)
        sclera = opening & ~iris
        # The sclera darkens towards the corners and under the upper lid's shadow.
        shade = (1 - 0.2 * np.abs(u) ** 4) * (1 - 0.15 * np.exp(-(((v - upper_lid) / 0.08) ** 2)))
        white = np.asarray(eye.sclera, np.float32) * shade[..., None]
        _paint(image, sclera.astype(np.float32), white)
        iris_texture = 1 + 0.2 * np.sin(24 * np.arctan2(v - idy, u - idx))[..., None] * (
            iris_r[..., None] / radius
        )
        _paint(image, iris.astype(np.float32), np.asarray(eye.iris_colour, np.float32) * iris_texture)
        pupil = np.clip((0.4 * radius - iris_r) * a, 0, 1) * iris
        _paint(image, pupil, (0.02, 0.02, 0.02))
        highlight = np.clip(
            (0.08 * radius - np.hypot(u - idx + 0.3 * radius, v - idy + 0.3 * radius)) * a, 0, 1
        )
        _paint(image, highlight * iris, (4.0, 4.0, 4.0))  # the flash's reflection on the cornea: clips
        count = int(rng.integers(3, 8))  # episcleral vessels, from the corners inwards
        roots = np.stack(
            [cx + np.sign(rng.uniform(-1, 1, count)) * a * 0.95, cy + rng.uniform(-0.1, 0.15, count) * a], 1
        )
        directions = np.stack([-np.sign(roots[:, 0] - cx), rng.uniform(-0.3, 0.3, count)], 1)
        vessels = _strokes(rng, shape, roots, directions, 0.35 * a, 1) * sclera
        _paint(image, 0.5 * vessels, (0.6, 0.15, 0.15))
    else:  # the upper lid hangs over the eye down to the limbus: skin and lashes, no white
        sclera = np.zeros(shape, bool)
        lid_line = np.exp(-(((v - lower_lid) / 0.03) ** 2)) * (np.abs(u) < 1)
        _paint(image, 0.8 * lid_line, (0.05, 0.04, 0.04))

    caruncle = np.clip((0.11 - np.hypot((u + 0.97) / 1.2, v - 0.02)) * a, 0, 1)
    _paint(image, caruncle, (0.62, 0.25, 0.25))
    # Conjunctiva: deeper red near the fornix, with a fine vessel texture.
    depth = np.clip((v - lower_lid) / np.maximum(band, 1e-3), 0, 1)
    mottled = 1 + 0.06 * _smooth_noise(rng, shape, 0.006 * cols)
    tissue = np.asarray(eye.conjunctiva, np.float32) * (mottled * (1.05 - 0.12 * depth))[..., None]
    edge = np.clip(np.minimum(v - lower_lid, lower_lid + band - v) * a, 0, 1) * (np.abs(u) < 0.92)
    _paint(image, edge.astype(np.float32), tissue)
    count = int(rng.integers(6, 14))
    roots = np.stack(
        [
            cx + rng.uniform(-0.8, 0.8, count) * a,
            cy + (eye.lower + eye.band * rng.uniform(0.2, 0.9, count)) * a,
        ],
        1,
    )
    directions = np.stack([rng.choice([-1.0, 1.0], count), rng.uniform(-0.4, 0.4, count)], 1)
    _paint(
        image,
        0.3 * _strokes(rng, shape, roots, directions, 0.3 * a, 1) * conjunctiva,
        np.asarray(eye.conjunctiva) * 0.6,
    )

    # The lower lid margin below the band, and lashes on both lids pointing away from the eye.
    margin = np.exp(-(((v - lower_lid - band - 0.03) / 0.025) ** 2)) * (np.abs(u) < 1)
    _paint(image, 0.6 * margin, np.asarray(eye.skin) * 0.6)
    for sign in (1.0, -1.0):  # lower lid, upper lid
        count = int(rng.integers(25, 45))
        us = rng.uniform(-0.9, 0.9, count)
        along = np.clip(1 - us**2, 0, None) ** 0.8
        if sign < 0:
            vs = -eye.upper * along
        else:
            vs = eye.lower * along + eye.band * np.clip(1 - (us / 0.92) ** 2, 0, None) ** 0.6 + 0.04
        roots = np.stack([cx + (us * cos - vs * sin) * a, cy + (us * sin + vs * cos) * a], 1)
        directions = np.stack([us * 0.6, np.full(count, sign)], 1)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        length = (0.16 if sign > 0 else 0.28) * a
        lashes = _strokes(rng, shape, roots, directions, length, max(1, round(a / 60)))
        _paint(image, 0.85 * lashes, (0.03, 0.025, 0.02))
    lash_line = np.exp(-(((v - upper_lid) / 0.03) ** 2)) * (np.abs(u) < 1)
    _paint(image, 0.9 * lash_line, (0.03, 0.025, 0.02))
    return image, conjunctiva, sclera


def photograph_eye(eye: Eye, lighting: Lighting, shape: tuple[int, int]) -> ConjunctivaPhantom:
    """The camera's picture of ``eye`` under ``lighting``, ``shape`` = (rows, columns)."""
    reflectance, conjunctiva, sclera = _scene(eye, shape)
    if eye.side == "R":  # the right eye is the left one mirrored: its nasal corner is on the other side
        reflectance, conjunctiva, sclera = reflectance[:, ::-1], conjunctiva[:, ::-1], sclera[:, ::-1]
    rows, cols = shape
    rng = np.random.default_rng(lighting.seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    strength, direction = lighting.gradient
    ramp = (
        1 + strength * ((xx / cols - 0.5) * math.cos(direction) + (yy / rows - 0.5) * math.sin(direction)) * 2
    )
    srow, scol, sradius, sdepth = lighting.shadow
    shadow = 1 - sdepth * np.exp(-(((yy / rows - srow) ** 2 + (xx / cols - scol) ** 2) / (2 * sradius**2)))
    light = (lighting.exposure * ramp * shadow)[..., None] * np.asarray(lighting.gains, np.float32)
    display = np.clip(reflectance * light, 0, 1) ** GAMMA
    if lighting.blur > 0:
        display = cv2.GaussianBlur(display, (0, 0), max(lighting.blur * cols, 0.3))
    display = display * 255 + rng.normal(0, lighting.noise, display.shape)
    kind = "eye" if eye.sclera_visible else "no_sclera"
    if lighting.exposure < 0.05:
        kind = "dark"
    elif lighting.exposure > 1.5:
        kind = "bright"
    return ConjunctivaPhantom(
        rgb=np.clip(display, 0, 255).round().astype(np.uint8),
        conjunctiva=np.ascontiguousarray(conjunctiva),
        sclera=np.ascontiguousarray(sclera),
        hb=eye.hb,
        kind=kind,
        side=eye.side,
    )


def render(
    rng: np.random.Generator,
    kind: str = "eye",
    shape: tuple[int, int] = SOURCE_SIZES[-1],
    hb: float | None = None,
) -> ConjunctivaPhantom:
    """A random photograph of ``kind``: "eye" (analysable), "no_sclera", "dark" or "bright"."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; there are {', '.join(KINDS)}")
    eye = random_eye(rng, hb, sclera_visible=kind != "no_sclera")
    return photograph_eye(eye, random_lighting(rng, kind), shape)


def conjunctiva_dataset(phantom: ConjunctivaPhantom, key: str) -> Dataset:
    """The phantom as an external eye photograph a phone or slit-lamp camera would send: VL
    Photographic Image (Modality XC), body part EYE, the conjunctiva as the anatomic region."""
    return photograph(
        phantom.rgb,
        key,
        study=STUDY,
        series=SERIES,
        body_part="EYE",
        laterality=phantom.side,
        region=CONJUNCTIVA,
    )


def write_conjunctiva(folder: Path, seed: int, kind: str = "eye", hb: float | None = None) -> Path:
    """Render one photograph and write it as a DICOM file; returns its path."""
    phantom = render(np.random.default_rng(seed), kind, hb=hb)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"conjunctiva-{kind}-{seed}.dcm"
    conjunctiva_dataset(phantom, f"conjunctiva-{kind}-{seed}").save_as(path, enforce_file_format=True)
    return path
