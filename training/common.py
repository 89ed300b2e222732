"""What every demo-model training script shares: seeded rendering on both cores, the training loop,
the metrics a model card reports, CPU timings, and writing the package files.

Each task's script (``training.train_<task>``) keeps only what is its own: the phantom, the
network's arguments, the augmentation and the card's wording. Scripts run under ``ainode models
train-demo TASK`` or ``python -m``; they must be reproducible (fixed seeds) and take at most ten
minutes on two CPU cores. Each has the same shape:

- ``manifest() -> dict``: the package manifest less ``weights`` and ``sha256``, built from the
  script's constants, so the committed ``manifest.toml`` can be checked against it without training;
- ``main(argv)`` parses :func:`arguments` plus its own options, renders its held-out set, and calls
  :func:`train_or_load`: it trains and writes the package (:func:`write_package`), or with
  ``--measure-only`` rewrites the manifest for the saved weights (:func:`write_manifest`), and returns
  the recipe, the figures the card quotes about training. It then measures through
  ``node.runtime.load_model`` and ends in :func:`finish`, which saves the recipe (:func:`save_recipe`,
  after training only) and writes the card (:func:`write_card`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import cv2
import numpy as np
import tomli_w
import torch

from node.runtime.package import MANIFEST, MODEL_CARD, sha256_of

T = TypeVar("T")
Log = Callable[[str], None]
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Move = Literal["mirror", "flip", "transpose"]  # left-right, up-down, rows for columns

RECIPE = "training.json"  # in the package: how its weights were made, for re-measuring without training

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE."
DISCLAIMER = (
    f"Demonstration model trained on synthetic phantoms; not clinically validated. {NOT_FOR_DIAGNOSTIC_USE}"
)


def render(example: Callable[[int], T], n: int, chunksize: int = 50) -> list[T]:
    """``[example(0), …, example(n - 1)]`` on two processes. ``example`` must seed its own generator
    from its index (``np.random.default_rng([SEED, index])``), so the set is the same however the work
    is spread; it runs before torch starts its threads (fork)."""
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return pool.map(example, range(n), chunksize=chunksize)


_MOVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mirror": lambda t: t.flip(-1),
    "flip": lambda t: t.flip(-2),
    "transpose": lambda t: t.transpose(-1, -2),
}


def reorient(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, moves: Sequence[Move]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of ``moves`` applied to a random half of the batch, a draw per example and move, in the
    order given; a target with the image's dimensions (a mask) moves with its image, class labels stay.
    A network that meets a lesion in every orientation cannot tie its evidence to one side of it,
    which keeps Grad-CAM on the lesion."""
    chosen = (torch.rand(len(moves), len(x), generator=generator) < 0.5)[:, :, None, None, None]
    for move, picked in zip(moves, chosen, strict=True):
        x = torch.where(picked, _MOVES[move](x), x)
        if y.ndim == x.ndim:
            y = torch.where(picked, _MOVES[move](y), y)
    return x, y


def shift(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """The batch moved by one random offset of up to ``max_shift`` pixels each way. It rolls, so the
    image's border must be uniform (air, a neutral surround) for rolling to be shifting."""
    dy, dx = (int(d) for d in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(x, (dy, dx), dims=(-2, -1))


def exposure(
    x: torch.Tensor, generator: torch.Generator, spread: float = 0.15, pivot: float = 0.0
) -> torch.Tensor:
    """Each image's contrast scaled about ``pivot`` by a random gain within ±``spread``/2, in [0, 1]."""
    gain = 1.0 + spread * (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5)
    return (pivot + (x - pivot) * gain).clamp(0.0, 1.0)


def fit(
    network: torch.nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    log: Log,
    augment: Augment | None = None,
    loss: Loss = torch.nn.functional.cross_entropy,
) -> torch.nn.Module:
    """AdamW with a one-cycle schedule, seeded shuffling and augmentation; returns the network in eval
    mode. ``augment(x, y, generator)`` gets a batch and returns it transformed (``y`` too, for masks)."""
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(inputs) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    x_all, y_all = torch.from_numpy(inputs), torch.from_numpy(targets)
    generator = torch.Generator().manual_seed(seed)
    network.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total, started = 0.0, time.perf_counter()
        for step in range(steps_per_epoch):
            idx = order[step * batch : (step + 1) * batch]
            x, y = x_all[idx], y_all[idx]
            if augment is not None:
                x, y = augment(x, y, generator)
            value = loss(network(x), y)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            schedule.step()
            total += value.item()
        seconds = time.perf_counter() - started
        log(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f} ({seconds:.0f} s)")
    return network.eval()


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half)."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and sensitivity, specificity and accuracy at ``threshold``, for one positive class."""
    labels = np.asarray(labels).astype(int)
    called = np.asarray(scores) >= threshold
    return {
        "auc": auc(np.asarray(scores), labels),
        "sensitivity": float(called[labels == 1].mean()),
        "specificity": float(1.0 - called[labels == 0].mean()),
        "accuracy": float((called == labels.astype(bool)).mean()),
    }


def per_class_metrics(probabilities: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Multi-class figures: accuracy of the arg-max call, macro AUC, and per class one-vs-rest AUC with
    the sensitivity and specificity of calling that class when it is the arg-max."""
    called = probabilities.argmax(axis=1)
    classes: dict[str, dict[str, float]] = {}
    for index, name in enumerate(names):
        truth = labels == index
        classes[name] = {
            "n": int(truth.sum()),
            "auc": auc(probabilities[:, index], truth.astype(int)),
            "sensitivity": float((called[truth] == index).mean()),
            "specificity": float((called[~truth] != index).mean()),
        }
    return {
        "n": len(labels),
        "accuracy": float((called == labels).mean()),
        "macro_auc": float(np.mean([c["auc"] for c in classes.values()])),
        "classes": classes,
    }


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray, tolerance_px: int = 0) -> bool:
    """Whether the heatmap's peak lies inside ``mask`` (same shape) dilated by ``tolerance_px``: one
    round of the pointing game (Zhang et al. 2018) that measures Grad-CAM against a known lesion."""
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} differ in shape")
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    region = mask.astype(np.uint8)
    if tolerance_px > 0:
        size = 2 * tolerance_px + 1
        region = np.asarray(cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))))
    return bool(region[peak])


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    predicted, truth = predicted.astype(bool), truth.astype(bool)
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * (predicted & truth).sum() / total)


def median_ms(call: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``call`` in milliseconds, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000.0 * float(np.median(times))


def timings(model: Any, label_index: int, repeats: int = 7) -> dict[str, float]:
    """Milliseconds per image, batch 1, medians of ``repeats`` runs: predict, and Grad-CAM by every
    method the runtime offers for this model (``gradient`` where it has gradients, ``cam`` where the
    head is global average pooling + linear)."""
    x = np.random.default_rng(0).random(
        (1, model.manifest.input.channels, *model.input_size), dtype=np.float32
    )
    out = {"predict_ms": median_ms(lambda: model.predict(x), repeats)}
    for method in model.explain_methods:
        explain = partial(model.explain, x, label_index, method=method)
        out[f"explain_{method}_ms"] = median_ms(explain, repeats)
    return out


def explain_costs(timing: Mapping[str, float]) -> str:
    """The Grad-CAM figures of :func:`timings` in a card's words: "Grad-CAM by `gradient` 56 ms, …"."""
    return ", ".join(
        f"Grad-CAM by `{key.removeprefix('explain_').removesuffix('_ms')}` {value:.0f} ms"
        for key, value in timing.items()
        if key.startswith("explain_")
    )


def arguments(
    doc: str, name: str, *, train: int, test: int, epochs: int, batch: int, lr: float, unit: str = "images"
) -> argparse.ArgumentParser:
    """The options every training script takes, so ``ainode models train-demo`` can pass them to any
    script: ``--out`` (default ``models/<name>``) and ``--measure-only``; and, with the script's
    defaults, the set sizes ``--train-<unit>`` and ``--test-<unit>`` (``args.train``, ``args.test``)
    and ``--epochs``, ``--batch`` and ``--lr`` for :func:`train_or_load`. The script adds its own and
    shows ``doc`` (its module docstring) as the help text."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models") / name, help="the package folder")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="no training: rewrite the manifest for the saved weights, re-measure, rewrite the card",
    )
    parser.add_argument(f"--train-{unit}", dest="train", type=int, default=train, help="training set size")
    parser.add_argument(f"--test-{unit}", dest="test", type=int, default=test, help="held-out set size")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=lr, help="the one-cycle schedule's peak")
    parser.set_defaults(unit=unit)  # names the recipe's count: train_images, train_slices
    return parser


def write_package(
    out: Path, network: torch.nn.Module, manifest: dict[str, Any], weights: str = "weights.pt"
) -> Path:
    """Save the state_dict as ``weights`` and the manifest for it (see :func:`write_manifest`); returns
    the package folder. Measure through ``node.runtime.load_model(out)`` afterwards, so the card
    reports what the node runs."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / weights)
    return write_manifest(out, manifest, weights)


def write_manifest(out: Path, manifest: dict[str, Any], weights: str = "weights.pt") -> Path:
    """Write ``manifest.toml`` for the weights already in ``out``: ``manifest`` (the schema of
    ``node.runtime.package.Manifest`` less ``weights`` and ``sha256``) with those two filled in. On its
    own it serves ``--measure-only``, so an edited manifest (an [explain] target layer, say) applies
    without retraining."""
    data = {**manifest, "weights": weights, "sha256": sha256_of(out / weights)}
    (out / MANIFEST).write_text(tomli_w.dumps(data), encoding="utf-8")
    return out


def model_size(out: Path, network: torch.nn.Module, weights: str = "weights.pt") -> dict[str, float]:
    """The figures a card gives for the network's size: parameters, and the weights file in MB."""
    return {
        "parameters": sum(p.numel() for p in network.parameters()),
        "weights_mb": (out / weights).stat().st_size / 1e6,
    }


def save_recipe(out: Path, recipe: dict[str, Any]) -> None:
    """Keep how the weights were made (set sizes, epochs, training time …) in the package's
    ``training.json``, so ``--measure-only`` can rewrite the card without training."""
    (out / RECIPE).write_text(json.dumps(recipe, indent=1) + "\n", encoding="utf-8")


def load_recipe(out: Path) -> dict[str, Any]:
    """What :func:`save_recipe` kept."""
    return dict(json.loads((out / RECIPE).read_text(encoding="utf-8")))


def write_card(out: Path, text: str) -> None:
    if NOT_FOR_DIAGNOSTIC_USE not in text or "synthetic" not in text:
        raise ValueError(
            "a demo model card must say it was trained on synthetic data and is not for diagnosis"
        )
    (out / MODEL_CARD).write_text(text, encoding="utf-8")


def train_or_load(
    args: argparse.Namespace,
    manifest: dict[str, Any],
    network: Callable[[], torch.nn.Module],
    example: Callable[[int], tuple[np.ndarray, Any] | None],
    *,
    seed: int,
    log: Log,
    augment: Augment | None = None,
    loss: Loss = torch.nn.functional.cross_entropy,
) -> dict[str, Any]:
    """The package's weights and their recipe, for the options of :func:`arguments`. With
    ``--measure-only``: :func:`write_manifest` for the weights saved in ``args.out``, and the saved
    recipe (:func:`load_recipe`). Otherwise: render ``example(0 … args.train - 1)`` (each
    ``(input, target)``, or None to leave out), :func:`fit` a new ``network()`` to them (made after
    ``torch.manual_seed(seed)``, so its initial weights are reproducible too) and
    :func:`write_package`; the recipe is ``train_<unit>`` (the examples used), epochs, batch, lr,
    :func:`model_size` and train_seconds. Either way torch is left on two threads for measuring."""
    if args.measure_only:
        write_manifest(args.out, manifest)
        torch.set_num_threads(2)  # as fit leaves it; not before render, whose workers fork
        return load_recipe(args.out)
    examples = [pair for pair in render(example, args.train) if pair is not None]
    inputs = np.stack([x for x, _ in examples])
    targets = np.stack([y for _, y in examples])
    del examples
    if targets.dtype.kind in "iu":  # class labels, as cross-entropy takes them
        targets = targets.astype(np.int64)
    per_class = f", {np.bincount(targets).tolist()} per class" if targets.ndim == 1 else ""
    log(f"rendered {len(inputs)} training {args.unit}{per_class}")
    torch.manual_seed(seed)
    net = network()
    started = time.perf_counter()
    settings: dict[str, Any] = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr}
    fit(net, inputs, targets, **settings, seed=seed, log=log, augment=augment, loss=loss)
    train_seconds = time.perf_counter() - started
    write_package(args.out, net, manifest)
    return {
        f"train_{args.unit}": len(inputs),
        **settings,
        **model_size(args.out, net),
        "train_seconds": train_seconds,
    }


def finish(
    args: argparse.Namespace,
    recipe: dict[str, Any],
    total_seconds: float,
    card: Callable[[dict[str, Any]], str],
) -> None:
    """After training, add ``total_seconds`` (the whole script's) to the recipe and save it
    (:func:`save_recipe`); either way write the card, ``card(recipe)`` (:func:`write_card`)."""
    if not args.measure_only:
        recipe["total_seconds"] = total_seconds
        save_recipe(args.out, recipe)
    write_card(args.out, card(recipe))


class Stopwatch:
    """A :data:`Log` that prefixes each line with the seconds since it was made; :meth:`seconds` reads
    them (for :func:`finish`)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.seconds():6.0f} s] {message}", flush=True)
