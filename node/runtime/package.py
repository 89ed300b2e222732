"""Model packages: a folder ``models/<name>/`` with ``manifest.toml``, a weights file and ``MODEL_CARD.md``.

The manifest is the one place that says what a model is (architecture, labels, codes, task options,
disclaimer) and which weights it runs with (sha256). A package whose weights do not match is refused,
so a result can always be traced to the exact weights that produced it. Nothing here imports a deep
learning framework: listing and checking packages stays cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.sr.coding import Code

from node.runtime.identity import DEFAULT_DISCLAIMER, ModelIdentity

MANIFEST = "manifest.toml"
MODEL_CARD = "MODEL_CARD.md"

log = logging.getLogger(__name__)

# semver.org's own regular expression (2.0.0), so "1.2" or "v1.2.3" are refused rather than misordered.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


class ManifestError(ValueError):
    """A manifest that cannot be read or does not follow the schema; the message names the key."""


class ModelMissing(LookupError):
    """No valid package of the name (and version) asked for."""


class ModelRefused(Exception):
    """A package that must not run: weights missing or not the ones the manifest vouches for."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _code(table: Any) -> Code:
    """A label's ``code`` table (``value``, ``scheme``, ``meaning``: the concept the label stands for
    in results, e.g. SNOMED CT) as the one Code type the node uses, pydicom's."""
    if isinstance(table, Code):
        return table
    if (
        not isinstance(table, Mapping)
        or set(table) != {"value", "scheme", "meaning"}
        or not all(isinstance(part, str) and part for part in table.values())
    ):
        raise ValueError("a code is a table of value, scheme and meaning, each a non-empty string")
    return Code(table["value"], table["scheme"], table["meaning"])


def code_table(code: Code) -> dict[str, str]:
    """A coded concept as a manifest writes it."""
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}


class Label(_Strict):
    name: str = Field(min_length=1)
    code: Annotated[Code, PlainValidator(_code), PlainSerializer(code_table)] | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)


class Architecture(_Strict):
    """For a torch state_dict: the MONAI network to build. Whole-model files (TorchScript, Keras, ONNX)
    carry their own architecture and have none."""

    network: str = Field(min_length=1)  # a class in monai.networks.nets
    args: dict[str, Any] = Field(default_factory=dict)


class InputSpec(_Strict):
    """What the network takes. Handlers produce (C, H, W) images in [0, 1]; the runtime then applies
    ``(x - mean) / std`` per channel, so a hospital's model trained with its own normalisation runs as
    trained (e.g. ImageNet's mean and std)."""

    size: tuple[int, int]  # (H, W) the model takes
    channels: int = Field(ge=1)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @field_validator("size")
    @classmethod
    def _positive(cls, size: tuple[int, int]) -> tuple[int, int]:
        if min(size) < 1:
            raise ValueError("both sides must be positive")
        return size

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != self.channels:
                raise ValueError(f"{key}: {len(values)} values for {self.channels} channels")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std: every value must be positive")
        return self


class ExplainSpec(_Strict):
    """Grad-CAM's target: a layer name (torch module, Keras layer) or, for ONNX, the name of the output
    that carries that layer's feature maps. ``classifier`` names the final linear layer when the head
    is global average pooling + that layer: Grad-CAM then equals CAM from the forward pass alone (the
    fast path); the runtime checks the claim numerically at load."""

    target_layer: str = Field(min_length=1)
    classifier: str | None = Field(default=None, min_length=1)
    # Input pixel (row and column) at the centre of feature cell 0; cell i is at offset + stride * i.
    # 0 for strided convolutions padded to "same" (ResNet, EfficientNet); every 2x2 average-pool
    # transition adds half the stride before it (MONAI's DenseNet: 14 at class_layers, stride 32).
    cell_offset: float = Field(default=0.0, ge=0.0)
    flips: bool = False  # trained with mirrored and flipped images: explanations may average over them


class Manifest(_Strict):
    """The schema of ``manifest.toml``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    handler: str = Field(min_length=1)
    framework: Literal["torch", "keras", "onnx"]
    task: Literal["classification", "segmentation"] = "classification"
    weights: str = Field(pattern=r"^[^/\\]+$")  # a file inside the package folder, never a path out of it
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    family: str = Field(min_length=1)
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    disclaimer: str
    architecture: Architecture | None = None
    input: InputSpec
    options: dict[str, Any] = Field(default_factory=dict)  # task parameters for the handler
    labels: list[Label] = Field(min_length=1)
    explain: ExplainSpec | None = None

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        if not _SEMVER.match(version):
            raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        return version

    @field_validator("disclaimer")
    @classmethod
    def _disclaims(cls, disclaimer: str) -> str:
        if DEFAULT_DISCLAIMER not in disclaimer:
            raise ValueError(f"must contain {DEFAULT_DISCLAIMER!r}")
        return disclaimer

    @model_validator(mode="after")
    def _unique_labels(self) -> Manifest:
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"labels: names must be unique, got {names}")
        return self

    @model_validator(mode="after")
    def _architecture_for_state_dicts_only(self) -> Manifest:
        if self.architecture is not None and self.framework != "torch":
            raise ValueError(
                f"architecture: a {self.framework} file carries its own architecture; leave it out"
            )
        return self

    @model_validator(mode="after")
    def _explained_classifiers(self) -> Manifest:
        if self.task == "classification" and self.explain is None:
            raise ValueError("explain: a classifier needs [explain] target_layer; every result is explained")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]


@dataclass(frozen=True)
class ModelPackage:
    """A package folder with its parsed manifest. It is path-like, so ``Path(package)`` is the folder."""

    path: Path
    manifest: Manifest

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest.weights

    @property
    def identity(self) -> ModelIdentity:
        return identity(self.manifest)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        parts.append(f"{key}: {item['msg']}")
    return "; ".join(parts)


def load_manifest(package_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``manifest.toml``; a ManifestError names the file and each bad key."""
    path = Path(package_dir) / MANIFEST
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {_describe(exc)}") from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(package_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Refuse weights that are missing or differ from what the manifest (and so the audit) names."""
    weights = Path(package_dir) / manifest.weights
    if not weights.is_file():
        raise ModelRefused(f"model {manifest.name} {manifest.version}: weights file {weights} is missing")
    actual = sha256_of(weights)
    if actual != manifest.sha256:
        raise ModelRefused(
            f"model {manifest.name} {manifest.version}: weights file {weights} has sha256 {actual}, "
            f"the manifest expects {manifest.sha256}"
        )


def open_package(package_dir: str | os.PathLike[str]) -> ModelPackage:
    return ModelPackage(Path(package_dir), load_manifest(package_dir))


def discover(models_dir: str | os.PathLike[str]) -> list[ModelPackage]:
    """Every valid package directly under ``models_dir``, by name then version. A broken manifest is
    logged and skipped, so one bad package does not take the others down."""
    root = Path(models_dir)
    packages = []
    for manifest_path in sorted(root.glob(f"*/{MANIFEST}")):
        try:
            packages.append(open_package(manifest_path.parent))
        except ManifestError as exc:
            log.warning("skipping model package: %s", exc)
    return sorted(packages, key=lambda p: (p.manifest.name, semver_key(p.manifest.version)))


def semver_key(version: str) -> tuple[Any, ...]:
    """Sort key with semver precedence: a pre-release sorts before its release, numeric identifiers
    numerically and before alphanumeric ones; build metadata is ignored."""
    match = _SEMVER.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a semantic version")
    major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    identifiers = tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in pre.split("."))
    return (major, minor, patch, 0, identifiers)


def select(models_dir: str | os.PathLike[str], name: str, version: str | None = None) -> ModelPackage:
    """The package ``name`` at ``version``, or its newest version. Its weights are not read here:
    loading verifies them (:func:`node.runtime.load_model`), and so does ``ainode check-config``."""
    candidates = [p for p in discover(models_dir) if p.manifest.name == name]
    if version is not None:
        candidates = [p for p in candidates if p.manifest.version == version]
    if not candidates:
        wanted = f"{name} {version}" if version else name
        raise ModelMissing(f"no valid model package {wanted} in {models_dir}")
    return max(candidates, key=lambda p: semver_key(p.manifest.version))


def identity(manifest: Manifest) -> ModelIdentity:
    return ModelIdentity(
        name=manifest.name,
        version=manifest.version,
        sha256=manifest.sha256,
        family=manifest.family,
        disclaimer=manifest.disclaimer,
    )
