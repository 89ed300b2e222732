"""Train, measure and package the demonstration dermoscopy lesion segmentation model, from phantoms only.

    python -m training.train_skin_segmentation --out models/skin-lesion-segmentation

Reproducible (fixed seeds, two threads) and under ten minutes on two CPU cores. Inputs go through
``handlers.skin_lesion.preprocess`` — the classifier's own preprocessing, so both models see the same
crop — and the measurements are taken through the real package loader (``segment``), so what the model
card reports is what the node runs. ``--measure-only`` re-measures a saved package without training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from handlers.base import Code
from handlers.skin_lesion import DEFAULT_CROP, centre_crop, preprocess
from node.runtime import PackagedModel, load_model
from node.runtime.package import code_table
from training import common
from training.skin_phantom import CLASSES, SkinPhantom, render, sample

NAME = "skin-lesion-segmentation"
VERSION = "1.0.0"
SEED = 20240612
LABELS = ("background", "lesion")
LESION = Code("95324001", "SCT", "Skin lesion")
INPUT_SIZE = (128, 128)
ARCHITECTURE: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": len(LABELS),
    "features": [8, 16, 32, 64, 128, 8],  # a quarter of BasicUNet's default width: fast on CPU, < 1 MB
}
TRAIN_SHAPES = ((192, 256), (240, 320))  # (rows, columns): crops of 128 and 160 pixels
TEST_SHAPE = (300, 400)


def lesion_target(phantom: SkinPhantom) -> np.ndarray:
    """The lesion mask on the model's grid, (1, H, W) float32: the crop the model sees, area-resized and
    cut at half, so a border pixel is lesion when most of it is."""
    crop = centre_crop(phantom.mask, DEFAULT_CROP).astype(np.float32)
    resized = cv2.resize(crop, (INPUT_SIZE[1], INPUT_SIZE[0]), interpolation=cv2.INTER_AREA)
    return (resized >= 0.5).astype(np.float32)[None]


def training_example(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Training photograph ``index`` (classes balanced) and its lesion mask; each has its own seed."""
    rng = np.random.default_rng([SEED, index])
    phantom = sample(rng, TRAIN_SHAPES[int(rng.integers(len(TRAIN_SHAPES)))])
    return preprocess(phantom.rgb, INPUT_SIZE, DEFAULT_CROP), lesion_target(phantom)


def test_phantom(index: int) -> SkinPhantom:
    """Held-out photograph ``index``: classes in turn, seeds disjoint from training's."""
    return render(np.random.default_rng([SEED + 1, index]), CLASSES[index % len(CLASSES)], TEST_SHAPE)


def augment(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror, flip and transpose image and mask together, and vary the image's exposure."""
    x, y = common.reorient(x, y, generator, ("mirror", "flip", "transpose"))
    return common.exposure(x, generator), y


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = (predicted | truth).sum()
    return 1.0 if union == 0 else float((predicted & truth).sum() / union)


def evaluate(model: PackagedModel, phantoms: Sequence[SkinPhantom]) -> dict[str, Any]:
    """Dice and IoU per held-out photograph, at the crop's source resolution (the lesion probability
    resized up and cut at 0.5), overall and per lesion class."""
    inputs = np.stack([preprocess(p.rgb, model.input_size, DEFAULT_CROP) for p in phantoms])
    lesion = list(model.labels).index("lesion")
    maps = np.concatenate([model.segment(inputs[i : i + 16])[:, lesion] for i in range(0, len(inputs), 16)])
    scores: dict[str, list[tuple[float, float]]] = {kind: [] for kind in CLASSES}
    for phantom, probability in zip(phantoms, maps, strict=True):
        truth = centre_crop(phantom.mask, DEFAULT_CROP)
        predicted = (
            cv2.resize(probability, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_LINEAR) >= 0.5
        )
        scores[phantom.kind].append((common.dice(predicted, truth), iou(predicted, truth)))
    everything = [pair for pairs in scores.values() for pair in pairs]
    return {
        "n": len(everything),
        "dice": float(np.mean([d for d, _ in everything])),
        "iou": float(np.mean([i for _, i in everything])),
        "dice_p10": float(np.percentile([d for d, _ in everything], 10)),
        "classes": {
            kind: {
                "n": len(pairs),
                "dice": float(np.mean([d for d, _ in pairs])),
                "iou": float(np.mean([i for _, i in pairs])),
            }
            for kind, pairs in scores.items()
        },
        "segment_ms": common.median_ms(lambda: model.segment(inputs[:1])),
    }


def manifest() -> dict[str, Any]:
    """The package manifest, less weights and sha256 (see node.runtime.package.Manifest)."""
    return {
        "name": NAME,
        "version": VERSION,
        "handler": "skin_lesion",
        "framework": "torch",
        "task": "segmentation",
        "family": "U-Net lesion segmentation",
        "description": "Demonstration dermoscopy skin-lesion segmentation (lesion vs background), MONAI "
        "BasicUNet at a quarter of its default width, trained on synthetic phantoms.",
        "intended_use": "Demonstrating and testing the AI node end to end (outlining the lesion on synthetic "
        "dermoscopy photographs). Not for use on patients.",
        "disclaimer": common.DISCLAIMER,
        "architecture": {"network": "BasicUNet", "args": ARCHITECTURE},
        "input": {"size": list(INPUT_SIZE), "channels": 3},
        "options": {"crop_fraction": DEFAULT_CROP},
        "labels": [{"name": LABELS[0]}, {"name": LABELS[1], "code": code_table(LESION)}],
    }


def model_card(m: dict[str, Any], recipe: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {kind} | {c['n']} | {c['dice']:.3f} | {c['iou']:.3f} |" for kind, c in m["classes"].items()
    )
    return f"""\
# {NAME} {VERSION} — demonstration dermoscopy lesion segmentation

> **{common.NOT_FOR_DIAGNOSTIC_USE}** A demonstration model trained only on synthetic dermoscopy phantoms
> generated by this project (`training/skin_phantom.py`). It has never seen a photograph of a patient's
> skin and is not clinically validated. Its figures below describe synthetic data and say nothing about
> performance on real lesions.

## Intended use
Demonstrating and testing the AI node end to end: outlining the lesion on a dermoscopy photograph received
over DICOM, next to the `skin-lesion` classifier. It is not for use on patients or for any clinical decision.

## Model
- MONAI `BasicUNet` (the prototype used a U-Net with a pretrained ResNet34 encoder; no pretrained weights
  are allowed here), features {ARCHITECTURE["features"]}, 2-D, 3 input channels, 2 outputs (`background`,
  `lesion`, softmax per pixel; lesion coded SNOMED CT {LESION.value} "{LESION.meaning}").
  {recipe["parameters"]:,} parameters; weights {recipe["weights_mb"]:.1f} MB.
- Input: the classifier's preprocessing — the centred square of {DEFAULT_CROP:.2f} of the shorter side,
  resized to {INPUT_SIZE[0]}×{INPUT_SIZE[1]} by area averaging, RGB in [0, 1]
  (`handlers.skin_lesion.preprocess`).
- Output: per-pixel probabilities at {INPUT_SIZE[0]}×{INPUT_SIZE[1]}; the lesion is where its probability
  is ≥ 0.5.

## Training data (synthetic)
The classifier's phantoms (`skin_phantom.py`: skin, hair, illumination, dermoscope vignette, one lesion of one
of the seven HAM10000 classes, balanced), with each lesion's exact mask, area-resized to the model grid and
cut at half. {recipe["train_images"]} training images rendered at
{" or ".join(f"{r}×{c}" for r, c in TRAIN_SHAPES)}. Augmentation: random mirroring, flips and transposition
of image and mask together, and exposure (±7.5 %).

## Training recipe
AdamW (weight decay 1e-4), one-cycle learning rate peaking at {recipe["lr"]}, batch {recipe["batch"]},
{recipe["epochs"]} epochs, Dice + cross-entropy loss (MONAI `DiceCELoss`), from random initialisation.
Seed {SEED}, 2 CPU threads; training took {recipe["train_seconds"] / 60:.1f} minutes (whole script
{recipe["total_seconds"] / 60:.1f} minutes).

Reproduce: `python -m training.train_skin_segmentation --out models/{NAME}` (same seeds; results can
differ in the last digits on other CPUs or thread counts).

## Measured (held-out synthetic data, never seen in training)
{m["n"]} photographs rendered at {TEST_SHAPE[0]}×{TEST_SHAPE[1]} (classes in turn), scored on the centre crop
at source resolution (lesion probability resized up, cut at 0.5) against the exact mask:

| metric | value |
|---|---|
| Dice, mean per image | {m["dice"]:.3f} |
| IoU, mean per image | {m["iou"]:.3f} |
| Dice, 10th percentile | {m["dice_p10"]:.3f} |

| lesion class | n | Dice | IoU |
|---|---|---|---|
{rows}

CPU cost, batch 1, 2 threads: segment {m["segment_ms"]:.0f} ms per image.

## Limitations
Phantom borders are exact and drawn by the same program that makes the images; real lesion borders are
fuzzy and annotators disagree. The prototype reported IoU 0.85 and Dice 0.91 on real HAM10000 masks;
nothing here is comparable.
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = common.arguments(__doc__, NAME, train=2400, test=210, epochs=6, batch=16, lr=3e-3).parse_args(argv)

    log = common.Stopwatch()
    test_phantoms = common.render(test_phantom, args.test)
    log(f"rendered {len(test_phantoms)} held-out photographs")
    recipe = common.train_or_load(
        args,
        manifest(),
        lambda: BasicUNet(**ARCHITECTURE),
        training_example,
        seed=SEED,
        log=log,
        augment=augment,
        loss=DiceCELoss(to_onehot_y=True, softmax=True),
    )
    model = load_model(args.out)  # measured through the same loader the node uses, sha256 check included
    metrics = evaluate(model, test_phantoms)
    log(f"measured: {json.dumps(metrics)}")
    common.finish(args, recipe, log.seconds(), lambda recipe: model_card(metrics, recipe))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
