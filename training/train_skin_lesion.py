"""Train, measure and package the demonstration dermoscopy skin-lesion classifier, from phantoms only.

    python -m training.train_skin_lesion --out models/skin-lesion

Reproducible (fixed seeds, two threads) and under ten minutes on two CPU cores. Inputs go through
``handlers.skin_lesion.preprocess`` — the same function inference uses — and the measurements are taken
through the real package loader, so what the model card reports is what the node runs.
``--measure-only`` re-measures a saved package without training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from monai.networks.nets import EfficientNet

from handlers.base import Code
from handlers.skin_lesion import DEFAULT_CROP, centre_crop, preprocess
from node.runtime import PackagedModel, load_model
from node.runtime.package import code_table
from training import common
from training.skin_phantom import CLASSES, SkinPhantom, render, sample

NAME = "skin-lesion"
VERSION = "1.0.0"
SEED = 20240611
LABELS = CLASSES
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
INPUT_SIZE = (128, 128)  # the prototype's
# EfficientNet-B3's block arguments (shared by the whole B0–B7 family) at B3's depth (1.4), with the
# width scaled from B3's 1.2 to 0.4 so that it trains on two CPU cores in minutes and fits in 8 MB.
BLOCKS = [
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]
ARCHITECTURE: dict[str, Any] = {
    "blocks_args_str": BLOCKS,
    "spatial_dims": 2,
    "in_channels": 3,
    "num_classes": len(LABELS),
    "width_coefficient": 0.4,
    "depth_coefficient": 1.4,
    "dropout_rate": 0.2,
    "image_size": INPUT_SIZE[0],
    "drop_connect_rate": 0.1,
    # MONAI's default momentum (0.01) leaves the running statistics hundreds of steps behind the weights
    # after a short training: evaluation then drops to ~50 % accuracy. PyTorch's default keeps up.
    "norm": ["batch", {"eps": 1e-3, "momentum": 0.1}],
}
# The head's activation (4×4 here), then global average pooling and "_fc": the CAM fast path applies.
# MONAI's EfficientNet calls one "_swish" module after both its stem and its head; the runtime reads a
# module's last output in the pass, the head's.
TARGET_LAYER = "_swish"
CLASSIFIER = "_fc"
THRESHOLD = 0.5
TRAIN_SHAPES = ((192, 256), (240, 320))  # (rows, columns): crops of 128 and 160 pixels
TEST_SHAPE = (300, 400)
POINTING_TOLERANCE = 0.03  # of the crop side, for the second pointing-game row


def training_example(index: int) -> tuple[np.ndarray, int]:
    """Training photograph ``index``: a model input and its class. Each has its own seed, so the set is
    the same however the work is spread over processes."""
    rng = np.random.default_rng([SEED, index])
    phantom = sample(rng, TRAIN_SHAPES[int(rng.integers(len(TRAIN_SHAPES)))])
    return preprocess(phantom.rgb, INPUT_SIZE, DEFAULT_CROP), LABELS.index(phantom.kind)


def test_phantom(index: int) -> SkinPhantom:
    """Held-out photograph ``index``: classes in turn, seeds disjoint from training's."""
    return render(np.random.default_rng([SEED + 1, index]), LABELS[index % len(LABELS)], TEST_SHAPE)


def augment(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror, flip and transpose at random (a lesion has no up or left), and vary exposure. A network
    that meets every orientation cannot tie its evidence to one side of a lesion, which keeps Grad-CAM
    on it — and lets the runtime average Grad-CAM over flips ([explain] flips)."""
    x, y = common.reorient(x, y, generator, ("mirror", "flip", "transpose"))
    return common.exposure(x, generator), y


def evaluate(model: PackagedModel, phantoms: Sequence[SkinPhantom]) -> dict[str, Any]:
    """Per-class discrimination and the pointing game on held-out phantoms. The heatmap is the one for
    the true class, at the crop's source resolution as the handler shows it; every phantom has a lesion,
    so every case counts."""
    inputs = np.stack([preprocess(p.rgb, model.input_size, DEFAULT_CROP) for p in phantoms])
    labels = np.array([LABELS.index(p.kind) for p in phantoms])
    probabilities = np.concatenate([model.predict(inputs[i : i + 32]) for i in range(0, len(inputs), 32)])
    metrics: dict[str, Any] = common.per_class_metrics(probabilities, labels, LABELS)
    hits: dict[str, list[bool]] = {"strict": [], "tolerant": []}
    for index in range(len(LABELS)):
        chosen = np.flatnonzero(labels == index)
        for start in range(0, len(chosen), 16):
            part = chosen[start : start + 16]
            for i, heatmap in zip(part, model.explain(inputs[part], index), strict=True):
                mask = centre_crop(phantoms[i].mask, DEFAULT_CROP)
                source = cv2.resize(heatmap, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR)
                hits["strict"].append(common.pointing_hit(source, mask))
                hits["tolerant"].append(
                    common.pointing_hit(source, mask, round(POINTING_TOLERANCE * mask.shape[0]))
                )
    metrics["pointing_game"] = float(np.mean(hits["strict"]))
    metrics["pointing_game_tolerant"] = float(np.mean(hits["tolerant"]))
    return metrics


def manifest() -> dict[str, Any]:
    """The package manifest, less weights and sha256 (see node.runtime.package.Manifest)."""
    return {
        "name": NAME,
        "version": VERSION,
        "handler": "skin_lesion",
        "framework": "torch",
        "task": "classification",
        "family": "EfficientNet-B3 classifier",
        "description": "Demonstration dermoscopy skin-lesion classifier (7 HAM10000 classes), MONAI "
        "EfficientNet with EfficientNet-B3's blocks and depth at a third of its width, trained on synthetic "
        "phantoms.",
        "intended_use": "Demonstrating and testing the AI node end to end (DICOM in, Grad-CAM overlays and "
        "structured reports out) on synthetic dermoscopy photographs. Not for use on patients.",
        "disclaimer": common.DISCLAIMER,
        "architecture": {"network": "EfficientNet", "args": ARCHITECTURE},
        "input": {"size": list(INPUT_SIZE), "channels": 3},
        "options": {"crop_fraction": DEFAULT_CROP},
        "labels": [
            {"name": label, "threshold": THRESHOLD, "code": code_table(CLASS_CODES[label])}
            for label in LABELS
        ],
        "explain": {"target_layer": TARGET_LAYER, "classifier": CLASSIFIER, "flips": True},
    }


def model_card(m: dict[str, Any], recipe: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {label} | {CLASS_CODES[label].meaning} (SCT {CLASS_CODES[label].value}) | {c['n']} | "
        f"{c['auc']:.3f} | {c['sensitivity']:.3f} | {c['specificity']:.3f} |"
        for label, c in m["classes"].items()
    )
    return f"""\
# {NAME} {VERSION} — demonstration dermoscopy skin-lesion classifier

> **{common.NOT_FOR_DIAGNOSTIC_USE}** A demonstration model trained only on synthetic dermoscopy phantoms
> generated by this project (`training/skin_phantom.py`). It has never seen a photograph of a patient's
> skin and is not clinically validated. Its figures below describe synthetic data and say nothing about
> performance on real lesions.

## Intended use
Demonstrating and testing the AI node end to end: receiving a dermoscopy photograph (VL Photographic
Image, Modality XC) over DICOM, running the `skin_lesion` handler, and sending a Grad-CAM overlay and a
structured report back. It is not for use on patients, for triage, or for any clinical decision.

## Model
- MONAI `EfficientNet` with EfficientNet-B3's block arguments and depth coefficient (1.4) and the width
  coefficient scaled down from 1.2 to {ARCHITECTURE["width_coefficient"]} (the B3 family, narrowed for CPU),
  2-D, 3 input channels, {len(LABELS)} outputs (softmax over {", ".join(LABELS)}). {recipe["parameters"]:,}
  parameters; weights {recipe["weights_mb"]:.1f} MB.
- Input: the prototype's preprocessing — the centred square of {DEFAULT_CROP:.2f} of the photograph's shorter
  side (300 of 450 rows), resized to {INPUT_SIZE[0]}×{INPUT_SIZE[1]} by area averaging, RGB in [0, 1]
  (`handlers.skin_lesion.preprocess`, the same function at training and inference).
- Output: a probability per class; the handler reports a coded finding for every class (present at
  ≥ {THRESHOLD:.2f}) and names the most likely one.
- Explanation: Grad-CAM on `{TARGET_LAYER}`, the head's activation (4×4 at this input size; MONAI's
  EfficientNet calls that one module after its stem too, and the runtime reads its last call, the
  head's). The head is global average pooling + `{CLASSIFIER}`, so the runtime computes the map as CAM from
  the forward pass alone (the fast path; the same map as by gradients). Maps are averaged over
  mirrored/flipped and half-cell-shifted copies (`[explain] flips`).

## Training data (synthetic)
Dermoscopy-like photographs: skin of random tone with blotchy redness and furrows, 0–8 hairs, uneven
illumination, white-balance shifts, blur, noise and (in three of four) the dark circular vignette of a
contact dermoscope. One lesion per image, centred within the crop, with class-typical structures:
nv round, symmetric, one brown with a regular network; mel large, asymmetric, irregular border, several
colours (black, brown, blue-grey), blue-white veil, atypical network, peripheral globules; bcc pink and
translucent with arborizing vessels and blue-grey ovoid nests; akiec ill-defined red-pink with white-yellow
scale and a strawberry pattern; bkl sharply bordered waxy light brown with ridges, milia-like cysts and
comedo-like openings; df small, a central white patch inside a delicate brown ring; vasc red-purple lacunae
with pale septa. Classes are balanced (HAM10000 is two-thirds nevi; balanced sampling replaces class
weights). {recipe["train_images"]} training images rendered at
{" or ".join(f"{r}×{c}" for r, c in TRAIN_SHAPES)}.
Augmentation: random mirroring, flips, transposition and exposure (±7.5 %).

## Training recipe
AdamW (weight decay 1e-4), one-cycle learning rate peaking at {recipe["lr"]}, batch {recipe["batch"]},
{recipe["epochs"]} epochs, cross-entropy, from random initialisation (no pretrained weights). Seed {SEED},
2 CPU threads; training took {recipe["train_seconds"] / 60:.1f} minutes (whole script
{recipe["total_seconds"] / 60:.1f} minutes).

Reproduce: `python -m training.train_skin_lesion --out models/{NAME}` (same seeds; results can differ
in the last digits on other CPUs or thread counts).

## Measured (held-out synthetic data, never seen in training)
{m["n"]} photographs rendered at {TEST_SHAPE[0]}×{TEST_SHAPE[1]} (classes in turn). Accuracy of the most
likely class {m["accuracy"]:.3f}; macro-averaged one-vs-rest AUC {m["macro_auc"]:.3f}. Sensitivity and
specificity are those of calling a class when it is the most likely one.

| class | concept | n | AUC | sensitivity | specificity |
|---|---|---|---|---|---|
{rows}

| Grad-CAM pointing game (heatmap of the true class) | value |
|---|---|
| peak inside the lesion | {m["pointing_game"]:.3f} |
| peak within {POINTING_TOLERANCE:.0%} of the crop side of the lesion | {m["pointing_game_tolerant"]:.3f} |

The pointing game counts the photographs whose heatmap peak — on the centre crop at source resolution, as
the handler shows it — falls on the lesion's ground-truth mask. Every phantom has a lesion, so every
photograph counts.

CPU cost, batch 1, 2 threads: predict {m["predict_ms"]:.0f} ms per image; {common.explain_costs(m)} per image
(`gradient` and `cam` give the same map; the node takes `cam`).

## Limitations
Synthetic lesions are far simpler than real ones: no collision lesions, no pink melanomas or pigmented
BCCs, no acral or facial patterns, no ruler marks, ink or bubbles, and one scale of magnification. Codes:
the classes are coded with one SNOMED CT concept each (bkl as seborrheic keratosis, vasc as hemangioma,
akiec as actinic keratosis), narrower than the HAM10000 groupings. The prototype this replaces
reported 88 % accuracy on real HAM10000 images; nothing here is comparable.
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = common.arguments(__doc__, NAME, train=3000, test=280, epochs=6, batch=32, lr=3e-3).parse_args(argv)

    log = common.Stopwatch()
    test_phantoms = common.render(test_phantom, args.test)
    log(f"rendered {len(test_phantoms)} held-out photographs")
    recipe = common.train_or_load(
        args,
        manifest(),
        lambda: EfficientNet(**ARCHITECTURE),
        training_example,
        seed=SEED,
        log=log,
        augment=augment,
    )
    model = load_model(args.out)  # measured through the same loader the node uses, sha256 check included
    metrics = evaluate(model, test_phantoms)
    metrics |= common.timings(model, LABELS.index("mel"))
    log(f"measured: {json.dumps(metrics)}")
    common.finish(args, recipe, log.seconds(), lambda recipe: model_card(metrics, recipe))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
