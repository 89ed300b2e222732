"""PyTorch runtime: a MONAI network built from the manifest and its state_dict, or a TorchScript file.

A state_dict package names its MONAI network in ``[architecture]``; :class:`WithFeatures` hooks the
target layer so the network returns ``(outputs, features)``. A TorchScript file carries its own
architecture but cannot be hooked, so it must return that pair itself, as ``node.runtime.export``
writes it (by scripting the same wrapper). Only this module imports torch, so listing and checking packages
stays light. Thread counts are the caller's business (``torch.set_num_threads``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from typing import Any

import monai.networks.nets
import numpy as np
import torch

from node.runtime.model import PackagedModel, named
from node.runtime.package import ModelPackage


def build_network(package: ModelPackage) -> torch.nn.Module:
    """The package's MONAI network with its state_dict loaded, in eval mode."""
    manifest = package.manifest
    assert manifest.architecture is not None
    network_class = getattr(monai.networks.nets, manifest.architecture.network, None)
    if not (isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)):
        raise ValueError(
            f"{package.path}: architecture.network {manifest.architecture.network!r} "
            "is not a network in monai.networks.nets"
        )
    network = network_class(**manifest.architecture.args)
    state = torch.load(package.weights_path, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or differently shaped parameters
        raise ValueError(f"{package.path}: the weights do not fit [architecture]: {exc}") from exc
    return network.eval()


class WithFeatures(torch.nn.Module):
    """``network`` returning ``(outputs, output of target_layer)``. The features are the layer's last
    output in the pass: a module the network calls more than once (MONAI's EfficientNet applies one
    ``_swish`` after its stem and its head) is read where it feeds the head.

    With ``features_leaf``, a pass that records gradients starts its graph at the features: they become
    a leaf the rest of the network runs on, so Grad-CAM's pass records nothing before the target layer
    (with the parameters frozen) and its backward passes stop there."""

    def __init__(self, network: torch.nn.Module, target_layer: str, features_leaf: bool = False) -> None:
        super().__init__()
        layer = dict(network.named_modules()).get(target_layer)
        if layer is None:
            raise ValueError(f"explain.target_layer {target_layer!r} is not a layer")
        self.network = network
        self._captured: list[torch.Tensor] = []
        self._features_leaf = features_leaf
        layer.register_forward_hook(self._capture)

    def _capture(self, _module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not (self._features_leaf and torch.is_grad_enabled()):
            self._captured.append(output)
            return output
        leaf = output.detach().requires_grad_(True)
        self._captured.append(leaf)
        return leaf.clone()  # what the network runs on: an in-place layer next cannot change the leaf

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        outputs = self.network(x)
        return outputs, self._captured[-1]


def _load_torchscript(package: ModelPackage) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(package.weights_path), map_location="cpu").eval()
    except (RuntimeError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{package.path}: {package.manifest.weights} is not a TorchScript file; a state_dict needs "
            f"[architecture]: {exc}"
        ) from exc


def _load_state_dict(package: ModelPackage) -> torch.nn.Module:
    network = build_network(package).requires_grad_(False)  # run, never trained: no parameter gradients
    explain = package.manifest.explain
    if explain is None:
        return network
    try:
        return WithFeatures(network, explain.target_layer, features_leaf=True)
    except ValueError as exc:
        raise ValueError(f"{package.path}: {exc}") from exc


class TorchModel(PackagedModel):
    """A loaded torch package (state_dict of a MONAI network, or TorchScript)."""

    def __init__(self, package: ModelPackage) -> None:
        super().__init__(package)
        scripted = package.manifest.architecture is None
        self._network: Any = _load_torchscript(package) if scripted else _load_state_dict(package)
        self._check()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(outputs, the target layer's features, or None for a network that returns only outputs)."""
        result = self._network(x)
        if not isinstance(result, tuple | list):
            return result, None
        if len(result) != 2:
            raise ValueError(f"{self.path}: the network returns {len(result)} outputs")
        return result[0], result[1]

    def _outputs(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            outputs, _ = self._forward(torch.from_numpy(x))
        return outputs.numpy()

    def _explained_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, features = self._forward(x)
        if features is None:
            raise ValueError(
                f"{self.path}: a TorchScript file must return (outputs, the target layer's features)"
            )
        return outputs, features

    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            outputs, features = self._explained_forward(torch.from_numpy(x))
        return features.numpy(), outputs.numpy()

    def _gradient_cam(self, x: np.ndarray, label_indices: Sequence[int]) -> np.ndarray:
        """Grad-CAM (Selvaraju et al. 2017): feature maps weighted by the spatial mean of the class
        logit's gradient, summed, ReLU. One forward pass serves every label; each label's backward pass
        runs only from the outputs back to the target layer, keeping the graph for the next."""
        maps = []
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            x_in = torch.from_numpy(x)
            if not isinstance(self._network, WithFeatures):  # TorchScript: the graph starts at the input
                x_in.requires_grad_(True)
            outputs, features = self._explained_forward(x_in)
            for i, label_index in enumerate(label_indices):
                keep = i < len(label_indices) - 1  # the graph, for the next label's pass
                (gradient,) = torch.autograd.grad(outputs[:, label_index].sum(), features, retain_graph=keep)
                weights = gradient.mean(dim=(2, 3), keepdim=True)
                maps.append(torch.relu((weights * features).sum(dim=1)).detach())
        return torch.stack(maps).numpy()

    def _classifier_weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        parameters = dict(self._network.named_parameters())
        weight, bias = named(parameters, f"{name}.weight"), named(parameters, f"{name}.bias")
        if weight is None or bias is None:
            raise ValueError(f"{self.path}: explain.classifier {name!r} is not a linear layer with a bias")
        return weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32)
