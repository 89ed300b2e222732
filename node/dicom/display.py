"""A stored image as a viewer displays it: the one rendering the handlers and the overlays share.

Grey-scale images go through the Modality LUT (rescale), the first VOI transform (a VOI LUT, or a
window with its VOI LUT Function), and are inverted for MONOCHROME1, so bone is white whatever the
detector wrote. Without a VOI, a CT is shown in a soft-tissue window (its values are calibrated HU)
and anything else over its 0.5–99.5 percentile range. Colour photographs are scaled to 8 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

CT_WINDOW = (40.0, 400.0)  # (centre, width) HU: soft tissue, for a CT that brings no window of its own


def display_pixels(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """A grey-scale image → (H, W) float32 in [0, 1] as displayed, bone white. ``frame`` picks one
    frame of a multi-frame image (default: the middle one)."""
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) > 1:
        pixels = pixels[len(pixels) // 2 if frame is None else frame]
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    voi = ds.get("VOILUTSequence")
    if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
        depth = int(voi[0].LUTDescriptor[2])
        shown = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64) / (2.0**depth - 1.0)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        shown = window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), ds.get("VOILUTFunction"))
    elif ds.get("Modality") == "CT":
        shown = window(values, *CT_WINDOW)
    else:
        low, high = np.percentile(values, [0.5, 99.5])
        shown = (values - low) / max(float(high - low), 1e-6)
    shown = np.clip(shown, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        shown = 1.0 - shown
    return shown.astype(np.float32)


def window(values: np.ndarray, centre: float, width: float, function: str | None = None) -> np.ndarray:
    """PS3.3 C.11.2.1.2: the LINEAR, LINEAR_EXACT or SIGMOID VOI LUT function, onto [0, 1] (unclipped)."""
    width = max(width, 1.0)
    kind = str(function or "LINEAR").upper()
    if kind == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if kind == "LINEAR_EXACT":
        return (values - (centre - width / 2.0)) / width
    return (values - (centre - 0.5)) / max(width - 1.0, 1.0) + 0.5


def _first(value: Any) -> float:
    """The first of a multi-valued number (several windows may be offered; the first is the default)."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def rgb8(ds: Dataset) -> np.ndarray:
    """A colour photograph as (H, W, 3) uint8 RGB (pydicom converts YBR colour spaces to RGB); more
    than 8 bits stored are scaled down, not clipped."""
    pixels = ds.pixel_array
    bits = int(ds.get("BitsStored", 8))
    if bits > 8:
        pixels = np.rint(pixels.astype(np.float32) * (255.0 / (2**bits - 1)))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def display_rgb8(ds: Dataset) -> np.ndarray:
    """Any single image (the middle frame of a multi-frame one) as (H, W, 3) uint8 RGB, as displayed."""
    if int(ds.get("SamplesPerPixel") or 1) == 3:
        pixels = rgb8(ds)
        return pixels[len(pixels) // 2] if pixels.ndim == 4 else pixels
    grey = np.rint(display_pixels(ds) * 255.0).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
