"""The runtime layer: one network in every supported format gives the same probabilities and heatmaps,
the CAM fast path equals gradient Grad-CAM, and packages whose network contradicts their manifest are
refused at load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tomli_w
import torch
from monai.networks.nets import BasicUNet, EfficientNetBN

from node.runtime import PackagedModel, fastest, load_model
from node.runtime.export import export_package, write_whole_model
from node.runtime.model import DEFAULT_BATCH, set_batch, upsample_aligned
from node.runtime.package import MANIFEST, open_package, sha256_of
from node.runtime.validate import validate_package

CT_PACKAGE = Path(__file__).resolve().parents[1] / "models" / "ct-hemorrhage"
CHEST_PACKAGE = CT_PACKAGE.parent / "chest-xray"
LABELS = ["a", "b", "c"]
SIZE = 32


def write_manifest(folder: Path, weights: str, framework: str, **fields: Any) -> Path:
    """A package around an existing weights file."""
    manifest = {
        "name": "probe",
        "version": "1.0.0",
        "handler": "ct_hemorrhage",
        "framework": framework,
        "weights": weights,
        "sha256": sha256_of(folder / weights),
        "family": "test network",
        "description": "runtime test",
        "intended_use": "tests",
        "disclaimer": "NOT FOR DIAGNOSTIC USE.",
        "input": {"size": [SIZE, SIZE], "channels": 3},
        "labels": [{"name": name} for name in LABELS],
        "explain": {"target_layer": "features", "classifier": "fc"},
    } | fields
    manifest = {key: value for key, value in manifest.items() if value is not None}
    (folder / MANIFEST).write_text(tomli_w.dumps(manifest), encoding="utf-8")
    return folder


class TinyNet(torch.nn.Module):
    """Three convolutions, global pooling and a linear head; built the same way in Keras below."""

    def __init__(self, pooling: str = "average") -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.features = torch.nn.ReLU()
        self.fc = torch.nn.Linear(16, len(LABELS))
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.features(self.conv3(torch.relu(self.conv2(x))))
        pooled = x.mean(dim=(2, 3)) if self.pooling == "average" else x.amax(dim=(2, 3))
        return self.fc(pooled)


def tiny_keras(net: TinyNet) -> keras.Model:
    """TinyNet in Keras, channels-last, ending in softmax as Keras classifiers usually do."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax", name="fc")(x)
    model = keras.Model(inputs, outputs)
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(net, name)
        layer = model.get_layer("features" if name == "conv3" else name)
        layer.set_weights([conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.detach().numpy()])
    model.get_layer("fc").set_weights([net.fc.weight.detach().numpy().T, net.fc.bias.detach().numpy()])
    return model


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def formats(tiny: TinyNet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, PackagedModel]:
    """TinyNet's weights as TorchScript, ONNX, .keras and .h5 packages, loaded."""
    example = torch.zeros(1, 3, SIZE, SIZE)
    models = {}
    for name, framework, weights in (
        ("torchscript", "torch", "model.ts"),
        ("onnx", "onnx", "model.onnx"),
        ("keras", "keras", "model.keras"),
        ("h5", "keras", "model.h5"),
    ):
        folder = tmp_path_factory.mktemp(name)
        if framework == "keras":
            tiny_keras(tiny).save(folder / weights)
        else:
            write_whole_model(tiny, "features", example, folder / weights, name)  # type: ignore[arg-type]
        models[name] = load_model(write_manifest(folder, weights, framework))
    return models


def images(n: int, channels: int = 3, size: int = SIZE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


def correlations(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) for x, y in zip(a, b, strict=True)]


def assert_fast_path_equals_gradients(model: PackagedModel, x: np.ndarray) -> None:
    """Both methods give the same maps for every label whose map is not empty. With random weights a
    class's map may be all negative, so zero after ReLU; at least one must be informative."""
    assert model.explain_methods == ("gradient", "cam")
    pairs = [
        (model.explain(x, label, method="gradient"), model.explain(x, label, method="cam"))
        for label in range(len(model.labels))
    ]
    informative = [(g, c) for g, c in pairs if min(np.ptp(m) for m in g) > 0]
    assert informative
    assert all(min(correlations(g, c)) > 0.99 for g, c in informative)


def test_one_network_in_every_format_gives_the_same_probabilities_and_heatmaps(
    tiny: TinyNet, formats: dict[str, PackagedModel]
) -> None:
    x = images(4)
    with torch.no_grad():
        reference = torch.softmax(tiny(torch.from_numpy(x)), dim=1).numpy()
    reference_maps = formats["torchscript"].explain(x, 2, method="cam")
    assert formats["torchscript"].explain_methods == ("gradient", "cam")
    assert formats["keras"].explain_methods == ("gradient", "cam")
    assert formats["onnx"].explain_methods == ("cam",)  # ONNX Runtime has no gradients
    for name, model in formats.items():
        np.testing.assert_allclose(model.predict(x), reference, atol=1e-4, err_msg=name)
        for method in model.explain_methods:
            maps = model.explain(x, 2, method=method)
            assert maps.shape == (4, SIZE, SIZE)
            np.testing.assert_allclose(maps, reference_maps, atol=1e-3, err_msg=f"{name} {method}")


def test_several_labels_from_one_forward_pass_equal_one_label_at_a_time(
    formats: dict[str, PackagedModel],
) -> None:
    x = images(2)
    for name, model in formats.items():
        for method in model.explain_methods:
            together = model.explain(x, [2, 0, 1], method=method)
            assert together.shape == (2, 3, SIZE, SIZE)
            alone = np.stack([model.explain(x, label, method=method) for label in (2, 0, 1)], axis=1)
            np.testing.assert_allclose(together, alone, atol=1e-5, err_msg=f"{name} {method}")


def test_the_chest_models_findings_by_gradients_from_one_pass_equal_each_alone() -> None:
    """The chest model has no pooling head, so its several findings are explained by gradients: one
    forward pass, one backward pass per finding."""
    model = load_model(CHEST_PACKAGE)
    assert model.explain_methods == ("gradient",)
    x = images(1, channels=1, size=192)
    together = model.explain(x, [1, 2, 3])[0]
    for row, label in enumerate((1, 2, 3)):
        np.testing.assert_allclose(together[row], model.explain(x, label)[0], atol=1e-5)
    assert min(np.ptp(m) for m in together) > 0  # informative maps, not three empty ones


def test_passes_split_into_batches_give_what_one_pass_gives(formats: dict[str, PackagedModel]) -> None:
    x = images(5)
    model = formats["torchscript"]
    whole = {method: model.explain(x, [0, 2], method=method) for method in model.explain_methods}
    probabilities = model.predict(x)
    set_batch(2)  # 5 images, and 4 shifted copies of each to explain: passes of 2
    try:
        np.testing.assert_allclose(model.predict(x), probabilities, atol=1e-6)
        for method, maps in whole.items():
            np.testing.assert_allclose(model.explain(x, [0, 2], method=method), maps, atol=1e-5)
    finally:
        set_batch(DEFAULT_BATCH)


def test_the_fast_path_equals_gradient_grad_cam_on_the_ct_model() -> None:
    from handlers.ct_hemorrhage import DEFAULT_WINDOWS, preprocess
    from training.ct_phantom import sample_slice

    model = load_model(CT_PACKAGE)
    rng = np.random.default_rng(3)
    x = np.stack(
        [preprocess(sample_slice(rng, 256, 1.0).hu, model.input_size, DEFAULT_WINDOWS) for _ in range(3)]
    )
    gradient = model.explain(x, 1, method="gradient")
    cam = model.explain(x, 1, method="cam")
    assert min(correlations(gradient, cam)) > 0.99
    assert model.explain(x, 1).tobytes() == cam.tobytes()  # auto takes the fast path


def test_a_keras_applications_resnet50_h5_is_explained_both_ways(tmp_path: Path) -> None:
    """The prototypes' own kind of model: a Keras ResNet50 saved as .h5 (random weights here)."""
    keras.utils.set_random_seed(0)  # some draws leave a map empty by one method, float noise by the other
    network = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=2)
    network.save(tmp_path / "resnet50.h5")
    package = write_manifest(
        tmp_path,
        "resnet50.h5",
        "keras",
        input={"size": [64, 64], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        labels=[{"name": "normal"}, {"name": "hemorrhage"}],
        explain={"target_layer": "conv5_block3_out", "classifier": "predictions"},
    )
    assert_fast_path_equals_gradients(load_model(package), images(2, size=64))
    assert [check.name for check in validate_package(package)][-1] == "explain hemorrhage"


def test_a_layer_the_network_calls_twice_is_read_where_it_feeds_the_head(tmp_path: Path) -> None:
    """MONAI's EfficientNet applies one ``_swish`` module after its stem and after its head; Grad-CAM
    must pair the head's activation with its own gradient (the fast path checks the result)."""
    args = {"model_name": "efficientnet-b0", "pretrained": False, "spatial_dims": 2, "num_classes": 3}
    torch.manual_seed(0)
    torch.save(EfficientNetBN(**args).state_dict(), tmp_path / "weights.pt")
    package = write_manifest(
        tmp_path,
        "weights.pt",
        "torch",
        architecture={"network": "EfficientNetBN", "args": args},
        input={"size": [96, 96], "channels": 3},
        explain={"target_layer": "_swish", "classifier": "_fc"},
    )
    assert_fast_path_equals_gradients(load_model(package), images(2, size=96))


def test_cells_are_placed_at_the_manifests_offset() -> None:
    cells = np.zeros((1, 4, 4), np.float32)
    cells[0, 1, 2] = 1.0
    for offset in (0.0, 14.0):
        peak = np.unravel_index(np.argmax(upsample_aligned(cells, (128, 128), offset)[0]), (128, 128))
        assert peak == (offset + 32, offset + 64)


@pytest.mark.parametrize("to", ["onnx", "torchscript"])
def test_an_exported_ct_package_runs_like_its_source(to: str, tmp_path: Path) -> None:
    source = load_model(CT_PACKAGE)
    exported = load_model(export_package(CT_PACKAGE, to, tmp_path))  # type: ignore[arg-type]
    x = images(2, size=128)
    np.testing.assert_allclose(exported.predict(x), source.predict(x), atol=1e-4)
    np.testing.assert_allclose(exported.explain(x, 1), source.explain(x, 1), atol=1e-3)
    assert exported.identity.device_uid != source.identity.device_uid  # other weights file, other device


def test_a_false_claim_about_the_head_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    write_whole_model(
        TinyNet(pooling="max"), "features", torch.zeros(1, 3, SIZE, SIZE), tmp_path / "m.ts", "torchscript"
    )
    with pytest.raises(ValueError, match="global average pooling"):
        load_model(write_manifest(tmp_path, "m.ts", "torch"))
    # Without the claim the same network is explained by its gradients.
    assert load_model(
        write_manifest(tmp_path, "m.ts", "torch", explain={"target_layer": "features"})
    ).explain_methods == ("gradient",)


def test_onnx_without_a_pooling_head_cannot_be_explained(tiny: TinyNet, tmp_path: Path) -> None:
    write_whole_model(tiny, "features", torch.zeros(1, 3, SIZE, SIZE), tmp_path / "m.onnx", "onnx")
    with pytest.raises(ValueError, match="no gradients"):
        load_model(write_manifest(tmp_path, "m.onnx", "onnx", explain={"target_layer": "features"}))
    with pytest.raises(ValueError, match="not an output"):
        load_model(
            write_manifest(tmp_path, "m.onnx", "onnx", explain={"target_layer": "layer4", "classifier": "fc"})
        )


def test_a_segmentation_model_returns_masks_in_every_format(tmp_path: Path) -> None:
    args = {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]}
    torch.manual_seed(0)
    network = BasicUNet(**args).eval()
    torch.save(network.state_dict(), tmp_path / "weights.pt")
    package = write_manifest(
        tmp_path,
        "weights.pt",
        "torch",
        task="segmentation",
        architecture={"network": "BasicUNet", "args": args},
        labels=[{"name": "background"}, {"name": "lesion"}],
        explain=None,
    )
    model = load_model(package)
    x = images(2)
    masks = model.segment(x)
    assert masks.shape == (2, 2, SIZE, SIZE)
    np.testing.assert_allclose(masks.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="segment"):
        model.predict(x)
    exported = load_model(export_package(package, "onnx", tmp_path / "onnx"))
    np.testing.assert_allclose(exported.segment(x), masks, atol=1e-4)
    assert [check.name for check in validate_package(package)][-1] == "segment"


def test_a_package_runs_under_onnx_runtime_only_where_that_is_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The choice follows the measured cost (stubbed here: no timing in tests); the ONNX model gives the
    source's results under the source's name, and its export is written once."""
    source = load_model(CT_PACKAGE)
    package = open_package(CT_PACKAGE)
    costs = {"TorchModel": 10.0, "OnnxModel": 5.0}
    monkeypatch.setattr(fastest, "cost_ms", lambda model: costs[type(model).__name__])
    chosen = fastest.fastest(load_model(package), tmp_path)
    assert type(chosen).__name__ == "OnnxModel"
    assert chosen.identity == source.identity and chosen.path == CT_PACKAGE  # it stands for the package
    x = images(3, size=128)
    np.testing.assert_allclose(chosen.predict(x), source.predict(x), atol=1e-4)
    np.testing.assert_allclose(chosen.explain(x, [0, 1]), source.explain(x, [0, 1]), atol=1e-3)
    (export,) = tmp_path.iterdir()
    written = (export / "model.onnx").stat().st_mtime_ns

    costs["OnnxModel"] = 20.0
    assert type(fastest.fastest(load_model(package), tmp_path)).__name__ == "TorchModel"
    assert (export / "model.onnx").stat().st_mtime_ns == written and list(tmp_path.iterdir()) == [export]
    # The chest model is explained by gradients, which ONNX Runtime lacks: it stays with torch.
    assert not fastest.convertible(open_package(CHEST_PACKAGE))
