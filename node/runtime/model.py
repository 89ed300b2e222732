"""What every runtime shares: one interface from a batch to probabilities, heatmaps or masks.

A runtime (torch, keras, onnx) only runs its network: the raw outputs, the target layer's feature maps,
and — where the framework has gradients — Grad-CAM's low-resolution map. Everything else happens here,
in numpy, identically for every framework: input checks and normalisation, softmax, the CAM fast path,
placing the map on the input grid and averaging it over shifted and flipped views. So one network
exported to three formats gives the same probabilities and the same heatmaps.

Grad-CAM weights each feature map A_k by the spatial mean of d y_c / d A_k. When the head is global
average pooling followed by one linear layer, y_c = sum_k w_ck mean(A_k) + b_c, so that mean is
w_ck / (h w): Grad-CAM is CAM (Zhou et al. 2016), sum_k w_ck A_k, up to a positive factor that the
[0, 1] scaling removes. It then needs the forward pass alone, with no gradients — the fast path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydicom.sr.coding import Code

from node.runtime.identity import ModelIdentity
from node.runtime.package import Manifest, ModelPackage

T = TypeVar("T")
Method = Literal["auto", "gradient", "cam"]
CLASSIFIER_TOLERANCE = 1e-3  # relative: how closely GAP + the named layer must reproduce the outputs
DEFAULT_BATCH = 16  # images per forward pass unless set_batch says otherwise
_threads = 0  # see set_threads
_batch = DEFAULT_BATCH  # see set_batch


def set_threads(count: int) -> None:
    """Threads each framework may use for inference in this process (0: its own default). Job workers
    share the CPU through it: torch takes it here, ONNX Runtime for each session it opens."""
    global _threads
    _threads = count
    if count:
        import torch

        torch.set_num_threads(count)


def threads() -> int:
    """What :func:`set_threads` set (0: each framework's default)."""
    return _threads


def batch() -> int:
    """What :func:`set_batch` set: a handler that streams a series hands the model this many images at a
    time, so each pass is the one :func:`chunked` would have made."""
    return _batch


def set_batch(images: int) -> None:
    """Images per forward pass in this process. Every runtime call is split into passes of at most this
    many, so a handler can hand over a whole series: memory stays bounded by the batch, while a batch
    large enough to keep the cores busy costs less per image than one image at a time."""
    global _batch
    if images < 1:
        raise ValueError(f"batch of {images} images: at least 1")
    _batch = images


def chunked(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, axis: int = 0) -> np.ndarray:
    """``run`` over ``x`` in passes of at most :func:`set_batch`'s images, results joined on ``axis``."""
    if len(x) <= _batch:
        return run(x)
    return np.concatenate([run(x[i : i + _batch]) for i in range(0, len(x), _batch)], axis=axis)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=axis, keepdims=True)).astype(np.float32)


class PackagedModel(ABC):
    """A loaded package. Subclasses load the network, then call :meth:`_check` at the end of __init__."""

    outputs_probabilities = False  # the network itself ends in softmax (common in Keras models)
    has_gradients = True  # ONNX Runtime has none: explanations need the fast path there
    runtime_choice = ""  # why this runtime runs the package, where measured (node.runtime.fastest)

    def __init__(self, package: ModelPackage) -> None:
        self._package = package
        self._classifier: tuple[np.ndarray, np.ndarray] | None = None
        self._views: list[tuple[tuple[int, ...], int, int]] | None = None

    # -- what each framework implements, on normalised NCHW float32 ---------------------------------
    @abstractmethod
    def _outputs(self, x: np.ndarray) -> np.ndarray:
        """The network's output: (N, L) for classifiers, (N, L, H, W) for segmentation."""

    @abstractmethod
    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(feature maps of the target layer, NCHW; the network's outputs) from one forward pass."""

    @abstractmethod
    def _gradient_cam(self, x: np.ndarray, label_indices: Sequence[int]) -> np.ndarray:
        """(L, N, h, w) Grad-CAM at the target layer's resolution, ReLU applied, from each label's logit's
        gradient: one forward pass, one backward pass per label."""

    @abstractmethod
    def _classifier_weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(weights (L, K), bias (L,)) of the linear layer ``name``."""

    # -- the package -------------------------------------------------------------------------------
    def standing_for(self, source: ModelPackage) -> PackagedModel:
        """This model, a conversion of ``source`` (its ONNX export, say), named as ``source``: the
        manifest, the path and the identity results carry are the package the node was given."""
        self._package = source
        return self

    @property
    def manifest(self) -> Manifest:
        return self._package.manifest

    @property
    def path(self) -> Path:
        return self._package.path

    @property
    def identity(self) -> ModelIdentity:
        return self._package.identity

    @property
    def labels(self) -> Sequence[str]:
        return self.manifest.label_names

    @property
    def codes(self) -> Mapping[str, Code]:
        """The coded concept each label stands for (labels the manifest leaves uncoded are absent)."""
        return {label.name: label.code for label in self.manifest.labels if label.code is not None}

    @property
    def thresholds(self) -> Mapping[str, float]:
        """Decision thresholds the manifest sets per label (labels without one are absent)."""
        return {label.name: label.threshold for label in self.manifest.labels if label.threshold is not None}

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.input.size

    @property
    def explain_methods(self) -> tuple[Method, ...]:
        """The Grad-CAM methods this model offers: ``gradient`` where the framework has gradients,
        ``cam`` where the head is global average pooling + the manifest's ``classifier``."""
        if self.manifest.task != "classification":
            return ()
        methods: tuple[Method, ...] = ("gradient",) if self.has_gradients else ()
        return methods + (("cam",) if self._classifier is not None else ())

    # -- checks at load ----------------------------------------------------------------------------
    def _check(self) -> None:
        """Refuse, at load time, a package whose network does not match its manifest: a wrong label
        count would mislabel every result, a false claim about the head every heatmap."""
        height, width = self.input_size
        probe = np.random.default_rng(0).random((2, self.manifest.input.channels, height, width), np.float32)
        x = self._prepare(probe)
        outputs = self._outputs(x)
        expected: tuple[int, ...] = (2, len(self.labels))
        if self.manifest.task == "segmentation":
            expected += (height, width)
        if outputs.shape != expected:
            raise ValueError(
                f"{self.path}: the network's output has shape {outputs.shape} for two images, "
                f"the manifest ({len(self.labels)} labels, task {self.manifest.task}) expects {expected}"
            )
        explain = self.manifest.explain
        if self.manifest.task != "classification" or explain is None:
            return
        features, _ = self._features(x)
        if features.ndim != 4:
            raise ValueError(
                f"{self.path}: explain.target_layer {explain.target_layer!r} gives {features.shape}"
            )
        if explain.classifier is not None:
            weights, bias = self._classifier_weights(explain.classifier)
            if weights.shape != (len(self.labels), features.shape[1]):
                raise ValueError(
                    f"{self.path}: explain.classifier {explain.classifier!r} has weights {weights.shape}, "
                    f"expected ({len(self.labels)}, {features.shape[1]}) for the target layer's features"
                )
            head = features.mean(axis=(2, 3)) @ weights.T + bias
            if self.outputs_probabilities:
                head = softmax(head)
            scale = max(float(np.abs(outputs).max()), 1e-6)
            error = float(np.abs(head - outputs).max()) / scale
            if error > CLASSIFIER_TOLERANCE:
                raise ValueError(
                    f"{self.path}: explain.classifier {explain.classifier!r}: global average pooling of "
                    f"{explain.target_layer!r} followed by that layer does not give the network's output "
                    f"(relative difference {error:.2g}); remove `classifier` to use gradient Grad-CAM"
                )
            self._classifier = (weights, bias)
        elif not self.has_gradients:
            raise ValueError(
                f"{self.path}: {self.manifest.framework} has no gradients, so Grad-CAM needs the fast path: "
                "set explain.classifier to the final linear layer of a global-average-pooling head"
            )

    # -- inference ---------------------------------------------------------------------------------
    def _prepare(self, batch: np.ndarray) -> np.ndarray:
        expected = (self.manifest.input.channels, *self.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"{self.manifest.name} takes (N, {', '.join(map(str, expected))}), got {batch.shape}"
            )
        x = np.ascontiguousarray(batch, dtype=np.float32)
        spec = self.manifest.input
        if spec.mean is not None:
            x = x - np.asarray(spec.mean, np.float32)[:, None, None]
        if spec.std is not None:
            x = x / np.asarray(spec.std, np.float32)[:, None, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def _probabilities(self, outputs: np.ndarray) -> np.ndarray:
        return outputs.astype(np.float32) if self.outputs_probabilities else softmax(outputs)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) in [0, 1] → (N, n_labels) probabilities."""
        if self.manifest.task != "classification":
            raise ValueError(f"{self.manifest.name} is a {self.manifest.task} model: use segment()")
        return self._probabilities(chunked(self._outputs, self._prepare(batch)))

    def segment(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) in [0, 1] → (N, n_labels, H, W) per-pixel probabilities."""
        if self.manifest.task != "segmentation":
            raise ValueError(f"{self.manifest.name} is a {self.manifest.task} model: use predict()")
        return self._probabilities(chunked(self._outputs, self._prepare(batch)))

    def explain(
        self, batch: np.ndarray, label_index: int | Sequence[int], method: Method = "auto"
    ) -> np.ndarray:
        """(N, C, H, W) → Grad-CAM maps in [0, 1] at the input size: (N, H, W) for one label, (N, L, H, W)
        for a sequence of L labels, all from the same forward pass (the fast path reads every label's
        map off its features; by gradients, one backward pass per label follows the one forward).

        ``auto`` takes the fast path where the head allows it. Plain Grad-CAM on a layer of stride s
        has one value per s×s block: its peak can only fall on a block centre, and where within its
        block a feature's evidence lies depends on the learned filters. So the map is averaged over
        copies of the input shifted by half a block and, for models trained with mirrored and flipped
        images ([explain] flips), mirrored and flipped too, each map moved back before averaging
        (augmented Grad-CAM, Morbidelli et al. 2020).
        """
        single = np.ndim(label_index) == 0
        indices = [int(i) for i in np.atleast_1d(label_index)]
        for index in indices:
            if not 0 <= index < len(self.labels):
                raise ValueError(f"label index {index} out of range for labels {list(self.labels)}")
        methods = self.explain_methods
        if not methods:
            raise ValueError(f"{self.manifest.name}: nothing to explain for a {self.manifest.task} model")
        chosen = methods[-1] if method == "auto" else method
        if chosen not in methods:
            raise ValueError(
                f"{self.manifest.name}: Grad-CAM method {method!r} not available, only {methods}"
            )
        x = self._prepare(batch)
        views = self._explain_views(x)
        copies = np.concatenate([shift(flip(x, dims), dy, dx) for dims, dy, dx in views])
        if chosen == "cam":
            assert self._classifier is not None
            weights = self._classifier[0][indices]
            features = chunked(lambda part: self._features(part)[0], copies)
            cells = np.maximum(np.einsum("nkhw,lk->lnhw", features, weights), 0.0)
        else:
            cells = chunked(lambda part: self._gradient_cam(part, indices), copies, axis=1)
        offset = self.manifest.explain.cell_offset if self.manifest.explain else 0.0
        labels, n = len(indices), len(x)
        flat = cells.reshape(-1, *cells.shape[2:]).astype(np.float32)
        maps = upsample_aligned(flat, self.input_size, offset).reshape(labels, len(copies), *self.input_size)
        total = sum(
            flip(shift(maps[:, i * n : (i + 1) * n], -dy, -dx), dims)
            for i, (dims, dy, dx) in enumerate(views)
        )
        scaled = normalise(np.asarray(total, dtype=np.float32).reshape(labels * n, *self.input_size))
        per_image = scaled.reshape(labels, n, *self.input_size).transpose(1, 0, 2, 3)
        return per_image[:, 0] if single else np.ascontiguousarray(per_image)

    def exercise(self, images: int = 0) -> None:
        """Do what a job asks of the model, on random input: a batch of ``images`` (0: the batch size
        :func:`set_batch` set) through it, and one image's last label explained where it explains. The
        first pass at a batch size costs extra (memory, the framework's choice of kernels): a worker
        pays it before its first job, and timing compares runtimes on it."""
        height, width = self.input_size
        shape = (images or _batch, self.manifest.input.channels, height, width)
        x = np.random.default_rng(0).random(shape, np.float32)
        if self.manifest.task == "segmentation":
            self.segment(x)
            return
        self.predict(x)
        if self.explain_methods:
            self.explain(x[:1], len(self.labels) - 1)

    def _explain_views(self, x: np.ndarray) -> list[tuple[tuple[int, ...], int, int]]:
        if self._views is None:
            features, _ = self._features(x[:1])
            half = self.input_size[0] // features.shape[2] // 2
            explain = self.manifest.explain
            flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)] if explain and explain.flips else [()]
            shifts = [(0, 0), (0, half), (half, 0), (half, half)] if half else [(0, 0)]
            self._views = [(dims, dy, dx) for dims in flips for dy, dx in shifts]
        return self._views


def named(values: Mapping[str, T], name: str) -> T | None:
    """``values[name]``, or the one value whose key ends in ``.name`` (an exported wrapper prefixes its
    network's parameter names, e.g. ``network.fc.weight``)."""
    if name in values:
        return values[name]
    matches = [value for key, value in values.items() if key.endswith(f".{name}")]
    return matches[0] if len(matches) == 1 else None


def normalise(maps: np.ndarray) -> np.ndarray:
    """Scale each (H, W) map to [0, 1] with its peak at 1 (a flat map becomes 0)."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1)[:, None, None]
    span = np.maximum(flat.max(axis=1)[:, None, None] - low, 1e-12)
    return ((maps - low) / span).astype(np.float32)


def upsample_aligned(cells: np.ndarray, size: tuple[int, int], offset: float = 0.0) -> np.ndarray:
    """(N, h, w) → (N, H, W) by linear interpolation with cell i on input pixel offset + stride * i,
    the centre of its receptive field ([explain] cell_offset: 0 in a network of strided convolutions
    padded to "same", a ResNet's). The usual half-pixel convention would put layer4 of a ResNet 15.5
    pixels down and to the right."""
    return np.einsum(
        "yh,nhw,xw->nyx",
        _interpolation(size[0], cells.shape[1], offset),
        cells,
        _interpolation(size[1], cells.shape[2], offset),
    )


def _interpolation(out: int, cells: int, offset: float) -> np.ndarray:
    """(out, cells) linear interpolation weights, out pixel y at cell position (y - offset) * cells / out,
    with the edge cells repeated beyond the grid."""
    position = np.clip((np.arange(out) - offset) * (cells / out), 0, cells - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    frac = position - low
    weights = np.zeros((out, cells), np.float32)
    weights[np.arange(out), low] += 1.0 - frac
    weights[np.arange(out), high] += frac
    return weights


def flip(images: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    return np.flip(images, axis=dims) if dims else images


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move image content down by dy and right by dx pixels (negative: up, left), repeating the edge."""
    if dy == 0 and dx == 0:
        return images
    height, width = images.shape[-2:]
    pad = [(0, 0)] * (images.ndim - 2) + [(max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))]
    padded = np.pad(images, pad, mode="edge")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]
