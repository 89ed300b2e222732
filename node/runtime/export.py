"""Convert a torch package to a whole-model file (TorchScript or ONNX) that carries its explanation.

Whole-model files cannot be hooked, so the exported network returns ``(outputs, features)``: the
manifest's target layer's feature maps ride along as a second output, named after the layer in ONNX.
The new package gets the same manifest with the new framework, file and sha256 — and so its own
device UID in results — and the same model card with a note on where it came from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import tomli_w
import torch

from node.runtime.package import MANIFEST, MODEL_CARD, ModelPackage, open_package, sha256_of, verify_weights
from node.runtime.torch import WithFeatures, build_network

Format = Literal["torchscript", "onnx"]
FEATURES_OUTPUT = "features"


def write_whole_model(
    network: torch.nn.Module, target_layer: str | None, example: torch.Tensor, path: Path, to: Format
) -> None:
    """Trace ``network`` (with its target layer's features as a second output, when given) to ``path``."""
    module: torch.nn.Module = (
        network.eval() if target_layer is None else WithFeatures(network, target_layer).eval()
    )
    if to == "torchscript":
        with torch.no_grad():
            torch.jit.trace(module, example, check_trace=False).save(str(path))
        return
    outputs = ["outputs"] if target_layer is None else ["outputs", target_layer]
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["input"],
        output_names=outputs,
        dynamic_axes={"input": {0: "batch"}} | {name: {0: "batch"} for name in outputs},
        dynamo=False,
        export_params=True,
        do_constant_folding=True,
    )


def export_package(
    package_dir: str | os.PathLike[str], to: Format, out_dir: str | os.PathLike[str]
) -> ModelPackage:
    """Write ``out_dir`` as a ``to`` package of the torch state_dict package in ``package_dir``."""
    source = open_package(package_dir)
    manifest = source.manifest
    if manifest.framework != "torch" or manifest.architecture is None:
        raise ValueError(f"{source.path}: only torch state_dict packages can be exported")
    verify_weights(source.path, manifest)
    network = build_network(source)
    target = manifest.explain.target_layer if manifest.explain and manifest.task == "classification" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = "model.onnx" if to == "onnx" else "model.ts"
    example = torch.zeros(1, manifest.input.channels, *manifest.input.size)
    write_whole_model(network, target, example, out / weights, to)
    data = manifest.model_dump(mode="json", exclude_none=True)
    del data["architecture"]
    data |= {
        "framework": "onnx" if to == "onnx" else "torch",
        "weights": weights,
        "sha256": sha256_of(out / weights),
    }
    (out / MANIFEST).write_text(tomli_w.dumps(data), encoding="utf-8")
    card = source.path / MODEL_CARD
    if card.is_file():
        shutil.copyfile(card, out / MODEL_CARD)
        with (out / MODEL_CARD).open("a", encoding="utf-8") as stream:
            stream.write(
                f"\n## This package\nExported to {to} by `ainode models export` from {manifest.name} "
                f"{manifest.version} (weights sha256 {manifest.sha256}); the figures above were measured on "
                "that package.\n"
            )
    return open_package(out)
