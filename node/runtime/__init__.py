"""Loading model packages into runnable models, whatever framework they were built with."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from handlers.base import Model
from node.runtime.identity import ModelIdentity
from node.runtime.package import Manifest, ModelPackage, open_package, verify_weights


class LoadedModel(Model, Protocol):
    """A model handlers can run, that also says which package (and so which weights) it is."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def path(self) -> Path: ...

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def thresholds(self) -> Mapping[str, float]: ...


def load_model(package: ModelPackage | str | os.PathLike[str]) -> LoadedModel:
    """Verify the weights' sha256 before anything reads them, then build the model for its framework."""
    if not isinstance(package, ModelPackage):
        package = open_package(package)
    verify_weights(package.path, package.manifest)
    framework = package.manifest.framework
    if framework == "torch":
        from node.runtime.torch import TorchModel  # torch is imported only when a torch model is loaded

        return TorchModel(package)
    raise NotImplementedError(
        f"model {package.manifest.name}: framework {framework!r} is allowed in manifests "
        "but this node has no runtime for it yet (only 'torch')"
    )
