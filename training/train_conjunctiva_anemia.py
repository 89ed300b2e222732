"""Train, measure and package the demonstration conjunctival-pallor (anemia) model, from synthetic
photographs only.

    python -m training.train_conjunctiva_anemia --out models/conjunctiva-anemia

Reproducible (fixed seeds, two threads) and under ten minutes on two CPU cores. Inputs go through
``handlers.conjunctiva_anemia.prepare`` — the same sclera normalisation and crop inference uses — and
the measurements are taken through the real package loader, so the model card reports what the node
runs. ``--measure-only`` re-measures a saved package without training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock

from handlers.base import Code, Model
from handlers.conjunctiva_anemia import NotAnalysable, prepare, source_heatmap
from node.runtime import load_model
from node.runtime.package import code_table
from training import common
from training.conjunctiva_phantom import (
    ANEMIA_HB,
    HB_RANGE,
    SOURCE_SIZES,
    photograph_eye,
    random_eye,
    random_lighting,
    render,
)

NAME = "conjunctiva-anemia"
VERSION = "1.0.0"
SEED = 20240611
ANEMIA = Code("271737000", "SCT", "Anemia")  # what the anemic label reports
LABELS = ("not_anemic", "anemic")
INPUT_SIZE = (128, 160)  # (H, W): the eye crop's 4:5 aspect
ARCHITECTURE: dict[str, Any] = {
    "block": "basic",
    "layers": [2, 2, 2, 2],  # ResNet18's depth
    "block_inplanes": [16, 32, 64, 128],  # a quarter of ResNet18's width: small enough for CPU and 8 MB
    "spatial_dims": 2,
    "n_input_channels": 3,
    "num_classes": len(LABELS),
    "conv1_t_stride": 2,
    "no_max_pool": True,  # layer4 at 1/16 of the input (8×10 cells), fine enough to point at the band
}
TARGET_LAYER = "layer4"
CLASSIFIER = "fc"
THRESHOLD = 0.5
OPTIONS: dict[str, Any] = {"retake_margin": 0.1, "explain_images": 2}
TRAIN_IMAGES, TEST_IMAGES, EPOCHS, BATCH, LR = 2400, 400, 10, 32, 2e-3
TEST_SIZE = SOURCE_SIZES[-1]
POINTING_TOLERANCE_PX = 8  # at TEST_SIZE, about 7 % of the eye's half-width
RELIT_EYES, LIGHTINGS = 30, 5


class Case(NamedTuple):
    """One held-out photograph: the model input and what is needed to score it and its explanation."""

    input: np.ndarray
    label: int
    conjunctiva: np.ndarray  # (rows, cols) bool
    box: tuple[int, int, int, int]
    erythema_raw: float  # log(R / G) over the conjunctiva, as photographed
    erythema_normalised: float  # the same after the sclera normalisation


def erythema(rgb: np.ndarray, mask: np.ndarray) -> float:
    """The conjunctiva's mean log(R / G): an erythema index, a classic non-learned pallor measure."""
    pixels = rgb[mask].astype(np.float64) + 1.0
    return float(np.mean(np.log(pixels[:, 0]) - np.log(pixels[:, 1])))


def training_example(index: int) -> tuple[np.ndarray, int] | None:
    """Training photograph ``index`` as (input, label), None where the handler would refuse it. Each
    has its own seed, so the set is the same however the work is spread; sizes vary like cameras."""
    rng = np.random.default_rng([SEED, index])
    phantom = render(rng, "eye", SOURCE_SIZES[int(rng.integers(len(SOURCE_SIZES)))])
    try:
        return prepare(phantom.rgb, INPUT_SIZE).input, int(phantom.anemic)
    except NotAnalysable:
        return None


def held_out(index: int) -> Case | None:
    rng = np.random.default_rng([SEED + 1, index])
    phantom = render(rng, "eye", TEST_SIZE)
    try:
        prepared = prepare(phantom.rgb, INPUT_SIZE)
    except NotAnalysable:
        return None
    return Case(
        prepared.input,
        int(phantom.anemic),
        phantom.conjunctiva,
        prepared.box,
        erythema(phantom.rgb, phantom.conjunctiva),
        erythema((prepared.normalised * 255.0).round(), phantom.conjunctiva),
    )


def relit(index: int) -> list[tuple[np.ndarray | None, float, float]]:
    """Eye ``index`` photographed under LIGHTINGS random lightings: (input or None, erythema raw,
    erythema normalised) for each — how much the lighting still moves what the model sees."""
    rng = np.random.default_rng([SEED + 2, index])
    eye = random_eye(rng)
    out: list[tuple[np.ndarray | None, float, float]] = []
    for _ in range(LIGHTINGS):
        phantom = photograph_eye(eye, random_lighting(rng), TEST_SIZE)
        try:
            prepared = prepare(phantom.rgb, INPUT_SIZE)
        except NotAnalysable:
            out.append((None, 0.0, 0.0))
            continue
        normalised = (prepared.normalised * 255.0).round()
        raw = erythema(phantom.rgb, phantom.conjunctiva)
        out.append((prepared.input, raw, erythema(normalised, phantom.conjunctiva)))
    return out


def network() -> ResNet:
    net = ResNet(**ARCHITECTURE)
    for block in net.modules():  # each residual block starts as identity (Goyal et al. 2017)
        if isinstance(block, ResNetBlock):
            torch.nn.init.zeros_(block.bn2.weight)
    return net


def augment(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror at random: a left eye mirrored is a right eye. No vertical flips (the conjunctiva is
    always below the eye) and no colour jitter (colour is the signal; lighting is the handler's job)."""
    return common.reorient(x, y, generator, ("mirror",))


def predict(model: Model, inputs: np.ndarray) -> np.ndarray:
    label = list(model.labels).index("anemic")
    return np.concatenate([model.predict(inputs[i : i + 32])[:, label] for i in range(0, len(inputs), 32)])


def pointing_game(model: Model, cases: Sequence[Case], tolerances_px: Sequence[int]) -> list[float]:
    """For each tolerance: the share of anaemic cases whose Grad-CAM peak, at source resolution as the
    handler shows it, lies on the conjunctiva (dilated by that many pixels): where pallor is read."""
    positives = [case for case in cases if case.label == 1]
    label = list(model.labels).index("anemic")
    heatmaps = []
    for start in range(0, len(positives), 16):
        chunk = positives[start : start + 16]
        maps = model.explain(np.stack([case.input for case in chunk]), label)
        heatmaps += [source_heatmap(m, c.box, c.conjunctiva.shape) for m, c in zip(maps, chunk, strict=True)]
    return [
        float(
            np.mean(
                [common.pointing_hit(h, c.conjunctiva, t) for h, c in zip(heatmaps, positives, strict=True)]
            )
        )
        for t in tolerances_px
    ]


def lighting_effect(
    model: Model, eyes: Sequence[list[tuple[np.ndarray | None, float, float]]]
) -> dict[str, float]:
    """How much the same eye's figures move between lightings: the spread (standard deviation) of the
    erythema index raw and normalised, and of the model's probability."""
    raw, normalised, probability = [], [], []
    for shots in eyes:
        usable = [shot for shot in shots if shot[0] is not None]
        if len(usable) < 2:
            continue
        raw.append(float(np.std([shot[1] for shot in usable])))
        normalised.append(float(np.std([shot[2] for shot in usable])))
        inputs = np.stack([shot[0] for shot in usable if shot[0] is not None])
        probability.append(float(np.std(predict(model, inputs))))
    return {
        "relit_eyes": len(raw),
        "erythema_spread_raw": float(np.mean(raw)),
        "erythema_spread_normalised": float(np.mean(normalised)),
        "probability_spread": float(np.mean(probability)),
    }


def manifest() -> dict[str, Any]:
    """The package manifest, less weights and sha256 (see node.runtime.package.Manifest)."""
    return {
        "name": NAME,
        "version": VERSION,
        "handler": "conjunctiva_anemia",
        "framework": "torch",
        "task": "classification",
        "family": "ResNet18 classifier",
        "description": "Demonstration anemia screen from conjunctival pallor in lower-eyelid photographs, "
        "MONAI ResNet with ResNet18's depth at a quarter of its width, after sclera-based lighting "
        "normalisation, trained on synthetic photographs.",
        "intended_use": "Demonstrating and testing the AI node end to end (DICOM in, Grad-CAM overlays and "
        "structured reports out) on synthetic conjunctiva photographs. Not for use on patients.",
        "disclaimer": common.DISCLAIMER,
        "architecture": {"network": "ResNet", "args": ARCHITECTURE},
        "input": {"size": list(INPUT_SIZE), "channels": 3},
        "options": OPTIONS,
        "labels": [
            {"name": LABELS[0]},
            {"name": LABELS[1], "threshold": THRESHOLD, "code": code_table(ANEMIA)},
        ],
        "explain": {"target_layer": TARGET_LAYER, "classifier": CLASSIFIER, "flips": False},
    }


def model_card(metrics: dict[str, Any], recipe: dict[str, Any], timing: dict[str, float]) -> str:
    m = metrics
    costs = common.explain_costs(timing)
    return f"""\
# {NAME} {VERSION} — demonstration conjunctival-pallor (anemia) model

> **NOT FOR DIAGNOSTIC USE.** A demonstration model trained only on synthetic photographs generated by
> this project (`training/conjunctiva_phantom.py`). It has never seen a patient's eye and is not
> clinically validated. Its figures below describe synthetic data and say nothing about performance on
> real photographs.

## Intended use
Demonstrating and testing the AI node end to end: receiving a close-up photograph of the lower eyelid's
conjunctiva over DICOM (VL Photographic Image, body part EYE), running the `conjunctiva_anemia` handler,
and sending Grad-CAM overlays and a structured report back. It is not for use on patients, for
screening, or for any clinical decision.

## Model
- MONAI `ResNet`, basic blocks, layers [2, 2, 2, 2] (ResNet18's depth), block_inplanes [16, 32, 64, 128]
  (a quarter of ResNet18's width), stem stride 2 without max-pooling, 2-D, 3 input channels, 2 outputs
  (`not_anemic`, `anemic`, softmax). {recipe["parameters"]:,} parameters; weights
  {recipe["weights_mb"]:.1f} MB.
- Input (`handlers.conjunctiva_anemia.prepare`, the same function at training and inference): the
  sclera is found by classic colour rules (no model): in linear light, the largest one or two bright,
  colourless regions after balancing by a guess at white, accepted only with coloured skin around them
  and an iris between them. Each channel of the photograph is scaled so the sclera's median becomes
  0.9 — the prototype's brightness normalisation, extended to colour, which cancels the light's
  brightness and colour temperature. The photograph is then cropped around the eye (1.5 sclera widths,
  centred a little below it) and resized to {INPUT_SIZE[0]}×{INPUT_SIZE[1]} by area averaging.
- Refused (not analysed, with the reason, never a probability): no sclera found, too dark, overexposed
  (the sclera clipped), not an RGB photograph.
- Output: the probability of anemia per photograph; the handler averages a patient's photographs and
  calls a finding at ≥ {THRESHOLD:.2f} (SNOMED CT 271737000 "Anemia"). Within
  {OPTIONS["retake_margin"]} of the threshold the summary asks for a retake in better light, as the
  prototype did.
- Explanation: Grad-CAM on `{TARGET_LAYER}` (8×10 cells), computed as CAM from the `{CLASSIFIER}` layer's
  weights where the runtime offers it, averaged over half-cell shifts, placed back on the crop in the
  photograph.

## Training data (synthetic)
Close-up photographs of an eye with the lower lid pulled down: skin of random tone and texture, upper
and lower lashes, lid crease, the caruncle at the nasal corner (red, but not conjunctiva), sclera with
vessels and shading, iris of random colour and position with pupil and corneal glint, and the exposed
palpebral conjunctiva with vessels. Haemoglobin is drawn uniformly from
{HB_RANGE[0]:.0f}–{HB_RANGE[1]:.0f} g/dL;
the conjunctiva's colour runs linearly from pale pink to deep red with it, with ±3.5 % per-patient
variation per channel, and a photograph is labelled anaemic below {ANEMIA_HB:.0f} g/dL (WHO's cut-off in
pregnancy and young children, here for everyone), so cases near the cut-off are genuinely hard.
Lighting: exposure ×0.3–0.75, colour temperature (red −22 % to +22 %, blue +28 % to −28 %), green tint,
a linear brightness ramp up to ±30 %, a soft shadow in half the photographs, focus blur, sensor noise,
sRGB gamma. {recipe["train_images"]} training photographs rendered at
{", ".join(f"{h}×{w}" for h, w in SOURCE_SIZES)};
augmentation: random mirroring (left ↔ right eye).

## Training recipe
AdamW (weight decay 1e-4), one-cycle learning rate peaking at {recipe["lr"]}, batch {recipe["batch"]},
{recipe["epochs"]} epochs, cross-entropy, from random initialisation (no pretrained weights) with each
residual block's last batch-norm scale set to zero. Seed {SEED}, 2 CPU threads; training took
{recipe["train_seconds"] / 60:.1f} minutes (whole script {recipe["total_seconds"] / 60:.1f} minutes).

Reproduce: `python -m training.train_conjunctiva_anemia --out models/{NAME}` (same seeds; results
can differ in the last digits on other CPUs or thread counts).

## Measured (held-out synthetic data, never seen in training)
{m["images"]} photographs at {TEST_SIZE[0]}×{TEST_SIZE[1]} ({m["positives"]} anaemic; {m["refused"]} of
{m["images"] + m["refused"]} rendered were refused by the handler and are not counted), threshold
{THRESHOLD:.2f}:

| metric | value |
|---|---|
| AUC | {m["auc"]:.3f} |
| sensitivity | {m["sensitivity"]:.3f} |
| specificity | {m["specificity"]:.3f} |
| accuracy | {m["accuracy"]:.3f} |
| Grad-CAM pointing game, peak inside the conjunctiva | {m["pointing_game"]:.3f} |
| Grad-CAM pointing game, peak within {POINTING_TOLERANCE_PX} px of the conjunctiva | \
{m["pointing_game_tolerant"]:.3f} |

The pointing game counts the anaemic photographs whose heatmap peak — at source resolution, as the
handler shows it — falls on the ground-truth mask of the exposed conjunctiva, where pallor is read.

### Effect of the sclera normalisation
A non-learned pallor measure, the erythema index (mean log(R/G) over the ground-truth conjunctiva),
separates anaemic from non-anaemic held-out photographs with AUC {m["erythema_auc_raw"]:.3f} as
photographed and {m["erythema_auc_normalised"]:.3f} after the normalisation. Photographing each of
{m["relit_eyes"]} held-out eyes under {LIGHTINGS} random lightings, the index's spread (standard deviation)
per eye falls from {m["erythema_spread_raw"]:.3f} to {m["erythema_spread_normalised"]:.3f} (the central 90 %
of the held-out set spans {m["erythema_range"]:.2f}); the model's probability for the same eye varies by
{m["probability_spread"]:.3f} on average.

CPU cost, batch 1, 2 threads: predict {timing["predict_ms"]:.0f} ms per photograph, {costs} per photograph.

## Limitations
Synthetic eyes are far simpler than real ones: no real conjunctival texture, follicles, inflammation
(conjunctivitis reddens a pale conjunctiva), jaundice (a yellow sclera would bias the white balance),
mascara, fingers, motion or mixed light sources. Lighting here is a single colour over the scene; real
scenes mix colours the normalisation cannot cancel. Haemoglobin is the only cause of colour change.
The prototype this replaces reported 0.81–0.98 accuracy per fold on real photographs; nothing here is
comparable.
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = common.arguments(
        __doc__, NAME, train=TRAIN_IMAGES, test=TEST_IMAGES, epochs=EPOCHS, batch=BATCH, lr=LR
    ).parse_args(argv)
    log = common.Stopwatch()

    rendered_cases = common.render(held_out, args.test, chunksize=20)
    cases = [case for case in rendered_cases if case is not None]
    eyes = common.render(relit, RELIT_EYES, chunksize=5)
    log(f"rendered {len(cases)} held-out photographs and {RELIT_EYES}×{LIGHTINGS} relit ones")
    recipe = common.train_or_load(
        args, manifest(), network, training_example, seed=SEED, log=log, augment=augment
    )
    model = load_model(args.out)  # measured through the loader the node uses, sha256 check included
    labels = np.array([case.label for case in cases])
    scores = predict(model, np.stack([case.input for case in cases]))
    metrics: dict[str, Any] = {
        "images": len(cases),
        "refused": args.test - len(cases),
        "positives": int(labels.sum()),
        **common.binary_metrics(scores, labels, THRESHOLD),
    }
    strict, tolerant = pointing_game(model, cases, [0, POINTING_TOLERANCE_PX])
    raw = np.array([case.erythema_raw for case in cases])
    normalised = np.array([case.erythema_normalised for case in cases])
    metrics |= {
        "pointing_game": strict,
        "pointing_game_tolerant": tolerant,
        "erythema_auc_raw": common.auc(-raw, labels),  # paler = lower index = anaemic
        "erythema_auc_normalised": common.auc(-normalised, labels),
        "erythema_range": float(np.percentile(normalised, 95) - np.percentile(normalised, 5)),
        **lighting_effect(model, eyes),
    }
    log(f"metrics {json.dumps(metrics)}")
    timing = common.timings(model, list(model.labels).index("anemic"))
    log(f"timings {json.dumps(timing)}")
    common.finish(args, recipe, log.seconds(), lambda recipe: model_card(metrics, recipe, timing))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
