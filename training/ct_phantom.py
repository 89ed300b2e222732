"""Synthetic head-CT phantoms in Hounsfield units, with the ground truth of every bleed.

No patient data may be used here, yet the hemorrhage model must be trained, measured and tested: a
phantom knows exactly where its bleed is, so explanations can be scored, not just looked at. Lengths are
fractions of the image size, so a 256-pixel phantom is a coarser view of the same anatomy as a
512-pixel one, and a slice level ``z`` in [-1, 1] runs from the skull base to the vertex.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from training.demo_dicom import base_dataset, uid

BLEED_KINDS = ("epidural", "subdural", "intraparenchymal")
FIELD_OF_VIEW_MM = 250.0
SLICE_THICKNESS_MM = 5.0
AIR_HU = -1000.0
CSF_HU = 6.0
STORED_OFFSET = 1024  # stored value = HU + 1024, RescaleIntercept -1024, like most scanners
ANGLE_BINS = 4096


@dataclass(frozen=True)
class Head:
    """One synthetic patient's anatomy, shared by all slices of a series."""

    centre: tuple[float, float]  # (row, col) offset from the image centre, fraction of size
    angle: float  # in-plane rotation, radians
    semi_axes: tuple[float, float]  # inner-table half-widths (lateral, anteroposterior), fraction of size
    outline: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) radial harmonics
    skull: float  # mean skull thickness, fraction of size
    skull_outline: tuple[tuple[int, float, float], ...]
    bone_hu: float
    grey_hu: float
    white_hu: float
    noise_hu: float  # quantum noise per pixel at 512 pixels
    blur_mm: float  # the scanner's point spread (Gaussian sigma): partial volume at every edge
    ventricles: float  # lateral ventricle size factor
    calcified: bool  # pineal / choroid plexus calcification: a bright spot that is not a bleed


@dataclass(frozen=True)
class Bleed:
    """An acute hemorrhage: hyperdense, of one of three shapes, spanning a range of slice levels."""

    kind: str
    angle: float  # where it sits around the head (radians)
    size: float  # thickness (epidural, subdural) or radius (intraparenchymal), fraction of brain radius
    extent: float  # angular half-width (epidural, subdural) or distance of the centre from the middle
    hu: float
    z_centre: float
    z_half: float  # half the level range it spans

    def factor(self, z: float) -> float:
        """How much of the bleed is cut at level z: 1 at its centre, 0 outside its range."""
        u = (z - self.z_centre) / self.z_half
        return math.sqrt(1.0 - u * u) if abs(u) < 1.0 else 0.0


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # (H, W) float32 Hounsfield units
    lesion: np.ndarray  # (H, W) bool, the bleed
    kind: str | None  # the bleed's kind, None when the slice shows none

    @property
    def hemorrhage(self) -> bool:
        return bool(self.lesion.any())


def _harmonics(rng: np.random.Generator, amplitude: float, orders: Sequence[int]) -> tuple:
    return tuple((k, float(rng.uniform(0, amplitude)), float(rng.uniform(0, 2 * np.pi))) for k in orders)


def _modulate(theta: np.ndarray, harmonics: tuple) -> np.ndarray:
    out = np.ones_like(theta)
    for k, amplitude, phase in harmonics:
        out += amplitude * np.cos(k * theta + phase)
    return out


def random_head(rng: np.random.Generator) -> Head:
    return Head(
        centre=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        angle=float(rng.uniform(-0.3, 0.3)),
        semi_axes=(float(rng.uniform(0.26, 0.32)), float(rng.uniform(0.32, 0.39))),
        outline=_harmonics(rng, 0.03, (2, 3, 4, 5)),
        skull=float(rng.uniform(0.012, 0.028)),
        skull_outline=_harmonics(rng, 0.25, (1, 2, 3, 5)),
        bone_hu=float(rng.uniform(1000, 1700)),
        grey_hu=float(rng.uniform(34, 44)),
        white_hu=float(rng.uniform(22, 31)),
        noise_hu=float(rng.uniform(3, 9)),
        blur_mm=float(rng.uniform(0.2, 0.6)),
        ventricles=float(rng.uniform(0.6, 1.5)),
        calcified=bool(rng.random() < 0.4),
    )


def random_bleed(rng: np.random.Generator, z_centre: float, z_half: float) -> Bleed:
    kind = BLEED_KINDS[int(rng.integers(len(BLEED_KINDS)))]
    if kind == "epidural":
        size, extent = rng.uniform(0.08, 0.2), rng.uniform(0.25, 0.55)
    elif kind == "subdural":
        size, extent = rng.uniform(0.035, 0.09), rng.uniform(0.5, 1.2)
    else:
        size, extent = rng.uniform(0.06, 0.2), rng.uniform(0.1, 0.6)
    return Bleed(
        kind=kind,
        angle=float(rng.uniform(-np.pi, np.pi)),
        size=float(size),
        extent=float(extent),
        hu=float(rng.uniform(55, 90)),
        z_centre=float(z_centre),
        z_half=float(z_half),
    )


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A smooth random field with unit standard deviation; sigma is a fraction of size. Drawn on a grid
    as coarse as its smoothness allows and interpolated up, which is many times faster at 512."""
    step = max(1, int(sigma * size / 2))
    coarse = rng.standard_normal((size // step + 1, size // step + 1), dtype=np.float32)
    field = cv2.GaussianBlur(coarse, (0, 0), sigma * size / step)
    field = cv2.resize(field, (size + step, size + step), interpolation=cv2.INTER_LINEAR)[:size, :size]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _level_scale(z: float) -> float:
    """The head's cross-section shrinks towards the skull base and the vertex."""
    return math.sqrt(max(1.0 - (0.72 * z) ** 2, 0.1))


def _bleed_mask(
    bleed: Bleed,
    z: float,
    u: np.ndarray,
    v: np.ndarray,
    rho: np.ndarray,
    theta: np.ndarray,
    radius: float,
    texture: np.ndarray,
) -> np.ndarray:
    factor = bleed.factor(z)
    if factor == 0.0:
        return np.zeros(rho.shape, bool)
    brain = rho < 1.0
    if bleed.kind == "intraparenchymal":
        r_blob = bleed.size * radius * factor
        cu = bleed.extent * radius * math.cos(bleed.angle)
        cv = bleed.extent * radius * math.sin(bleed.angle)
        distance = np.hypot(u - cu, v - cv) / (r_blob * (1.0 + 0.18 * texture))
        return brain & (distance < 1.0)
    offset = (theta - bleed.angle + np.pi) % (2 * np.pi) - np.pi
    half_width = bleed.extent * (0.5 + 0.5 * factor)
    along = np.clip(np.abs(offset) / half_width, 0.0, 1.0)
    # An epidural bleed is a lens (thickest in the middle); a subdural one a crescent of even thickness.
    profile = (1.0 - along**2) ** 0.8 if bleed.kind == "epidural" else (1.0 - along**4) ** 0.5
    thickness = bleed.size * radius * factor * profile * (1.0 + 0.1 * texture)
    return brain & (np.abs(offset) < half_width) & ((1.0 - rho) * radius < thickness)


def render(head: Head, z: float, size: int, rng: np.random.Generator, bleed: Bleed | None = None) -> Phantom:
    """One axial slice of ``head`` at level ``z`` (HU), with the part of ``bleed`` this level cuts."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy = yy - (0.5 + head.centre[0]) * size
    dx = xx - (0.5 + head.centre[1]) * size
    cos_a, sin_a = math.cos(head.angle), math.sin(head.angle)
    u = cos_a * dx + sin_a * dy  # left-right
    v = -sin_a * dx + cos_a * dy  # front-back
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    scale = _level_scale(z)
    a, b = head.semi_axes[0] * size * scale, head.semi_axes[1] * size * scale
    # Outline and skull thickness depend on the angle only: computed once per angle bin, then looked up.
    angles = np.linspace(-np.pi, np.pi, ANGLE_BINS, endpoint=False, dtype=np.float32) + np.pi / ANGLE_BINS
    bins = ((theta + np.pi) * (ANGLE_BINS / (2 * np.pi))).astype(np.int32) % ANGLE_BINS
    ellipse = a * b / np.sqrt((b * np.cos(angles)) ** 2 + (a * np.sin(angles)) ** 2)
    inner = (ellipse * _modulate(angles, head.outline))[bins]
    skull = (head.skull * size * _modulate(angles, head.skull_outline).clip(0.5, None))[bins]
    rho = r / inner
    radius = math.sqrt(a * b)

    img = np.full((size, size), AIR_HU, np.float32)
    depth = (r - inner) / skull  # 0 at the inner table, 1 at the outer
    img[depth < 1.0 + 0.012 * size / skull] = 35.0  # scalp
    bone = (depth >= 0.0) & (depth < 1.0)
    diploe = 1.0 - 0.55 * np.exp(-(((depth - 0.5) / 0.18) ** 2))
    img[bone] = (head.bone_hu * diploe)[bone]

    brain = rho < 1.0
    texture = _smooth_noise(rng, size, 0.03)
    fine = _smooth_noise(rng, size, 0.006)
    img[brain] = head.grey_hu
    white = brain & (rho * (1.0 + 0.06 * texture) < 0.74)
    img[white] = head.white_hu
    img[brain & (rho > 0.8) & (fine > 1.3)] = CSF_HU + 4.0  # sulci
    img[brain & ((1.0 - rho) * radius < 0.006 * size)] = CSF_HU  # CSF under the inner table

    nu, nv = u / a, v / b  # head-relative coordinates
    ventricle_level = max(0.0, 1.0 - ((z - 0.1) / 0.5) ** 2)
    if ventricle_level > 0:
        w, h = 0.09 * head.ventricles * ventricle_level, 0.3 * ventricle_level
        for side in (-1.0, 1.0):
            horns = ((nu - side * 0.11) / w) ** 2 + ((nv + 0.02) / h) ** 2 < 1.0
            img[brain & horns] = CSF_HU
    falx = brain & (np.abs(nu) < 0.008) & (np.abs(nv) > 0.35)
    img[falx] = head.grey_hu + 12.0
    if head.calcified and abs(z - 0.05) < 0.25:
        img[brain & (np.hypot(nu, nv - 0.32) < 0.025)] = 250.0

    lesion = np.zeros((size, size), bool)
    if bleed is not None:
        lesion = _bleed_mask(bleed, z, u, v, rho, theta, radius, texture)
        img[lesion] = bleed.hu + 4.0 * fine[lesion]
        if bleed.kind == "intraparenchymal":  # oedema: a hypodense rim, about 2 mm, around the bleed
            width = max(1, round(size / 128))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
            rim = cv2.dilate(lesion.astype(np.uint8), kernel).astype(bool) & ~lesion & brain
            img[rim] -= 8.0

    blurred = cv2.GaussianBlur(img, (0, 0), head.blur_mm * size / FIELD_OF_VIEW_MM)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * (head.noise_hu * size / 512)
    hu = np.clip(blurred + (1.5 * texture + noise), -1024.0, 3071.0).astype(np.float32)
    return Phantom(hu, lesion, bleed.kind if bleed is not None and lesion.any() else None)


def sample_slice(rng: np.random.Generator, size: int = 512, p_hemorrhage: float = 0.5) -> Phantom:
    """A random slice of a random head; with probability ``p_hemorrhage`` it cuts a visible bleed."""
    head = random_head(rng)
    z = float(rng.uniform(-0.85, 0.9))
    if rng.random() >= p_hemorrhage:
        return render(head, z, size, rng)
    while True:
        z_half = float(rng.uniform(0.15, 0.4))
        bleed = random_bleed(rng, z + float(rng.uniform(-0.8, 0.8)) * z_half, z_half)
        phantom = render(head, z, size, rng, bleed)
        if phantom.lesion.sum() >= 2e-4 * size * size:
            return phantom


def head_ct_volume(
    n_slices: int, hemorrhage: bool, seed: int, size: int = 512
) -> tuple[list[float], list[Phantom]]:
    """The slices of one synthetic head from skull base to vertex: (positions in mm, phantoms). With
    ``hemorrhage`` a bleed spans a contiguous run of slices in the middle of the head."""
    rng = np.random.default_rng(seed)
    head = random_head(rng)
    levels = np.linspace(-0.85, 0.9, n_slices)
    bleed = None
    if hemorrhage:
        step = float(levels[1] - levels[0]) if n_slices > 1 else 1.0
        centre = float(rng.uniform(-0.2, 0.5))
        bleed = random_bleed(rng, centre, step * float(rng.uniform(2.5, 5.0)))
    positions = [float(i * SLICE_THICKNESS_MM) for i in range(n_slices)]
    return positions, [render(head, float(z), size, rng, bleed) for z in levels]


def _series_dataset(phantom: Phantom, position_mm: float, number: int, key: str, size: int) -> Dataset:
    spacing = FIELD_OF_VIEW_MM / size
    ds = base_dataset(
        key,
        CTImageStorage,
        "CT",
        study="CT HEAD WITHOUT CONTRAST",
        series="Head 5mm axial",
        body_part="HEAD",
        instance=number,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionDate, ds.AcquisitionTime = ds.ContentDate, ds.ContentTime
    ds.ManufacturerModelName = "Head CT phantom"
    ds.PatientName = "PHANTOM^HEAD"
    ds.SliceThickness = f"{SLICE_THICKNESS_MM:.1f}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    origin = -FIELD_OF_VIEW_MM / 2 + spacing / 2
    ds.ImagePositionPatient = [f"{origin:.4f}", f"{origin:.4f}", f"{position_mm:.2f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uid(key, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{position_mm:.2f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    ds.RescaleIntercept = str(-STORED_OFFSET)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = np.rint(phantom.hu + STORED_OFFSET).clip(-32768, 32767).astype("<i2")
    ds.PixelData = stored.tobytes()
    return ds


def head_ct_series(n_slices: int = 30, *, hemorrhage: bool, seed: int, size: int = 512) -> list[Dataset]:
    """One synthetic non-contrast head CT series as CT Image Storage datasets, skull base first; the
    same seed gives the same series, UIDs included."""
    positions, phantoms = head_ct_volume(n_slices, hemorrhage, seed, size)
    return [
        _series_dataset(phantom, position, index + 1, f"head-ct-{seed}", size)
        for index, (position, phantom) in enumerate(zip(positions, phantoms, strict=True))
    ]


def write_head_ct_series(
    out_dir: str | Path, n_slices: int = 30, *, hemorrhage: bool, seed: int, size: int = 512
) -> list[Path]:
    """Write :func:`head_ct_series` as DICOM files and return their paths sorted by file name. File
    names are shuffled against slice position, as a PACS may send them, so a reader must sort by
    geometry."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(seed + 1).permutation(n_slices)
    paths = []
    for name, ds in zip(
        names, head_ct_series(n_slices, hemorrhage=hemorrhage, seed=seed, size=size), strict=True
    ):
        path = out / f"CT{int(name):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return sorted(paths)
