"""Synthetic frontal pediatric chest radiographs, with the ground truth of every finding.

No patient data may be used here, yet the chest model must be trained, measured and tested: a phantom
knows exactly where its finding is, so explanations can be scored, not just looked at. Anatomy is drawn
in thorax coordinates — ``u`` across the thorax (-1 and 1 at the inner rib margins, negative on the
image's left, the patient's right, as a PA film is viewed) and ``v`` down it (0 at the lung apices, 1 at
the lateral costophrenic angles) — so any matrix size shows the same chest. Pixel values are as
displayed: 1 is bone-white, 0 black.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
from pydicom import Dataset

from training.demo_dicom import radiograph

FINDINGS = ("pneumonia", "pleural_effusion", "pneumothorax", "cardiomegaly", "atelectasis", "nodule")
NORMAL = "normal"
RIGHT, LEFT = -1, 1  # the patient's sides, as signs of u on a PA film
THORAX_MM = (170.0, 240.0)  # inner thoracic width of a pre-school to early-teen child
NORMAL_CTR = (0.40, 0.49)  # cardiothoracic ratio
ENLARGED_CTR = (0.57, 0.70)
HILUM_V = 0.47
SOFT_TISSUE = 0.58
LUNG_AIR = 0.36  # how much darker aerated lung is than soft tissue


@dataclass(frozen=True)
class Chest:
    """One synthetic child's anatomy and exposure."""

    height: int
    width: int
    centre_x: float  # thorax midline, fraction of the width
    half_width: float  # half the inner thoracic width, fraction of the width
    apex_y: float  # lung apices, fraction of the height
    base_y: float  # costophrenic angles, fraction of the height
    angle: float  # patient rotation in the image plane, radians
    ctr: float  # cardiothoracic ratio
    heart_v: float  # centre of the cardiac silhouette
    domes: tuple[float, float]  # (right, left) hemidiaphragm dome heights in v
    shift: float  # mediastinal shift in u (volume loss pulls it towards the collapsed side)
    gastric_bubble: bool
    rib_spacing: float  # in v
    exposure: tuple[float, float, float]  # (offset, gain, gamma) of the detector's display curve
    noise: float  # quantum noise, standard deviation per pixel
    blur_px: float  # focal spot and detector unsharpness

    @property
    def thorax_px(self) -> float:
        return 2.0 * self.half_width * self.width


@dataclass(frozen=True)
class Radiograph:
    """A rendered image and what it shows: ``lesion`` is where the finding lies (for cardiomegaly, the
    cardiac silhouette), empty for a normal chest."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1], as displayed
    lesion: np.ndarray  # (H, W) bool
    finding: str  # NORMAL or one of FINDINGS
    pixel_spacing_mm: float


def random_chest(rng: np.random.Generator, width: int) -> Chest:
    """A random child: thorax size and position, heart, diaphragm, ribs, exposure and noise."""
    height = int(round(width * rng.uniform(1.0, 1.22)))
    right_dome = float(rng.uniform(0.78, 0.86))
    return Chest(
        height=height,
        width=width,
        centre_x=float(0.5 + rng.normal(0.0, 0.02)),
        half_width=float(rng.uniform(0.34, 0.41)),
        apex_y=float(rng.uniform(0.10, 0.17)),
        base_y=float(rng.uniform(0.70, 0.80)),
        angle=float(np.radians(rng.normal(0.0, 2.5))),
        ctr=float(rng.uniform(*NORMAL_CTR)),
        heart_v=float(rng.uniform(0.74, 0.80)),
        domes=(right_dome, right_dome + float(rng.uniform(0.0, 0.05))),  # the right dome sits higher
        shift=float(rng.normal(0.0, 0.015)),
        gastric_bubble=bool(rng.random() < 0.6),
        rib_spacing=float(rng.uniform(0.10, 0.12)),
        exposure=(
            float(rng.uniform(-0.06, 0.06)),
            float(rng.uniform(0.85, 1.2)),
            float(rng.uniform(0.8, 1.25)),
        ),
        noise=float(rng.uniform(0.008, 0.03)),
        blur_px=float(rng.uniform(0.4, 1.2)) * width / 512.0,
    )


class Frame:
    """Thorax coordinates of every pixel of one chest, and the way back to pixels for drawing."""

    def __init__(self, chest: Chest) -> None:
        self.chest = chest
        yy, xx = np.mgrid[0 : chest.height, 0 : chest.width].astype(np.float32)
        cx, cy = chest.centre_x * chest.width, 0.5 * chest.height
        cos_a, sin_a = math.cos(chest.angle), math.sin(chest.angle)
        x = cos_a * (xx - cx) + sin_a * (yy - cy) + cx
        y = -sin_a * (xx - cx) + cos_a * (yy - cy) + cy
        self.u = (x - cx) / (chest.half_width * chest.width)
        self.v = (y - chest.apex_y * chest.height) / ((chest.base_y - chest.apex_y) * chest.height)

    def to_pixel(self, u: float, v: float) -> tuple[int, int]:
        """(column, row) of thorax point (u, v)."""
        c = self.chest
        cx, cy = c.centre_x * c.width, 0.5 * c.height
        x = u * c.half_width * c.width + cx
        y = v * (c.base_y - c.apex_y) * c.height + c.apex_y * c.height
        cos_a, sin_a = math.cos(c.angle), math.sin(c.angle)
        return (
            int(round(cos_a * (x - cx) - sin_a * (y - cy) + cx)),
            int(round(sin_a * (x - cx) + cos_a * (y - cy) + cy)),
        )

    def px(self, fraction_of_thorax: float) -> float:
        """A length given as a fraction of the thoracic half-width, in pixels."""
        return fraction_of_thorax * self.chest.half_width * self.chest.width


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Unit-variance noise with features about ``scale`` of the image wide."""
    cells = max(2, int(round(1.0 / scale)))
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return field / max(float(field.std()), 1e-6)


def diaphragm(chest: Chest, u: np.ndarray) -> np.ndarray:
    """v of each hemidiaphragm's surface above u: a dome peaking at |u| ≈ 0.45, lowest at the
    costophrenic angle (|u| = 0.95, v = 1)."""
    dome = np.where(u < chest.shift, chest.domes[0], chest.domes[1])
    a = np.abs(u - chest.shift)
    curve = dome + (1.0 - dome) * ((a - 0.45) / 0.5) ** 2
    return np.minimum(curve, 1.0 + 0.4 * (a - 0.95).clip(0.0))


def lateral_border(v: np.ndarray) -> np.ndarray:
    """|u| of the inner chest wall at height v: rounded apices, widest from mid-chest down."""
    t = np.clip(v / 0.42, 0.0, 1.0)
    return 0.95 * np.sqrt(1.0 - (1.0 - t) ** 2) + 0.04 * np.clip(v - 0.42, 0.0, None)


def heart_mask(chest: Chest, f: Frame) -> np.ndarray:
    """The cardiac silhouette: an ellipse two-thirds left of the midline, sitting on the diaphragm."""
    half = chest.ctr * 0.95  # thoracic width is 1.9 in u, so CTR * 1.9 / 2
    centre_u = chest.shift + 0.28 * half
    height = 0.2 + 0.12 * half
    ellipse = ((f.u - centre_u) / half) ** 2 + ((f.v - chest.heart_v) / height) ** 2 < 1.0
    return ellipse & (f.v < diaphragm(chest, f.u) + 0.03)


def lung_masks(chest: Chest, f: Frame, heart: np.ndarray) -> np.ndarray:
    """Aerated lung fields, both sides: inside the chest wall, above the diaphragm, beside the
    mediastinum and outside the heart."""
    mediastinum = 0.1 + 0.04 * np.clip(f.v - 0.3, 0.0, None)
    a = np.abs(f.u - chest.shift * (1.0 - np.abs(f.u)))
    return (
        (f.v > 0.0)
        & (np.abs(f.u) < lateral_border(f.v))
        & (a > mediastinum)
        & (f.v < diaphragm(chest, f.u))
        & ~heart
    )


def vessel_tree(rng: np.random.Generator, chest: Chest, f: Frame, side: int) -> np.ndarray:
    """Pulmonary vessels branching out from one hilum, thinning and fading towards the periphery."""
    out = np.zeros((chest.height, chest.width), np.float32)
    stack = [
        (side * 0.2 + chest.shift, HILUM_V, angle, 0.32, 1.0)
        for angle in np.radians(rng.uniform(-8, 8) + np.array([-80, -45, -15, 15, 45, 80, 110]))
    ]
    while stack:
        u, v, angle, length, weight = stack.pop()
        du, dv = side * math.cos(angle) * length, math.sin(angle) * length * 1.1
        start, end = f.to_pixel(u, v), f.to_pixel(u + du, v + dv)
        thickness = max(1, int(round(f.px(0.018) * weight)))
        cv2.line(out, start, end, 0.09 * weight, thickness, lineType=cv2.LINE_AA)
        if weight > 0.3:
            for turn in (-1.0, 1.0):
                spread = np.radians(rng.uniform(18, 35))
                stack.append((u + du, v + dv, angle + turn * spread, length * 0.72, weight * 0.68))
    return out


def ribs(chest: Chest, f: Frame) -> np.ndarray:
    """Posterior ribs arcing out from the spine and down laterally, clavicles across the apices;
    each a band with brighter cortices."""
    out = np.zeros((chest.height, chest.width), np.float32)
    a = np.abs(f.u - chest.shift)
    lateral = (a > 0.08) & (a < lateral_border(np.clip(f.v, 0.0, None)) + 0.12)
    width = 0.45 * chest.rib_spacing
    for i in range(10):
        centre = -0.06 + i * chest.rib_spacing - 0.08 * a + 0.32 * a**2
        depth = np.abs(f.v - centre) / (width / 2)
        band = lateral & (depth < 1.0)
        out[band] += (0.04 + 0.04 * depth**4)[band]
    clavicle = -0.1 - 0.12 * a + 0.08 * np.sin(np.pi * a)
    band = (a > 0.06) & (a < 1.2) & (np.abs(f.v - clavicle) < 0.035)
    out[band] += 0.1
    return out


def render_chest(chest: Chest, rng: np.random.Generator, finding: str = NORMAL) -> Radiograph:
    """One frontal radiograph of ``chest`` showing ``finding``."""
    if finding != NORMAL and finding not in FINDINGS:
        raise ValueError(f"unknown finding {finding!r}; expected {NORMAL!r} or one of {FINDINGS}")
    side = int(rng.choice([RIGHT, LEFT]))
    if finding == "cardiomegaly":
        chest = replace(chest, ctr=float(rng.uniform(*ENLARGED_CTR)), heart_v=chest.heart_v - 0.02)
    elif finding == "atelectasis":  # volume loss: the hemidiaphragm rises a little on its side
        domes = list(chest.domes)
        domes[1 if side == LEFT else 0] -= float(rng.uniform(0.03, 0.06))
        chest = replace(chest, domes=(domes[0], domes[1]))
    f = Frame(chest)
    shape = (chest.height, chest.width)
    heart = heart_mask(chest, f)
    lungs = lung_masks(chest, f, heart)
    texture = smooth_noise(rng, shape, 0.04)
    fine = smooth_noise(rng, shape, 0.012)

    # Soft tissue of the trunk, neck and shoulders; air around them.
    body = (np.abs(f.u) < 1.2 + 0.1 * f.v.clip(-0.5, 0.5)) & (f.v > -0.25 - 0.4 * np.abs(f.u).clip(0, 1))
    body |= (np.abs(f.u - chest.shift) < 0.35) & (f.v < 0.0)
    image = np.where(body, SOFT_TISSUE - 0.06 * (np.abs(f.u) - 1.0).clip(0.0, None), 0.03).astype(np.float32)
    # Mediastinum, heart and abdomen are denser than the chest wall behind the lungs.
    image[heart] += 0.1
    abdomen = body & (f.v > diaphragm(chest, f.u))
    image[abdomen] += 0.08
    image += 0.07 * np.exp(-(((f.u - chest.shift) / 0.07) ** 2)) * body  # spine
    trachea = (np.abs(f.u - chest.shift * (1.0 - f.v.clip(0, 1))) < 0.035) & (f.v > -0.3) & (f.v < 0.38)
    image[trachea] -= 0.12

    # Aerated lung: darker, brighter at the apices behind the shoulders, with vessel markings.
    lung_air = cv2.GaussianBlur(lungs.astype(np.float32), (0, 0), f.px(0.015))
    image -= lung_air * (LUNG_AIR - 0.1 * np.clip(0.25 - f.v, 0.0, 0.25) / 0.25)
    markings = vessel_tree(rng, chest, f, RIGHT) + vessel_tree(rng, chest, f, LEFT)
    markings = markings * lungs * (1.0 + 0.25 * fine)
    lesion = np.zeros(shape, bool)

    if finding == "pneumothorax":
        lesion, collapsed = _pneumothorax(chest, f, lungs, side, rng)
        markings[lesion] = 0.0
        image[lesion] -= 0.1  # no lung between the pleurae: darker than aerated lung
        edge = cv2.morphologyEx(collapsed.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        image[edge.astype(bool) & lesion] += 0.14  # the visceral pleural line
        image[collapsed & _side(f, chest, side)] += 0.05
    image += markings + 0.012 * texture * lungs

    if finding == "pneumonia":
        lesion = _consolidation(chest, f, lungs, side, rng)
        density = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), f.px(0.03))
        target = SOFT_TISSUE - 0.06 + 0.03 * texture
        image += density * rng.uniform(0.7, 0.95) * (target - image)
        bronchi = vessel_tree(rng, chest, f, side) * lesion
        image -= 1.1 * bronchi  # air bronchograms: lucent branching tubes inside the opacity
    elif finding == "pleural_effusion":
        lesion, density = _effusion(chest, f, side, rng)
        image += density * (SOFT_TISSUE + 0.04 - image)
    elif finding == "atelectasis":
        lesion = _collapse(chest, f, lungs, side, rng)
        density = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), f.px(0.008))
        image += density * rng.uniform(0.85, 1.0) * (SOFT_TISSUE + 0.06 - image)
    elif finding == "nodule":
        lesion = _nodule(chest, f, lungs, heart, rng)
        density = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), f.px(0.006))
        image += density * rng.uniform(0.22, 0.32)
    elif finding == "cardiomegaly":
        lesion = heart.copy()

    if chest.gastric_bubble:
        bubble = ((f.u - chest.shift - 0.4) / 0.17) ** 2 + (
            (f.v - diaphragm(chest, f.u) - 0.1) / 0.06
        ) ** 2 < 1
        image[bubble & abdomen] -= 0.2
    image += ribs(chest, f) * body
    return Radiograph(_expose(image, chest, rng), lesion, finding, _spacing(chest, rng))


def _side(f: Frame, chest: Chest, side: int) -> np.ndarray:
    return (f.u - chest.shift) * side > 0


def _consolidation(
    chest: Chest, f: Frame, lungs: np.ndarray, side: int, rng: np.random.Generator
) -> np.ndarray:
    """Lobar or segmental consolidation: an irregular fluffy region in one lung's upper, middle or lower
    zone."""
    zone = float(rng.choice([0.3, 0.55, 0.75]))
    cu, cv = side * rng.uniform(0.5, 0.7) + chest.shift, zone + rng.uniform(-0.06, 0.06)
    ru, rv = rng.uniform(0.25, 0.4), rng.uniform(0.15, 0.24)
    blob = smooth_noise(rng, lungs.shape, 0.08)
    distance = np.sqrt(((f.u - cu) / ru) ** 2 + ((f.v - cv) / rv) ** 2)
    return lungs & (distance + 0.22 * blob < 1.0) & _side(f, chest, side)


def _effusion(chest: Chest, f: Frame, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pleural fluid filling the costophrenic angle upwards, its surface a meniscus that climbs the
    lateral chest wall; returns (mask: where the fluid lies, density). Fluid pools behind the dome too,
    so the mask reaches below the diaphragm's silhouette as the opacity does."""
    height = rng.uniform(0.14, 0.45)
    meniscus = rng.uniform(0.06, 0.14)
    a = np.abs(f.u - chest.shift)
    surface = 1.0 - height + meniscus * ((0.95 - a).clip(0.0) / 0.95) ** 1.5
    hemithorax = _side(f, chest, side) & (np.abs(f.u) < lateral_border(f.v) + 0.02) & (f.v > 0.0)
    fluid = hemithorax & (f.v > surface) & (f.v < diaphragm(chest, f.u) + 0.25)
    density = np.clip((f.v - surface) / 0.05, 0.0, 1.0) * fluid
    density = cv2.GaussianBlur(density.astype(np.float32), (0, 0), f.px(0.01))
    return fluid, density


def _pneumothorax(
    chest: Chest, f: Frame, lungs: np.ndarray, side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Air between lung and chest wall: the lung shrinks towards its medial base, leaving a lucent rim
    without markings at the apex and the lateral wall; returns (rim, collapsed lung)."""
    scale = 1.0 - rng.uniform(0.2, 0.45)
    anchor_u, anchor_v = chest.shift + side * 0.15, 0.9
    su = anchor_u + (f.u - anchor_u) / scale
    sv = anchor_v + (f.v - anchor_v) / scale
    inside = (sv > 0.0) & (np.abs(su) < lateral_border(sv)) & (sv < diaphragm(chest, su))
    hemithorax = lungs & _side(f, chest, side)
    collapsed = hemithorax & inside
    return hemithorax & ~collapsed, collapsed


def _collapse(chest: Chest, f: Frame, lungs: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """Lobar collapse: a dense wedge with straight, sharp margins against the mediastinum — an upper
    lobe under an elevated fissure, or the right lower lobe above the diaphragm."""
    if side == RIGHT and rng.random() < 0.5:
        hilum = (chest.shift - 0.2, HILUM_V + rng.uniform(-0.08, 0.0))
        corners = [hilum, (chest.shift - 0.3, 1.05), (chest.shift - rng.uniform(0.8, 0.95), 1.05)]
    else:
        hilum = (chest.shift + side * 0.14, HILUM_V + rng.uniform(-0.05, 0.05))
        corners = [
            hilum,
            (chest.shift + side * 0.1, -0.05),
            (chest.shift + side * rng.uniform(0.55, 0.85), 0.02),
        ]
    polygon = np.array([f.to_pixel(u, v) for u, v in corners], np.int32)
    wedge = np.zeros(lungs.shape, np.uint8)
    cv2.fillPoly(wedge, [polygon], 1)
    return lungs & wedge.astype(bool)


def _nodule(
    chest: Chest, f: Frame, lungs: np.ndarray, heart: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A round, well-defined opacity about 2–4 cm across, anywhere in the lungs clear of their edges."""
    radius = rng.uniform(0.1, 0.15)
    margin = cv2.erode(
        lungs.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, int(f.px(radius)))
    )
    rows, cols = np.nonzero(margin & (f.v > 0.12).astype(np.uint8))
    pick = int(rng.integers(len(rows)))
    centre_u, centre_v = f.u[rows[pick], cols[pick]], f.v[rows[pick], cols[pick]]
    aspect = (chest.base_y - chest.apex_y) * chest.height / (chest.half_width * chest.width)
    distance = np.hypot(f.u - centre_u, (f.v - centre_v) * aspect)
    return distance < radius * (1.0 + 0.05 * smooth_noise(rng, lungs.shape, 0.05))


def _expose(attenuation: np.ndarray, chest: Chest, rng: np.random.Generator) -> np.ndarray:
    """The detector's view: unsharpness, a heel-effect gradient, the display curve and quantum noise."""
    image = cv2.GaussianBlur(attenuation, (0, 0), max(chest.blur_px, 0.3))
    image += np.linspace(-0.03, 0.03, chest.height, dtype=np.float32)[:, None] * rng.choice([-1.0, 1.0])
    offset, gain, gamma = chest.exposure
    image = np.clip((image + offset - 0.5) * gain + 0.5, 0.0, 1.0) ** gamma
    image += rng.standard_normal(image.shape, dtype=np.float32) * chest.noise
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _spacing(chest: Chest, rng: np.random.Generator) -> float:
    return float(rng.uniform(*THORAX_MM) / chest.thorax_px)


def sample(rng: np.random.Generator, width: int, finding: str) -> Radiograph:
    """A random child's radiograph at ``width`` columns showing ``finding``."""
    return render_chest(random_chest(rng, width), rng, finding)


def chest_dicom(
    image: Radiograph, key: str, *, monochrome1: bool = False, view_position: str = "PA"
) -> Dataset:
    """``image`` as a DX For Presentation instance of a chest, as a pediatric room would send it."""
    return radiograph(
        image.pixels,
        key,
        study="XR CHEST PEDIATRIC",
        series=f"Chest {view_position}",
        body_part="CHEST",
        view_position=view_position,
        pixel_spacing_mm=image.pixel_spacing_mm,
        monochrome1=monochrome1,
    )
