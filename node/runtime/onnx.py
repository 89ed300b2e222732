"""ONNX Runtime: ``.onnx`` files, whatever framework they were exported from.

ONNX Runtime computes no gradients, so a classifier is explained by the fast path alone: the file must
output the target layer's feature maps as a second output named ``[explain] target_layer``, and the
head must be global average pooling + the linear layer ``[explain] classifier``, whose weights are read
from the graph's initializers (``<classifier>.weight``, ``<classifier>.bias``, as torch.onnx names
them). ``node.runtime.export`` writes such files from torch packages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from node.runtime.model import PackagedModel, named, threads
from node.runtime.package import ModelPackage


class OnnxModel(PackagedModel):
    """A loaded ONNX package."""

    has_gradients = False

    def __init__(self, package: ModelPackage) -> None:
        super().__init__(package)
        try:
            self._graph = onnx.load(str(package.weights_path))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads()  # the job workers share the CPU
            self._session = onnxruntime.InferenceSession(
                self._graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnx and onnxruntime raise their own exception types for bad files
            raise ValueError(
                f"{package.path}: {package.manifest.weights} is not a usable ONNX file: {exc}"
            ) from exc
        self._input = self._session.get_inputs()[0].name
        names = [output.name for output in self._session.get_outputs()]
        explain = package.manifest.explain
        self._feature_output = explain.target_layer if explain is not None else None
        if self._feature_output is not None and self._feature_output not in names:
            raise ValueError(
                f"{package.path}: explain.target_layer {self._feature_output!r} is not an output of the "
                f"ONNX graph (outputs: {names}); export the feature maps as a second output"
            )
        self._output = next(name for name in names if name != self._feature_output)
        self._check()

    def _outputs(self, x: np.ndarray) -> np.ndarray:
        (outputs,) = self._session.run([self._output], {self._input: x})
        return np.asarray(outputs)

    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self._feature_output is not None
        outputs, features = self._session.run([self._output, self._feature_output], {self._input: x})
        return np.asarray(features), np.asarray(outputs)

    def _gradient_cam(self, x: np.ndarray, label_indices: Sequence[int]) -> np.ndarray:
        raise ValueError(f"{self.manifest.name}: ONNX Runtime has no gradients; use the CAM fast path")

    def _classifier_weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        initialisers = {init.name: init for init in self._graph.graph.initializer}
        weight, bias = named(initialisers, f"{name}.weight"), named(initialisers, f"{name}.bias")
        if weight is None or bias is None:
            raise ValueError(
                f"{self.path}: explain.classifier {name!r}: the graph has no initialisers {name}.weight and "
                f"{name}.bias"
            )
        return numpy_helper.to_array(weight).astype(np.float32), numpy_helper.to_array(bias).astype(
            np.float32
        )
