"""Synthetic colour fundus photographs with the ground truth of every lesion.

No patient photograph may be used here, yet the fundus model must be trained, measured and tested: a
phantom knows exactly where its lesions are, so explanations can be scored, not just looked at. A
photograph shows a round field of view on black: orange-red retina, the optic disc on the nasal side
(right of the image for a right eye, left for a left eye), the macula about 2.5 disc diameters
temporal to it, and a vessel tree that leaves the disc in four arcades. Lengths are in disc diameters
(DD), so a small phantom is a coarser view of the same fundus as a large one.

Diseases, each with its lesion mask:

- diabetic retinopathy: microaneurysms, dot and blot haemorrhages, hard exudates (often in rings) and
  cotton-wool spots scattered over the posterior pole;
- age-related macular degeneration: drusen around the fovea, with pigment clumps, geographic atrophy or
  a neovascular membrane with a haemorrhage rim at the macula;
- branch retinal vein occlusion: one temporal vein dilated and tortuous beyond an arteriovenous
  crossing, with flame haemorrhages and cotton-wool spots in the sector it drains (the engorged vein
  belongs to the lesion mask too).

The camera adds what real photographs vary in: exposure, colour cast, vignetting, uneven illumination,
defocus, sensor noise, dust on the lens, the size and position of the field of view (clipped at the
top and bottom in some cameras) and the image's aspect ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.uid import OphthalmicPhotography8BitImageStorage

from training.demo_dicom import Code, photograph

CLASSES = ("normal", "diabetic_retinopathy", "macular_degeneration", "branch_vein_occlusion")
LATERALITIES = ("R", "L")
STUDY = "Colour fundus photography"
SERIES = "Fundus photographs, both eyes"
RETINA: Code = ("5665001", "SCT", "Retina")  # CID 4209 Ophthalmic Anatomic Structure Imaged


@dataclass
class Fundus:
    """One synthetic fundus photograph and what it shows."""

    rgb: np.ndarray  # (H, W, 3) uint8
    label: int  # index into CLASSES
    laterality: str  # "R" or "L"
    lesion: np.ndarray  # (H, W) bool: every lesion pixel of the disease (empty for normal)
    fov: np.ndarray  # (H, W) bool: the camera's field of view
    disc: tuple[float, float]  # (row, col) of the optic disc centre
    fovea: tuple[float, float]  # (row, col) of the fovea
    disc_diameter: float  # pixels

    @property
    def disease(self) -> str:
        return CLASSES[self.label]


@dataclass
class _Eye:
    """Geometry of one eye in the image: eye-local (u temporal, v superior, in DD) → pixels."""

    disc: np.ndarray  # (x, y) pixels
    fovea: np.ndarray
    dd: float  # disc diameter in pixels
    temporal: np.ndarray  # unit vector (x, y) towards the temporal side
    superior: np.ndarray  # unit vector (x, y) upwards on the retina

    def px(self, u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
        """Eye-local (u, v) in DD from the disc centre → (..., 2) pixel (x, y)."""
        u, v = np.asarray(u, float), np.asarray(v, float)
        return self.disc + self.dd * (u[..., None] * self.temporal + v[..., None] * self.superior)


@dataclass
class _Vessel:
    """A polyline with a width (pixels) per point."""

    points: np.ndarray  # (N, 2) x, y
    widths: np.ndarray  # (N,)
    children: list[_Vessel] = field(default_factory=list)


@dataclass
class _Canvas:
    """The retina being painted: float RGB in [0, 1] (before the camera) and the lesion mask."""

    rgb: np.ndarray
    lesion: np.ndarray  # uint8 0/1

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


# Colours relative to the background they lie on (multiplied) or absolute (painted over), RGB.
_RED_LESION = np.array([0.42, 0.62, 0.62])  # haemorrhage: darkens, most in green and blue
_EXUDATE = np.array([1.0, 0.9, 0.45])
_COTTON_WOOL = np.array([0.96, 0.9, 0.8])
_DRUSEN = np.array([0.98, 0.85, 0.48])
_PIGMENT = np.array([0.3, 0.28, 0.3])  # darkens to brown-black
_MEMBRANE = np.array([0.55, 0.55, 0.42])  # grey-green neovascular membrane


def _blob(
    canvas: _Canvas, centre: np.ndarray, axes: tuple[float, float], angle_deg: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A filled ellipse as a float alpha mask with soft edges, limited to its bounding box for speed:
    returns (alpha, (y0, y1, x0, x1))."""
    height, width = canvas.shape
    reach = int(math.ceil(max(axes) + 3))
    x0, y0 = max(int(centre[0]) - reach, 0), max(int(centre[1]) - reach, 0)
    x1, y1 = min(int(centre[0]) + reach + 1, width), min(int(centre[1]) + reach + 1, height)
    patch = np.zeros((max(y1 - y0, 1), max(x1 - x0, 1)), np.uint8)
    if x1 > x0 and y1 > y0:
        shift = 4  # cv2 draws with sub-pixel precision in fixed point
        cv2.ellipse(
            patch,
            (round((centre[0] - x0) * 16), round((centre[1] - y0) * 16)),
            (max(round(axes[0] * 16), 8), max(round(axes[1] * 16), 8)),
            angle_deg,
            0,
            360,
            255,
            thickness=-1,
            lineType=cv2.LINE_AA,
            shift=shift,
        )
    return patch.astype(np.float32) / 255.0, (y0, y1, x0, x1)


def _darken(canvas: _Canvas, alpha: np.ndarray, box: tuple[int, int, int, int], factor: np.ndarray) -> None:
    y0, y1, x0, x1 = box
    if y1 <= y0 or x1 <= x0:
        return
    a = alpha[..., None]
    canvas.rgb[y0:y1, x0:x1] *= 1.0 - a * (1.0 - factor)


def _paint(canvas: _Canvas, alpha: np.ndarray, box: tuple[int, int, int, int], colour: np.ndarray) -> None:
    y0, y1, x0, x1 = box
    if y1 <= y0 or x1 <= x0:
        return
    a = alpha[..., None]
    canvas.rgb[y0:y1, x0:x1] = canvas.rgb[y0:y1, x0:x1] * (1.0 - a) + colour * a


def _mark(canvas: _Canvas, alpha: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Add a lesion to the ground truth where it is at least half visible."""
    y0, y1, x0, x1 = box
    if y1 > y0 and x1 > x0:
        canvas.lesion[y0:y1, x0:x1] |= (alpha >= 0.5).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Low-frequency noise with unit standard deviation and features about ``scale`` pixels wide."""
    small = (max(2, round(shape[0] / scale)), max(2, round(shape[1] / scale)))
    noise = cv2.resize(
        rng.standard_normal(small).astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC
    )
    return noise / max(float(noise.std()), 1e-6)


# --- anatomy -----------------------------------------------------------------------------------------


def _arcade(rng: np.random.Generator, eye: _Eye, superior: bool, vein: bool, width_dd: float) -> _Vessel:
    """A temporal arcade: leaves the disc, arches over (or under) the macula about 2 DD from the fovea
    and runs on towards the temporal periphery."""
    sign = 1.0 if superior else -1.0
    height = rng.uniform(1.7, 2.3) + (0.15 if vein else 0.0)
    bend = rng.uniform(0.55, 0.9)
    spread = rng.uniform(0.05, 0.2)
    u = np.linspace(0.0, 9.0, 160)
    v = sign * (height * np.tanh(u / bend) + spread * u)
    v += 0.08 * np.sin(u * rng.uniform(1.5, 3.0) + rng.uniform(0, 2 * np.pi)) * np.minimum(u, 1.0)
    v += sign * rng.uniform(0.05, 0.2) * (1 if vein else -1) * np.minimum(u, 0.5)  # vein and artery apart
    widths = eye.dd * width_dd * np.interp(u, [0, 3, 9], [1.0, 0.8, 0.45])
    return _Vessel(eye.px(u, v), widths)


def _nasal(rng: np.random.Generator, eye: _Eye, superior: bool, vein: bool, width_dd: float) -> _Vessel:
    """A nasal vessel: leaves the disc towards the nasal periphery, gently curving."""
    sign = 1.0 if superior else -1.0
    angle = math.radians(rng.uniform(25, 60)) * sign + (0.08 if vein else -0.08) * sign
    curve = rng.uniform(-0.06, 0.06)
    steps = np.arange(120) * 0.06
    angles = angle + curve * steps
    du, dv = -np.cos(angles) * 0.06, np.sin(angles) * 0.06  # -u is nasal
    u, v = np.cumsum(du) - du[0], np.cumsum(dv) - dv[0]
    widths = eye.dd * width_dd * np.interp(steps, [0, 7], [0.9, 0.45])
    return _Vessel(eye.px(u, v), widths)


def _branches(rng: np.random.Generator, vessel: _Vessel, eye: _Eye, depth: int) -> None:
    """Side branches every ~1 DD along a vessel, each a curving random walk, recursively."""
    n = len(vessel.points)
    position = int(rng.integers(12, 25))
    side = 1.0 if rng.random() < 0.5 else -1.0
    fovea = eye.fovea
    while position < n - 5:
        direction = vessel.points[min(position + 1, n - 1)] - vessel.points[position - 1]
        heading = math.atan2(direction[1], direction[0]) + side * math.radians(rng.uniform(30, 70))
        width = float(vessel.widths[position]) * rng.uniform(0.5, 0.75)
        length = eye.dd * rng.uniform(1.0, 3.0) * (1.0 if depth == 0 else 0.6)
        step = eye.dd * 0.08
        points = [vessel.points[position].copy()]
        turn = rng.normal(0, 0.02)
        for _ in range(max(3, int(length / step))):
            heading += turn + rng.normal(0, 0.06)
            nxt = points[-1] + step * np.array([math.cos(heading), math.sin(heading)])
            if np.hypot(*(nxt - fovea)) < 0.45 * eye.dd:  # the foveal avascular zone stays empty
                break
            points.append(nxt)
        if len(points) >= 3:
            widths = np.linspace(width, max(width * 0.5, 0.6), len(points))
            child = _Vessel(np.array(points), widths)
            if depth < 1:
                _branches(rng, child, eye, depth + 1)
            vessel.children.append(child)
        position += int(rng.integers(10, 22))
        side = -side


def _draw_vessel(mask: np.ndarray, vessel: _Vessel) -> None:
    """Rasterise a vessel and its branches into an alpha mask; sub-pixel vessels are drawn faint
    rather than too wide."""
    fixed = np.rint(vessel.points * 16).astype(int).tolist()  # cv2 draws in 1/16 pixel (shift 4)
    thickness = np.maximum(1, np.rint(vessel.widths)).astype(int).tolist()
    opacity = np.minimum(1.0, vessel.widths).tolist()
    for i in range(1, len(fixed)):
        cv2.line(mask, fixed[i - 1], fixed[i], opacity[i], thickness[i], cv2.LINE_AA, shift=4)
    for child in vessel.children:
        _draw_vessel(mask, child)


def _tortuous(rng: np.random.Generator, vessel: _Vessel, eye: _Eye, start: int, dilation: float) -> None:
    """Dilate a vein beyond ``start`` and make it wind: the back-pressure of an occlusion upstream."""
    points = vessel.points
    tangent = np.gradient(points, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-6)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]) / eye.dd
    ramp = np.clip((arc - arc[start]) / 0.4, 0.0, 1.0)
    wiggle = rng.uniform(0.1, 0.2) * np.sin(2 * np.pi * arc / rng.uniform(0.6, 1.0) + rng.uniform(0, 6.3))
    vessel.points = points + (eye.dd * wiggle * ramp)[:, None] * normal
    vessel.widths = vessel.widths * (1.0 + (dilation - 1.0) * ramp)
    for child in vessel.children:
        child.widths = child.widths * (1.0 + 0.5 * (dilation - 1.0))


@dataclass
class _Tree:
    veins: list[_Vessel]  # superotemporal, inferotemporal, superonasal, inferonasal
    arteries: list[_Vessel]


def _vessel_tree(rng: np.random.Generator, eye: _Eye) -> _Tree:
    vein_w, artery_w = rng.uniform(0.11, 0.14), rng.uniform(0.08, 0.1)
    veins = [
        _arcade(rng, eye, True, True, vein_w),
        _arcade(rng, eye, False, True, vein_w),
        _nasal(rng, eye, True, True, vein_w * 0.8),
        _nasal(rng, eye, False, True, vein_w * 0.8),
    ]
    arteries = [
        _arcade(rng, eye, True, False, artery_w),
        _arcade(rng, eye, False, False, artery_w),
        _nasal(rng, eye, True, False, artery_w * 0.8),
        _nasal(rng, eye, False, False, artery_w * 0.8),
    ]
    for vessel in veins + arteries:
        _branches(rng, vessel, eye, 0)
    return _Tree(veins, arteries)


def _paint_vessels(canvas: _Canvas, tree: _Tree) -> None:
    for vessels, factor in (
        (tree.arteries, np.array([0.78, 0.5, 0.5])),
        (tree.veins, np.array([0.55, 0.3, 0.35])),
    ):
        mask: np.ndarray = np.zeros(canvas.shape, np.float32)
        for vessel in vessels:
            _draw_vessel(mask, vessel)
        mask = cv2.GaussianBlur(mask, (0, 0), 0.6)
        canvas.rgb *= 1.0 - mask[..., None] * (1.0 - factor)


def _background(rng: np.random.Generator, shape: tuple[int, int], eye: _Eye) -> np.ndarray:
    """Orange-red retina with choroidal texture, the darker macula and a slight foveal reflex."""
    base = np.array([rng.uniform(0.78, 0.95), rng.uniform(0.3, 0.45), rng.uniform(0.1, 0.2)], np.float32)
    texture = (
        1.0 + 0.05 * _smooth_noise(rng, shape, eye.dd * 0.8) + 0.03 * _smooth_noise(rng, shape, eye.dd * 0.2)
    )
    if rng.random() < 0.3:  # tessellated fundus: choroidal vessels showing through a thin epithelium
        stripes = (np.abs(_smooth_noise(rng, shape, eye.dd * 0.35)) < 0.25).astype(np.float32)
        texture *= 1.0 - 0.08 * cv2.GaussianBlur(stripes, (0, 0), eye.dd * 0.03)
    rgb = texture[..., None] * base
    xx = (np.arange(shape[1], dtype=np.float32) - np.float32(eye.fovea[0])) / np.float32(eye.dd)
    yy = (np.arange(shape[0], dtype=np.float32) - np.float32(eye.fovea[1])) / np.float32(eye.dd)
    r2 = xx[None, :] ** 2 + yy[:, None] ** 2
    macula = np.float32(rng.uniform(0.18, 0.3)) * np.exp(-r2 / np.float32(0.8))
    rgb *= 1.0 - macula[..., None] * np.array([0.5, 1.0, 0.8], np.float32)
    rgb += np.float32(rng.uniform(0.0, 0.12)) * np.exp(-r2 / np.float32(0.004))[..., None]  # foveal reflex
    return rgb


def _disc(rng: np.random.Generator, canvas: _Canvas, eye: _Eye) -> None:
    """The optic disc: a pale yellow-pink oval with a brighter cup, slightly taller than wide."""
    radius = eye.dd / 2
    alpha, box = _blob(canvas, eye.disc, (radius * 0.92, radius * 1.05), rng.uniform(-10, 10))
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(radius * 0.08, 0.5))
    _paint(canvas, alpha, box, np.array([1.0, 0.78, 0.55]) * rng.uniform(0.85, 1.0))
    cup = eye.disc + eye.temporal * radius * rng.uniform(0.05, 0.2)
    c = rng.uniform(0.3, 0.55) * radius
    alpha, box = _blob(canvas, cup, (c, c * rng.uniform(1.0, 1.2)), 0.0)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(c * 0.3, 0.5))
    _paint(canvas, alpha * 0.8, box, np.array([1.0, 0.95, 0.85]))


# --- lesions -----------------------------------------------------------------------------------------


def _posterior_pole(rng: np.random.Generator, eye: _Eye, n: int) -> np.ndarray:
    """n random points between the arcades (within ~3 DD of the fovea), off the disc: where diabetic
    lesions gather."""
    points: list[np.ndarray] = []
    while len(points) < n:
        u = rng.uniform(-0.5, 5.0)
        v = rng.uniform(-2.3, 2.3)
        if (u - 2.5) ** 2 / 3.0**2 + v**2 / 2.3**2 <= 1.0 and u**2 + v**2 > 0.8**2:
            points.append(eye.px(u, v))
    return np.array(points).reshape(n, 2)


def _red_dot(canvas: _Canvas, point: np.ndarray, r: float, rng: np.random.Generator) -> None:
    """A microaneurysm or dot/blot haemorrhage: a dark red round spot."""
    alpha, box = _blob(canvas, point, (r, r * rng.uniform(0.7, 1.0)), rng.uniform(0, 180))
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(r * 0.15, 0.5))
    _darken(canvas, alpha, box, _RED_LESION * rng.uniform(0.8, 1.05))
    _mark(canvas, alpha, box)


def _around(rng: np.random.Generator, centre: np.ndarray, spread: float, ring: bool = False) -> np.ndarray:
    """A random point within ``spread`` pixels of ``centre`` (in a ring at 0.7–1 of it)."""
    angle = rng.uniform(0, 2 * np.pi)
    distance = spread * (rng.uniform(0.7, 1.0) if ring else math.sqrt(rng.random()))
    return centre + distance * np.array([math.cos(angle), math.sin(angle)])


def _diabetic_retinopathy(rng: np.random.Generator, canvas: _Canvas, eye: _Eye) -> None:
    """Leaking foci — a cluster of microaneurysms and blot haemorrhages with hard exudates packed around
    it, sometimes in a circinate ring — plus scattered dots and cotton-wool spots."""
    severity = rng.uniform(0.3, 1.0)
    dd = eye.dd
    for centre in _posterior_pole(rng, eye, int(rng.integers(1, 4))):
        for _ in range(int(4 + 10 * severity)):
            _red_dot(canvas, _around(rng, centre, 0.4 * dd), dd * rng.uniform(0.025, 0.045), rng)
        for _ in range(int(2 + 5 * severity)):
            _red_dot(canvas, _around(rng, centre, 0.35 * dd), dd * rng.uniform(0.06, 0.15), rng)
        ring = rng.random() < 0.3
        spread = dd * rng.uniform(0.35, 0.6)
        for _ in range(int(rng.integers(8, 20))):
            r = dd * rng.uniform(0.04, 0.1)
            alpha, box = _blob(
                canvas,
                _around(rng, centre, spread, ring),
                (r, r * rng.uniform(0.6, 1.0)),
                rng.uniform(0, 180),
            )
            _paint(canvas, alpha * rng.uniform(0.7, 0.95), box, _EXUDATE)
            _mark(canvas, alpha, box)
    for point in _posterior_pole(rng, eye, int(3 + 12 * severity)):  # scattered microaneurysms and dots
        _red_dot(canvas, point, dd * rng.uniform(0.025, 0.08), rng)
    for point in _posterior_pole(rng, eye, int(rng.integers(0, 1 + round(2 * severity)))):  # cotton-wool
        r = dd * rng.uniform(0.15, 0.3)
        alpha, box = _blob(canvas, point, (r, r * 0.65), rng.uniform(0, 180))
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(r * 0.3, 0.5))
        _paint(canvas, alpha * 0.75, box, _COTTON_WOOL)
        _mark(canvas, alpha, box)


def _macular_degeneration(rng: np.random.Generator, canvas: _Canvas, eye: _Eye) -> None:
    dd = eye.dd
    for _ in range(int(rng.integers(15, 50))):  # drusen, densest at the fovea
        distance, angle = dd * 1.1 * rng.random() ** 1.5, rng.uniform(0, 2 * np.pi)
        point = eye.fovea + distance * np.array([math.cos(angle), math.sin(angle)])
        r = dd * rng.uniform(0.05, 0.16)
        alpha, box = _blob(canvas, point, (r, r * rng.uniform(0.8, 1.0)), 0)
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(r * 0.3, 0.5))
        _paint(canvas, alpha * rng.uniform(0.45, 0.85), box, _DRUSEN)
        _mark(canvas, alpha, box)
    kind = rng.choice(["drusen", "pigment", "atrophy", "neovascular"], p=[0.3, 0.3, 0.2, 0.2])
    if kind == "pigment":
        for _ in range(int(rng.integers(3, 12))):
            point = eye.fovea + dd * 0.8 * rng.uniform(-1, 1, 2)
            r = dd * rng.uniform(0.04, 0.1)
            alpha, box = _blob(canvas, point, (r, r * rng.uniform(0.4, 1.0)), rng.uniform(0, 180))
            _darken(canvas, alpha * 0.8, box, _PIGMENT)
            _mark(canvas, alpha, box)
    elif kind == "atrophy":  # geographic atrophy: pale, sharply bounded, choroidal vessels visible
        r = dd * rng.uniform(0.35, 0.8)
        centre = eye.fovea + dd * rng.uniform(-0.3, 0.3, 2)
        alpha, box = _blob(canvas, centre, (r, r * rng.uniform(0.65, 1.0)), rng.uniform(0, 180))
        y0, y1, x0, x1 = box
        stripes = 1.0 - 0.25 * (np.abs(_smooth_noise(rng, alpha.shape, dd * 0.12)) < 0.3)
        colour = np.array([1.0, 0.72, 0.5]) * stripes[..., None]
        region = canvas.rgb[y0:y1, x0:x1]
        canvas.rgb[y0:y1, x0:x1] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        _mark(canvas, alpha, box)
    elif kind == "neovascular":  # a grey-green membrane under the fovea, ringed by fresh blood
        r = dd * rng.uniform(0.3, 0.6)
        centre = eye.fovea + dd * rng.uniform(-0.2, 0.2, 2)
        ring, box = _blob(canvas, centre, (r * 1.5, r * 1.35), rng.uniform(0, 180))
        ring = cv2.GaussianBlur(ring, (0, 0), max(r * 0.1, 0.5))
        _darken(canvas, ring, box, _RED_LESION * 0.85)
        _mark(canvas, ring, box)
        alpha, box = _blob(canvas, centre, (r, r * 0.85), rng.uniform(0, 180))
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(r * 0.15, 0.5))
        y0, y1, x0, x1 = box
        _paint(canvas, alpha * 0.85, box, _MEMBRANE * float(canvas.rgb[y0:y1, x0:x1, 0].mean() + 0.25))


def _vein_occlusion(rng: np.random.Generator, canvas: _Canvas, eye: _Eye, tree: _Tree) -> None:
    """Branch retinal vein occlusion of a temporal arcade vein: beyond the arteriovenous crossing where
    it is blocked, the vein is dilated and tortuous and its sector fills with flame haemorrhages, which
    follow the nerve-fibre layer (along the vessels)."""
    vein = tree.veins[0 if rng.random() < 0.6 else 1]  # the superotemporal branch is blocked most often
    dd = eye.dd
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(vein.points, axis=0), axis=1))]) / dd
    start = int(np.searchsorted(arc, rng.uniform(0.8, 2.0)))
    _tortuous(rng, vein, eye, start, rng.uniform(1.5, 1.9))
    inside = np.nonzero((arc > arc[start]) & (arc < arc[start] + rng.uniform(3.5, 6.0)))[0]
    engorged = np.rint(vein.points[inside] * 16).astype(np.int32)  # the dilated vein is a lesion too
    cv2.polylines(
        canvas.lesion, [engorged], False, 1, max(1, round(float(vein.widths[inside].mean()))), shift=4
    )
    sites = [
        (vein.points[i], vein.points[min(i + 1, len(arc) - 1)] - vein.points[max(i - 1, 0)])
        for i in inside.tolist()
    ]
    for child in vein.children:  # the branches that drain into the blocked segment
        joined = np.argmin(np.linalg.norm(vein.points - child.points[0], axis=1))
        if arc[start] < arc[joined] < arc[start] + 6.0:
            sites += [
                (p, child.points[min(i + 1, len(child.points) - 1)] - child.points[max(i - 1, 0)])
                for i, p in enumerate(child.points)
            ]
    count = int(rng.integers(25, 60))
    for index in rng.choice(len(sites), size=min(count, len(sites)), replace=False):
        point, tangent = sites[int(index)]
        normal = np.array([-tangent[1], tangent[0]]) / max(float(np.linalg.norm(tangent)), 1e-6)
        centre = point + normal * dd * rng.normal(0, 0.3)
        length, width = dd * rng.uniform(0.2, 0.45), dd * rng.uniform(0.06, 0.13)
        angle = math.degrees(math.atan2(tangent[1], tangent[0])) + rng.normal(0, 12)
        alpha, box = _blob(canvas, centre, (length, width), angle)
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(width * 0.35, 0.5))  # feathered: flame-shaped
        _darken(canvas, alpha, box, _RED_LESION * rng.uniform(0.85, 1.05))
        _mark(canvas, alpha, box)
    for index in rng.choice(len(sites), size=min(int(rng.integers(0, 4)), len(sites)), replace=False):
        point, _ = sites[int(index)]
        r = dd * rng.uniform(0.15, 0.28)
        alpha, box = _blob(canvas, point + dd * rng.normal(0, 0.4, 2), (r, r * 0.65), rng.uniform(0, 180))
        alpha = cv2.GaussianBlur(alpha, (0, 0), max(r * 0.3, 0.5))
        _paint(canvas, alpha * 0.7, box, _COTTON_WOOL)
        _mark(canvas, alpha, box)


# --- the camera --------------------------------------------------------------------------------------


def _camera(
    rng: np.random.Generator, retina: np.ndarray, fov: np.ndarray, centre: np.ndarray, radius: float
) -> np.ndarray:
    """Exposure, colour cast, vignetting, uneven light, defocus, dust, noise and the black surround."""
    height, width = fov.shape
    xx = (np.arange(width, dtype=np.float32) - np.float32(centre[0])) / np.float32(radius)
    yy = (np.arange(height, dtype=np.float32) - np.float32(centre[1])) / np.float32(radius)
    rho2 = xx[None, :] ** 2 + yy[:, None] ** 2
    steep = np.float32(rng.uniform(0.0, 1.0))  # how sharply the light falls off towards the edge
    light = 1.0 - np.float32(rng.uniform(0.15, 0.55)) * rho2 * ((1.0 - steep) + steep * rho2)
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.25)
    light *= 1.0 + np.float32(slope) * (
        xx[None, :] * np.float32(math.cos(angle)) + yy[:, None] * np.float32(math.sin(angle))
    )
    gain = (rng.uniform(0.6, 1.15) * rng.uniform(0.88, 1.12, 3)).astype(np.float32)  # exposure, white balance
    canvas = _Canvas(retina * light[..., None] * gain, np.zeros(fov.shape, np.uint8))
    for _ in range(int(rng.integers(0, 3))):  # dust on the lens: soft grey shadows, not lesions
        r = radius * rng.uniform(0.02, 0.05)
        alpha, box = _blob(canvas, centre + radius * rng.uniform(-0.8, 0.8, 2), (r, r), 0)
        alpha = cv2.GaussianBlur(alpha, (0, 0), r * 0.4)
        _darken(canvas, alpha, box, np.full(3, 1.0 - rng.uniform(0.1, 0.25), np.float32))
    rgb: np.ndarray = canvas.rgb
    blur = rng.uniform(0.0, 1.0) * radius / 250.0
    if blur > 0.3:
        rgb = cv2.GaussianBlur(rgb, (0, 0), blur)
    edge = cv2.GaussianBlur(fov.astype(np.float32), (0, 0), max(radius / 200.0, 0.6))
    rgb = rgb * edge[..., None] + np.float32(rng.uniform(0.0, 0.02))
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(rng.uniform(0.004, 0.015))
    gamma = (np.arange(256) / 255.0) ** rng.uniform(0.85, 1.2) * 255.0  # the camera's tone curve
    return cv2.LUT(np.clip(rgb * 255.0, 0, 255).astype(np.uint8), np.rint(gamma).astype(np.uint8))


def render(
    rng: np.random.Generator, label: int, laterality: str, height: int, width: int | None = None
) -> Fundus:
    """One photograph of class ``label`` (index into CLASSES) of the ``laterality`` eye."""
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality is 'R' or 'L', got {laterality!r}")
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label is an index into {CLASSES}, got {label}")
    width = width or height
    radius = height * rng.uniform(0.44, 0.56)  # above 0.5 the field is clipped at the top and bottom
    centre = np.array([width / 2, height / 2]) + radius * rng.uniform(-0.05, 0.05, 2)
    yy, xx = np.mgrid[:height, :width]
    fov = np.hypot(xx - centre[0], yy - centre[1]) <= radius

    nasal = 1.0 if laterality == "R" else -1.0  # a right eye's disc is on the image's right
    tilt = math.radians(rng.uniform(-10, 10))  # image (x, y) directions rotated by the camera's tilt
    temporal = np.array([-nasal * math.cos(tilt), -nasal * math.sin(tilt)])
    superior = np.array([math.sin(tilt), -math.cos(tilt)])
    dd = radius * rng.uniform(0.11, 0.16)
    fovea = centre + temporal * radius * rng.uniform(-0.05, 0.2)
    disc = fovea - temporal * dd * rng.uniform(2.3, 2.7) + superior * dd * rng.uniform(0.0, 0.3)
    eye = _Eye(disc, fovea, dd, temporal, superior)

    canvas = _Canvas(_background(rng, (height, width), eye), np.zeros((height, width), np.uint8))
    tree = _vessel_tree(rng, eye)
    disease = CLASSES[label]
    if disease == "branch_vein_occlusion":
        _vein_occlusion(rng, canvas, eye, tree)  # dilates a vein before the tree is painted
    _paint_vessels(canvas, tree)
    _disc(rng, canvas, eye)
    if disease == "diabetic_retinopathy":
        _diabetic_retinopathy(rng, canvas, eye)
    elif disease == "macular_degeneration":
        _macular_degeneration(rng, canvas, eye)
    rgb = _camera(rng, canvas.rgb, fov, centre, radius)
    return Fundus(
        rgb=rgb,
        label=label,
        laterality=laterality,
        lesion=canvas.lesion.astype(bool) & fov,
        fov=fov,
        disc=(float(disc[1]), float(disc[0])),
        fovea=(float(fovea[1]), float(fovea[0])),
        disc_diameter=float(dd),
    )


def sample(rng: np.random.Generator, sizes: Sequence[int], label: int | None = None) -> Fundus:
    """A random photograph: class uniform unless given, random eye, a height from ``sizes`` and a
    camera aspect ratio of 1:1, 4:3 or 3:2."""
    label = int(rng.integers(len(CLASSES))) if label is None else label
    height = int(rng.choice(sizes))
    width = round(height * float(rng.choice([1.0, 4 / 3, 1.5])))
    return render(rng, label, str(rng.choice(LATERALITIES)), height, width)


def fundus_dataset(fundus: Fundus, key: str, instance: int = 1) -> Dataset:
    """The photograph as a fundus camera sends it: Ophthalmic Photography 8 Bit (Modality OP), body
    part EYE, the retina as the anatomic region, Image Laterality set."""
    ds = photograph(
        fundus.rgb,
        key,
        study=STUDY,
        series=SERIES,
        body_part="EYE",
        laterality=fundus.laterality,
        region=RETINA,
        sop_class_uid=OphthalmicPhotography8BitImageStorage,
    )
    ds.InstanceNumber = instance
    return ds


def write_fundus_study(
    folder: Path, labels: dict[str, int], seed: int, height: int = 512, key: str = "fundus"
) -> list[Path]:
    """Write one series with a photograph per eye (``{"R": label, "L": label}``) to ``folder``: the
    same patient, study and series, one instance per eye. Returns the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    first: Dataset | None = None
    for instance, (laterality, label) in enumerate(sorted(labels.items(), reverse=True), start=1):
        rng = np.random.default_rng([seed, instance])
        fundus = render(rng, label, laterality, height, round(height * 4 / 3))
        ds = fundus_dataset(fundus, f"{key}-{laterality}", instance)
        first = first or ds
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber"):
            setattr(ds, keyword, first.get(keyword))
        path = folder / f"{instance:02d}-{laterality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
