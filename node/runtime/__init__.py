"""Loading model packages into runnable models, whatever framework they were built with."""

from __future__ import annotations

import os

from node.runtime.model import PackagedModel
from node.runtime.package import ModelPackage, open_package, verify_weights

__all__ = ["PackagedModel", "load_model"]


def load_model(package: ModelPackage | str | os.PathLike[str]) -> PackagedModel:
    """Verify the weights' sha256 before anything reads them, then load the model with its framework's
    runtime (each imported only when a model of its kind is loaded: TensorFlow is an optional extra)."""
    if not isinstance(package, ModelPackage):
        package = open_package(package)
    verify_weights(package.path, package.manifest)
    framework = package.manifest.framework
    if framework == "torch":
        from node.runtime.torch import TorchModel

        return TorchModel(package)
    if framework == "onnx":
        from node.runtime.onnx import OnnxModel

        return OnnxModel(package)
    try:
        from node.runtime.keras import KerasModel
    except ImportError as exc:
        raise ValueError(
            f"model {package.manifest.name}: a keras model needs TensorFlow: pip install 'ainode[tensorflow]'"
        ) from exc
    return KerasModel(package)
