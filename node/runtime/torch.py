"""PyTorch runtime: a MONAI network built from the manifest and its state_dict, or a TorchScript file.

A state_dict package names its MONAI network in ``[architecture]``; a forward hook reads the target
layer. A TorchScript file carries its own architecture but cannot be hooked, so
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
        self._captured: list[torch.Tensor] = []
        explain = package.manifest.explain
        if explain is not None and not self._scripted:
            layer = dict(self._network.named_modules()).get(explain.target_layer)
            if layer is None:
                raise ValueError(
                    f"{package.path}: explain.target_layer {explain.target_layer!r} is not a layer"
                )
            layer.register_forward_hook(lambda _module, _inputs, output: self._captured.append(output))
        self._check()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(outputs, the target layer's features or None). A TorchScript file returns both; a hooked
        network's features are the layer's last output in the pass — a module the network calls more
        than once (MONAI's EfficientNet applies one ``_swish`` after its stem and its head) is read
        where it feeds the head."""
        self._captured.clear()
        result = self._network(x)
        if isinstance(result, tuple | list):
            if not self._scripted or len(result) != 2:
                raise ValueError(f"{self.path}: the network returns {len(result)} outputs")
            return result[0], result[1]
        features = self._captured[-1] if self._captured else None
        self._captured.clear()
        return result, features

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

    def _gradient_cam(self, x: np.ndarray, label_index: int) -> np.ndarray:
        """Grad-CAM (Selvaraju et al. 2017): feature maps weighted by the spatial mean of the class
        logit's gradient, summed, ReLU."""
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            outputs, features = self._explained_forward(torch.from_numpy(x).requires_grad_(True))
            (gradient,) = torch.autograd.grad(outputs[:, label_index].sum(), features)
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        return torch.relu((weights * features).sum(dim=1)).detach().numpy()

    def _classifier_weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        parameters = dict(self._network.named_parameters())
        weight, bias = named(parameters, f"{name}.weight"), named(parameters, f"{name}.bias")
        if weight is None or bias is None:
            raise ValueError(f"{self.path}: explain.classifier {name!r} is not a linear layer with a bias")
        return weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32)
