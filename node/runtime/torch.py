"""PyTorch runtime: a MONAI network built from the manifest and its state_dict, or a TorchScript file.

A state_dict package names its MONAI network in ``[architecture]``; Grad-CAM hooks the target layer
(``monai.visualize.GradCAM``). A TorchScript file carries its own architecture but cannot be hooked, so
it must return ``(outputs, features)``: the target layer's feature maps as a second output, as
``node.runtime.export`` writes it. Only this module imports torch, so listing and checking packages
stays light. Thread counts are the caller's business (``torch.set_num_threads``).
"""

from __future__ import annotations

import zipfile
from typing import Any

import monai.networks.nets
import numpy as np
import torch
from monai.visualize import GradCAM

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


def _load_torchscript(package: ModelPackage) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(package.weights_path), map_location="cpu").eval()
    except (RuntimeError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{package.path}: {package.manifest.weights} is not a TorchScript file; a state_dict needs "
            f"[architecture]: {exc}"
        ) from exc


class TorchModel(PackagedModel):
    """A loaded torch package (state_dict of a MONAI network, or TorchScript)."""

    def __init__(self, package: ModelPackage) -> None:
        super().__init__(package)
        self._scripted = package.manifest.architecture is None
        self._network: Any = _load_torchscript(package) if self._scripted else build_network(package)
        explain = package.manifest.explain
        self._cam: GradCAM | None = None
        if explain is not None and not self._scripted:
            if explain.target_layer not in dict(self._network.named_modules()):
                raise ValueError(
                    f"{package.path}: explain.target_layer {explain.target_layer!r} is not a layer"
                )
            self._cam = GradCAM(self._network, explain.target_layer)
        self._check()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(outputs, features or None): a TorchScript file gives both, a hooked network its output."""
        result = self._network(x)
        if isinstance(result, tuple | list):
            if not self._scripted or len(result) != 2:
                raise ValueError(f"{self.path}: the network returns {len(result)} outputs")
            return result[0], result[1]
        return result, None

    def _outputs(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            outputs, _ = self._forward(torch.from_numpy(x))
        return outputs.numpy()

    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features: torch.Tensor | None
        with torch.no_grad():
            if self._cam is not None:
                outputs = self._network(torch.from_numpy(x))  # GradCAM's hook records the target layer
                features = self._cam.nn_module.activations[self._cam.nn_module.target_layers[0]]
            else:
                outputs, features = self._forward(torch.from_numpy(x))
        if features is None:
            raise ValueError(
                f"{self.path}: a TorchScript file must return (outputs, the target layer's features)"
            )
        return features.detach().numpy(), outputs.numpy()

    def _gradient_cam(self, x: np.ndarray, label_index: int) -> np.ndarray:
        tensor = torch.from_numpy(x)
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            if self._cam is not None:
                return self._cam.compute_map(tensor, class_idx=label_index)[:, 0].detach().numpy()
            tensor.requires_grad_(True)  # so the graph reaches the features of a frozen network
            outputs, features = self._forward(tensor)
            assert features is not None
            (gradient,) = torch.autograd.grad(outputs[:, label_index].sum(), features)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * features).sum(dim=1)).detach().numpy()

    def _classifier_weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        parameters = dict(self._network.named_parameters())
        weight, bias = named(parameters, f"{name}.weight"), named(parameters, f"{name}.bias")
        if weight is None or bias is None:
            raise ValueError(f"{self.path}: explain.classifier {name!r} is not a linear layer with a bias")
        return weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32)
