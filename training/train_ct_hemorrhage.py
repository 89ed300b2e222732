"""Train, measure and package the demonstration head-CT hemorrhage model, from synthetic phantoms only.

    python -m training.train_ct_hemorrhage --out models/ct-hemorrhage

Reproducible (fixed seeds, two threads) and under ten minutes on two CPU cores. Inputs go through
``handlers.ct_hemorrhage.preprocess`` — the same function inference uses — and the measurements are
taken through the real package loader, so what the model card reports is what the node runs.
``--measure-only`` re-measures a saved package without training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBottleneck

from handlers.base import Code, Model
from handlers.ct_hemorrhage import (
    DEFAULT_WINDOWS,
    HEMORRHAGE_LABEL,
    CTHemorrhageHandler,
    preprocess,
    source_heatmap,
)
from node.runtime import PackagedModel, load_model
from node.runtime.package import code_table
from training import common
from training.ct_phantom import FIELD_OF_VIEW_MM, Phantom, head_ct_series, sample_slice

NAME = "ct-hemorrhage"
VERSION = "1.0.0"
SEED = 20240601
LABELS = ("normal", "hemorrhage")
HEMORRHAGE = Code("1386000", "SCT", "Intracranial hemorrhage")  # what the hemorrhage label reports
INPUT_SIZE = (128, 128)  # square: training transposes slices
MAX_SHIFT = 8  # pixels of random translation in training
ARCHITECTURE: dict[str, Any] = {
    "block": "bottleneck",
    "layers": [3, 4, 6, 3],  # ResNet50's depth
    "block_inplanes": [16, 32, 64, 128],  # a quarter of ResNet50's width: small enough for CPU and 8 MB
    "spatial_dims": 2,
    "n_input_channels": 3,
    "num_classes": len(LABELS),
    "conv1_t_stride": 2,  # the classic ResNet stem; MONAI's default stride 1 costs 4x on CPU
}
TARGET_LAYER = "layer4"  # the last block, as in Grad-CAM's paper; 4x4 at this input size
THRESHOLD = 0.5
TRAIN_SOURCE_SIZES = (256, 320, 384, 448, 512)
TEST_SOURCE_SIZE = 512
POINTING_TOLERANCE_MM = 6.0
OPTIONS: dict[str, Any] = {
    "windows": [list(w) for w in DEFAULT_WINDOWS],
    "aggregation": "top_k_mean",
    "top_k": 2,
    "explain_slices": 3,
    "min_slices": 5,
}


def training_example(index: int) -> tuple[np.ndarray, int]:
    """Training slice ``index``: a model input and its label. Each slice has its own seed, so the set
    is the same however the work is spread over processes; its matrix size varies so the model meets
    partial-volume edges as scanners of different resolution produce them."""
    rng = np.random.default_rng([SEED, index])
    phantom = sample_slice(rng, int(rng.choice(TRAIN_SOURCE_SIZES)), p_hemorrhage=0.5)
    return preprocess(phantom.hu, INPUT_SIZE, DEFAULT_WINDOWS), int(phantom.hemorrhage)


def augment(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror, transpose and shift slices at random. A bleed stays a bleed under all of these, and a
    network that meets every orientation cannot tie its evidence to one side of a lesion, which keeps
    Grad-CAM centred on it (with left-right mirroring alone the peak sat ~6 pixels above bleeds)."""
    x, y = common.reorient(x, y, generator, ("mirror", "flip", "transpose"))
    return common.shift(x, generator, MAX_SHIFT), y  # the border is air


def network() -> ResNet:
    net = ResNet(**ARCHITECTURE)
    for block in net.modules():  # each residual block starts as identity: a 50-layer net then trains
        if isinstance(block, ResNetBottleneck):  # from scratch in a few hundred steps (Goyal et al. 2017)
            torch.nn.init.zeros_(block.bn3.weight)
    return net


def pointing_game(model: Model, phantoms: Sequence[Phantom], tolerances_px: Sequence[int]) -> list[float]:
    """For each tolerance: the share of slices with a bleed whose Grad-CAM peak, at source resolution
    as the handler shows it, lies inside the bleed's mask dilated by that many pixels."""
    positives = [p for p in phantoms if p.hemorrhage]
    label = list(model.labels).index("hemorrhage")
    peaks = []
    for start in range(0, len(positives), 8):
        chunk = positives[start : start + 8]
        batch = np.stack([preprocess(p.hu, model.input_size, DEFAULT_WINDOWS) for p in chunk])
        for phantom, heatmap in zip(chunk, model.explain(batch, label), strict=True):
            shape = phantom.hu.shape
            peaks.append(np.unravel_index(int(np.argmax(source_heatmap(heatmap, phantom.hu))), shape))
    shares = []
    for tolerance in tolerances_px:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
        pairs = zip(positives, peaks, strict=True)
        hits = [cv2.dilate(p.lesion.astype(np.uint8), kernel)[peak] for p, peak in pairs]
        shares.append(float(np.mean(hits)))
    return shares


def evaluate(model: Model, phantoms: Sequence[Phantom], threshold: float) -> dict[str, float]:
    """Slice-level discrimination and explanation quality on held-out phantoms."""
    inputs = np.stack([preprocess(p.hu, model.input_size, DEFAULT_WINDOWS) for p in phantoms])
    labels = np.array([int(p.hemorrhage) for p in phantoms])
    label = list(model.labels).index("hemorrhage")
    scores = np.concatenate([model.predict(inputs[i : i + 32])[:, label] for i in range(0, len(inputs), 32)])
    called = scores >= threshold
    spacing = FIELD_OF_VIEW_MM / phantoms[0].hu.shape[0]
    pointing, strict = pointing_game(model, phantoms, [round(POINTING_TOLERANCE_MM / spacing), 0])
    return {
        "slices": len(phantoms),
        "positives": int(labels.sum()),
        "auc": common.auc(scores, labels),
        "sensitivity": float(called[labels == 1].mean()),
        "specificity": float(1.0 - called[labels == 0].mean()),
        "accuracy": float((called == labels.astype(bool)).mean()),
        "pointing_game": pointing,
        "pointing_game_strict": strict,
    }


def evaluate_series(model: PackagedModel, n_each: int, seed: int, size: int) -> dict[str, float]:
    """Study-level calls through the handler itself, on whole synthetic series."""
    handler = CTHemorrhageHandler()
    correct = {True: 0, False: 0}
    for index in range(2 * n_each):
        hemorrhage = index % 2 == 0
        series = head_ct_series(30, hemorrhage=hemorrhage, seed=seed + index, size=size)
        analysis = handler.analyse(series, model, model.manifest.options)
        correct[hemorrhage] += analysis.findings[0].present == hemorrhage
    return {
        "series": 2 * n_each,
        "series_sensitivity": correct[True] / n_each,
        "series_specificity": correct[False] / n_each,
    }


def manifest() -> dict[str, Any]:
    """The package manifest, less weights and sha256 (see node.runtime.package.Manifest)."""
    return {
        "name": NAME,
        "version": VERSION,
        "handler": "ct_hemorrhage",
        "framework": "torch",
        "family": "ResNet50 classifier",
        "description": "Demonstration head-CT intracranial hemorrhage classifier (per axial slice), MONAI "
        "ResNet with ResNet50's bottleneck depth at a quarter of its width, trained on synthetic phantoms.",
        "intended_use": "Demonstrating and testing the AI node end to end (DICOM in, Grad-CAM overlays and "
        "structured reports out) on synthetic non-contrast head CT. Not for use on patients.",
        "disclaimer": common.DISCLAIMER,
        "architecture": {"network": "ResNet", "args": ARCHITECTURE},
        "input": {"size": list(INPUT_SIZE), "channels": 3},
        "options": OPTIONS,
        "labels": [
            {"name": LABELS[0]},
            {"name": HEMORRHAGE_LABEL, "threshold": THRESHOLD, "code": code_table(HEMORRHAGE)},
        ],
        "explain": {"target_layer": TARGET_LAYER, "classifier": "fc", "flips": True},
    }


def model_card(metrics: dict[str, Any], recipe: dict[str, Any]) -> str:
    m = metrics
    return f"""\
# {NAME} {VERSION} — demonstration head-CT hemorrhage model

> **NOT FOR DIAGNOSTIC USE.** A demonstration model trained only on synthetic phantoms generated by this
> project (`training/ct_phantom.py`). It has never seen a patient's CT and is not clinically validated.
> Its figures below describe synthetic data and say nothing about performance on real scans.

## Intended use
Demonstrating and testing the AI node end to end: receiving a non-contrast head CT series over DICOM,
running the `ct_hemorrhage` handler, and sending Grad-CAM overlays and a structured report back. It is
not for use on patients, for triage, or for any clinical decision.

## Model
- MONAI `ResNet`, bottleneck blocks, layers [3, 4, 6, 3] (ResNet50's depth), block_inplanes
  [16, 32, 64, 128] (a quarter of ResNet50's width), stem stride 2, 2-D, 3 input channels, 2 outputs
  (`normal`, `hemorrhage`, softmax). {recipe["parameters"]:,} parameters; weights
  {recipe["weights_mb"]:.1f} MB.
- Input: one axial slice in HU, window-levelled into three channels — brain (40/80), subdural (80/200),
  bone (600/2800) — resized to {INPUT_SIZE[0]}×{INPUT_SIZE[1]} by area averaging
  (`handlers.ct_hemorrhage.preprocess`, the same function at training and inference).
- Output: per-slice probability of hemorrhage; the handler aggregates the slices (`{OPTIONS["aggregation"]}`,
  top_k {OPTIONS["top_k"]}) into the study probability and calls a finding at ≥ {THRESHOLD:.2f}
  (SNOMED CT 1386000 "Intracranial hemorrhage").
- Explanation: Grad-CAM on `{TARGET_LAYER}`, a 4×4 map at this input size,
  made usable for millimetre-sized bleeds by averaging it over 16 copies of the input — mirrored and/or
  flipped, and shifted by half a cell — each mapped back; cells are placed at the centre of their
  receptive field (MONAI's default upsampler puts them half a cell down and right). The handler keeps
  the map to the inside of the skull.

## Training data (synthetic)
Phantom slices from skull base to vertex with a skull ring of varying thickness and shape, grey/white
matter texture, sulci, ventricles, falx, optional calcification (a bright non-bleed), scanner blur and
noise; random head size, position and rotation. Half the slices show an acute bleed of 55–90 HU: epidural
lens, subdural crescent or intraparenchymal blob with oedema rim, of random size and location.
{recipe["train_slices"]} training slices, each rendered at a matrix size drawn from
{", ".join(map(str, TRAIN_SOURCE_SIZES))} (so partial-volume edges look as scanners of different resolution
make them). Augmentation: random mirroring, up-down flips, transposition and shifts of up to
{MAX_SHIFT} pixels.

## Training recipe
AdamW (weight decay 1e-4), one-cycle learning rate peaking at {recipe["lr"]}, batch {recipe["batch"]},
{recipe["epochs"]} epochs, cross-entropy, balanced classes, from random initialisation (no pretrained
weights) with each residual block's last batch-norm scale set to zero. Seed {SEED},
2 CPU threads; training took {recipe["train_seconds"] / 60:.1f} minutes (whole script
{recipe["total_seconds"] / 60:.1f} minutes).

Reproduce: `python -m training.train_ct_hemorrhage --out models/{NAME}` (same seeds; results can
differ in the last digits on other CPUs or thread counts).

## Measured (held-out synthetic data, never seen in training)
Slice level, {m["slices"]} slices rendered at {TEST_SOURCE_SIZE}×{TEST_SOURCE_SIZE} ({m["positives"]} with a
bleed), threshold {THRESHOLD:.2f}:

| metric | value |
|---|---|
| AUC | {m["auc"]:.3f} |
| sensitivity | {m["sensitivity"]:.3f} |
| specificity | {m["specificity"]:.3f} |
| accuracy | {m["accuracy"]:.3f} |
| Grad-CAM pointing game, peak within {POINTING_TOLERANCE_MM:.0f} mm of the bleed | {m["pointing_game"]:.3f} |
| Grad-CAM pointing game, peak inside the bleed itself | {m["pointing_game_strict"]:.3f} |

The pointing game counts the slices with a bleed whose heatmap peak — at source resolution, as the
handler shows it — falls on the bleed's ground-truth mask (dilated by {POINTING_TOLERANCE_MM:.0f} mm, about
{round(POINTING_TOLERANCE_MM / (FIELD_OF_VIEW_MM / TEST_SOURCE_SIZE))} pixels, in the first row).

Study level, through the handler on {m["series"]} synthetic 30-slice series (half with a bleed spanning
several slices): sensitivity {m["series_sensitivity"]:.2f}, specificity {m["series_specificity"]:.2f}.

CPU cost, batch 1, 2 threads, median of 7 runs: predict {m["predict_ms"]:.0f} ms per slice; Grad-CAM over
the 16 views {m["explain_gradient_ms"]:.0f} ms by gradients, {m["explain_cam_ms"]:.0f} ms by the CAM fast path
(the head is global average pooling + `fc`, so both give the same map).

## Limitations
Synthetic anatomy is far simpler than real brains: no skull-base complexity, beam-hardening, motion,
contrast, post-operative changes, subarachnoid or intraventricular bleeds, or chronic (iso/hypodense)
blood. The prototype this replaces reported 87.8 % accuracy on real slices; nothing here is comparable.
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = common.arguments(__doc__, NAME, train=4000, test=400, epochs=5, batch=16, lr=1e-3, unit="slices")
    parser.add_argument("--test-series", type=int, default=10, help="per class")
    args = parser.parse_args(argv)

    log = common.Stopwatch()
    recipe = common.train_or_load(
        args, manifest(), network, training_example, seed=SEED, log=log, augment=augment
    )
    rng_test = np.random.default_rng(SEED + 1)  # training slices are seeded [SEED, index]
    test_phantoms = [sample_slice(rng_test, TEST_SOURCE_SIZE, 0.5) for _ in range(args.test)]
    log(f"rendered {len(test_phantoms)} held-out slices")
    model = load_model(args.out)  # measured through the same loader the node uses, sha256 check included
    metrics: dict[str, Any] = evaluate(model, test_phantoms, THRESHOLD)
    log(f"slice level: {json.dumps(metrics)}")
    metrics |= evaluate_series(model, args.test_series, seed=SEED + 1000, size=TEST_SOURCE_SIZE)
    metrics |= common.timings(model, list(model.labels).index(HEMORRHAGE_LABEL))
    log(f"series and timing: {json.dumps(metrics)}")
    common.finish(args, recipe, log.seconds(), lambda recipe: model_card(metrics, recipe))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
