"""Model packages: the manifest schema names what is wrong, foreign weights are refused, the newest
version wins, and the shipped demonstration package loads through the real path."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from node.jobs.run import loaded
from node.runtime import load_model
from node.runtime.package import (
    ManifestError,
    ModelRefused,
    discover,
    identity,
    load_manifest,
    select,
    verify_weights,
)
from training.common import write_manifest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "ct-hemorrhage"

MANIFEST = """\
name = "{name}"
version = "{version}"
handler = "ct_hemorrhage"
framework = "{framework}"
weights = "weights.pt"
sha256 = "{sha256}"
family = "ResNet50 classifier"
description = "test package"
intended_use = "tests"
disclaimer = "Test model. NOT FOR DIAGNOSTIC USE."
{extra}
[architecture]
network = "ResNet"
args = {{ block = "basic", layers = [1, 1, 1, 1], block_inplanes = [4, 8, 8, 8], spatial_dims = 2, \
n_input_channels = 3, num_classes = 2 }}

[input]
size = [32, 32]
channels = 3

[options]
aggregation = "max"

[[labels]]
name = "normal"

[[labels]]
name = "hemorrhage"
threshold = {threshold}
code = {{ value = "1386000", scheme = "SCT", meaning = "Intracranial hemorrhage" }}

[explain]
target_layer = "layer4"
"""


def make_package(
    root: Path,
    *,
    name: str = "demo",
    version: str = "1.0.0",
    framework: str = "torch",
    weights: bytes = b"not really weights",
    sha256: str | None = None,
    threshold: str = "0.5",
    extra: str = "",
) -> Path:
    folder = root / f"{name}-{version}"
    folder.mkdir(parents=True)
    (folder / "weights.pt").write_bytes(weights)
    digest = sha256 or hashlib.sha256(weights).hexdigest()
    (folder / "manifest.toml").write_text(
        MANIFEST.format(
            name=name, version=version, framework=framework, sha256=digest, threshold=threshold, extra=extra
        )
    )
    return folder


def test_a_valid_manifest_parses(tmp_path: Path) -> None:
    manifest = load_manifest(make_package(tmp_path))
    assert manifest.label_names == ["normal", "hemorrhage"]
    assert manifest.labels[1].code is not None and manifest.labels[1].code.value == "1386000"
    assert manifest.input.size == (32, 32)
    assert manifest.options == {"aggregation": "max"}
    assert manifest.explain is not None and manifest.explain.target_layer == "layer4"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"extra": 'colour = "blue"\n'}, "colour"),  # unknown key
        ({"version": "1.0"}, "version"),  # not semver
        ({"framework": "tensorflow"}, "framework"),
        ({"threshold": "1.5"}, "labels.1.threshold"),
        ({"sha256": "abc"}, "sha256"),
    ],
)
def test_manifest_errors_name_the_key(tmp_path: Path, change: dict[str, str], key: str) -> None:
    folder = make_package(tmp_path, **change)  # type: ignore[arg-type]
    with pytest.raises(ManifestError) as error:
        load_manifest(folder)
    assert f"{key}:" in str(error.value)
    assert str(folder / "manifest.toml") in str(error.value)


def test_a_disclaimer_without_the_warning_is_refused(tmp_path: Path) -> None:
    folder = make_package(tmp_path)
    path = folder / "manifest.toml"
    path.write_text(path.read_text().replace("Test model. NOT FOR DIAGNOSTIC USE.", "Works great."))
    with pytest.raises(ManifestError, match="disclaimer: .*NOT FOR DIAGNOSTIC USE"):
        load_manifest(folder)


def test_sha256_mismatch_is_refused_naming_file_and_hashes(tmp_path: Path) -> None:
    folder = make_package(tmp_path)
    manifest = load_manifest(folder)
    (folder / "weights.pt").write_bytes(b"tampered")
    actual = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(ModelRefused) as error:
        verify_weights(folder, manifest)
    message = str(error.value)
    assert "weights.pt" in message and manifest.sha256 in message and actual in message
    with pytest.raises(ModelRefused):
        load_model(folder)  # the loader checks before it reads


def test_missing_weights_are_refused(tmp_path: Path) -> None:
    folder = make_package(tmp_path)
    (folder / "weights.pt").unlink()
    with pytest.raises(ModelRefused, match="missing"):
        verify_weights(folder, load_manifest(folder))


def test_newest_version_is_selected_by_semver(tmp_path: Path) -> None:
    for version in ("1.2.0", "1.10.0", "1.10.0-rc.1", "0.9.9"):
        make_package(tmp_path, version=version)
    make_package(tmp_path, name="other", version="9.0.0")
    assert select(tmp_path, "demo").manifest.version == "1.10.0"  # not "1.2.0" as text would sort
    assert select(tmp_path, "demo", "1.2.0").manifest.version == "1.2.0"
    assert [p.manifest.version for p in discover(tmp_path) if p.manifest.name == "demo"] == [
        "0.9.9",
        "1.2.0",
        "1.10.0-rc.1",
        "1.10.0",
    ]
    with pytest.raises(LookupError):
        select(tmp_path, "demo", "2.0.0")
    with pytest.raises(LookupError):
        select(tmp_path, "absent")


def test_select_refuses_a_newest_package_with_foreign_weights(tmp_path: Path) -> None:
    make_package(tmp_path, version="1.0.0")
    make_package(tmp_path, version="2.0.0", sha256="0" * 64)
    with pytest.raises(ModelRefused, match="2.0.0"):
        loaded(tmp_path, "demo")  # as a job resolves it: the newest, verified before it is read


def test_a_broken_package_does_not_hide_the_others(tmp_path: Path) -> None:
    make_package(tmp_path, version="1.0.0")
    make_package(tmp_path, version="2.0.0", extra="oops = 1\n")
    assert [p.manifest.version for p in discover(tmp_path)] == ["1.0.0"]


def test_an_architecture_belongs_to_torch_state_dicts_only(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="onnx file carries its own architecture"):
        load_manifest(make_package(tmp_path, framework="onnx"))


def test_a_file_that_is_not_what_the_manifest_says_is_refused_clearly(tmp_path: Path) -> None:
    folder = make_package(tmp_path)
    text = (folder / "manifest.toml").read_text()
    (folder / "manifest.toml").write_text(
        text[: text.index("[architecture]")] + text[text.index("[input]") :]
    )
    with pytest.raises(ValueError, match="not a TorchScript file; a state_dict needs \\[architecture\\]"):
        load_model(folder)


def test_identity_carries_the_weights_hash(tmp_path: Path) -> None:
    manifest = load_manifest(make_package(tmp_path))
    named = identity(manifest)
    assert (named.name, named.version, named.sha256) == ("demo", "1.0.0", manifest.sha256)
    assert "NOT FOR DIAGNOSTIC USE" in named.disclaimer


def test_listing_packages_does_not_import_torch() -> None:
    code = "import sys, node.runtime.package; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_shipped_package_loads_predicts_and_explains() -> None:
    package = select(REPO / "models", "ct-hemorrhage")
    assert (package.path / "MODEL_CARD.md").read_text().count("NOT FOR DIAGNOSTIC USE") >= 1
    assert (package.path / "weights.pt").stat().st_size <= 8 * 1024 * 1024
    model = load_model(package)
    assert model.identity == package.identity
    assert model.thresholds == {"hemorrhage": 0.5}
    batch = np.random.default_rng(0).random((2, 3, *model.input_size), dtype=np.float32)
    probabilities = model.predict(batch)
    assert probabilities.shape == (2, 2) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    heatmaps = model.explain(batch, 1)
    assert heatmaps.shape == (2, *model.input_size) and heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and np.isclose(heatmaps.max(), 1.0)
    with pytest.raises(ValueError, match="takes"):
        model.predict(batch[:, :1])


def test_a_worker_reloads_a_package_whose_weights_were_replaced(tmp_path: Path) -> None:
    """A worker keeps models loaded between jobs; weights replaced in place (with the manifest's sha256
    updated, as select() requires) must not keep running under the old ones."""
    folder = tmp_path / "ct-hemorrhage"
    shutil.copytree(SHIPPED, folder)
    first = loaded(tmp_path, "ct-hemorrhage")
    assert loaded(tmp_path, "ct-hemorrhage") is first  # kept between jobs
    state = torch.load(folder / "weights.pt", weights_only=True)
    state["fc.bias"] += 1.0
    torch.save(state, folder / "weights.pt")
    manifest = tomllib.loads((folder / "manifest.toml").read_text(encoding="utf-8"))
    write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("weights", "sha256")})
    second = loaded(tmp_path, "ct-hemorrhage")
    assert second is not first
    assert second.manifest.sha256 == hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
