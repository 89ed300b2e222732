"""PyTorch runtime: a MONAI network built from the manifest, with softmax prediction and Grad-CAM.

Only this module imports torch, so listing and checking packages stays light. Thread counts are the
caller's business (``torch.set_num_threads``): the node decides how to share the CPU between workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import monai.networks.nets
import numpy as np
import torch
from monai.visualize import GradCAM

from node.runtime.identity import ModelIdentity
from node.runtime.package import Manifest, ModelPackage


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] with its peak at 1. MONAI's default normaliser maps the peak to 0
    (Project-MONAI/tutorials#1796), which would point every explanation at the least relevant region."""
    flat = maps.detach().flatten(1)
    low = flat.min(dim=1).values.view(-1, *[1] * (maps.dim() - 1))
    span = (flat.max(dim=1).values.view(-1, *[1] * (maps.dim() - 1)) - low).clamp_min(1e-12)
    return (maps.detach() - low) / span


class TorchModel:
    """A loaded torch package implementing handlers.base.Model."""

    def __init__(self, package: ModelPackage) -> None:
        manifest = package.manifest
        network_class = getattr(monai.networks.nets, manifest.architecture.network, None)
        if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
            raise ValueError(
                f"{package.path}: architecture.network {manifest.architecture.network!r} "
                "is not a network in monai.networks.nets"
            )
        self._package = package
        self._network = network_class(**manifest.architecture.args)
        state = torch.load(package.weights_path, map_location="cpu", weights_only=True)
        try:
            self._network.load_state_dict(state)
        except RuntimeError as exc:  # missing, unexpected or differently shaped parameters
            raise ValueError(f"{package.path}: the weights do not fit [architecture]: {exc}") from exc
        self._network.eval()
        self._check_outputs()
        if manifest.explain is not None and manifest.explain.target_layer not in dict(
            self._network.named_modules()
        ):
            raise ValueError(
                f"{package.path}: explain.target_layer {manifest.explain.target_layer!r} is not a layer"
            )
        self._cam: GradCAM | None = None
        self._views: list[tuple[tuple[int, ...], int, int]] = []  # (flipped dims, dy, dx) averaged over

    def _check_outputs(self) -> None:
        """A manifest listing more or fewer labels than the network has outputs would mislabel every
        result, so it is refused at load time."""
        height, width = self.input_size
        with torch.no_grad():
            outputs = self._network(torch.zeros(1, self.manifest.input.channels, height, width)).shape[1]
        if outputs != len(self.labels):
            raise ValueError(
                f"{self._package.path}: the network has {outputs} outputs, "
                f"the manifest lists {len(self.labels)} labels"
            )

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
    def thresholds(self) -> Mapping[str, float]:
        """Decision thresholds the manifest sets per label (labels without one are absent)."""
        return {label.name: label.threshold for label in self.manifest.labels if label.threshold is not None}

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest.input.size

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        expected = (self.manifest.input.channels, *self.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ValueError(
                f"{self.manifest.name} takes (N, {', '.join(map(str, expected))}), got {batch.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 → (N, n_labels) softmax probabilities."""
        with torch.no_grad():
            logits = self._network(self._tensor(batch))
        return torch.softmax(logits, dim=1).numpy().astype(np.float32)

    def explain(self, batch: np.ndarray, label_index: int) -> np.ndarray:
        """(N, C, H, W) → (N, H, W) Grad-CAM maps in [0, 1] for one label, at the input size.

        Plain Grad-CAM on a layer of stride s has one value per s×s block: its peak can only fall on a
        block centre, and where within its block a feature's evidence lies depends on the learned
        filters. So the map is averaged over copies of the input shifted by half a block and, for
        models trained with mirrored and flipped images ([explain] flips), mirrored and flipped too,
        each map moved back before averaging (augmented Grad-CAM, Morbidelli et al. 2020). Opposite
        flips cancel a feature's offset instead of reporting it.
        """
        if not 0 <= label_index < len(self.labels):
            raise ValueError(f"label index {label_index} out of range for labels {list(self.labels)}")
        explain = self.manifest.explain
        if explain is None:
            raise ValueError(f"{self.manifest.name}: the manifest has no [explain] target_layer")
        x = self._tensor(batch)
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            if self._cam is None:
                self._cam = GradCAM(
                    self._network,
                    explain.target_layer,
                    upsampler=_aligned_upsampler,
                    postprocessing=torch.nn.Identity(),
                )
                half = self.input_size[0] // self._cam.feature_map_size((1, *x.shape[1:]))[2] // 2
                flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)] if explain.flips else [()]
                shifts = [(0, 0), (0, half), (half, 0), (half, half)] if half else [(0, 0)]
                self._views = [(dims, dy, dx) for dims in flips for dy, dx in shifts]
            copies = torch.cat([_shift(x.flip(dims), dy, dx) for dims, dy, dx in self._views])
            maps = self._cam(copies, class_idx=label_index).detach()
        n = len(x)
        back = [
            _shift(maps[i * n : (i + 1) * n], -dy, -dx).flip(dims)
            for i, (dims, dy, dx) in enumerate(self._views)
        ]
        return _normalise(torch.stack(back).sum(dim=0))[:, 0].numpy().astype(np.float32)


def _aligned_upsampler(size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Upsample (N, 1, h, w) maps to ``size`` with cell i on input pixel stride * i, the centre of its
    receptive field in a network of strided convolutions padded to "same" (MONAI's ResNets). MONAI's
    default upsampler (bilinear, align_corners=False) puts it at stride * i + (stride - 1) / 2: for
    layer4 of a ResNet that is 15.5 input pixels down and to the right.
    """

    def upsample(maps: torch.Tensor) -> torch.Tensor:
        height, width = maps.shape[-2:]
        rows = torch.arange(size[0], dtype=maps.dtype) * (height / size[0])  # in feature cells
        cols = torch.arange(size[1], dtype=maps.dtype) * (width / size[1])
        grid_y = 2 * rows / max(height - 1, 1) - 1
        grid_x = 2 * cols / max(width - 1, 1) - 1
        grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)
        return torch.nn.functional.grid_sample(
            maps,
            grid.expand(len(maps), -1, -1, -1),
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )

    return upsample


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move image content down by dy and right by dx pixels (negative: up, left), repeating the edge."""
    height, width = images.shape[-2:]
    margins = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
    padded = torch.nn.functional.pad(images, margins, mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]
