"""Keras runtime: ``.keras`` and ``.h5`` files through TensorFlow (the optional extra ``[tensorflow]``).

Keras models are channels-last; the shared layer hands over NCHW and gets NCHW back, so handlers and
heatmaps do not depend on the framework. Grad-CAM differentiates the class logit with GradientTape.
Most Keras classifiers end in a softmax (a Dense layer with softmax activation, or a Softmax/Activation
layer): the logit is then recomputed from that layer's input, since Grad-CAM is defined on the score
before softmax.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up banner is not the node's log

import keras
import numpy as np
import tensorflow as tf

from node.runtime.model import PackagedModel, softmax
from node.runtime.package import ModelPackage


def _activation_name(layer: Any) -> str:
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return str(getattr(activation, "__name__", "")) if activation is not None else ""


class KerasModel(PackagedModel):
    """A loaded Keras package."""

    def __init__(self, package: ModelPackage) -> None:
        super().__init__(package)
        try:
            self._network = keras.models.load_model(package.weights_path, compile=False)
        except Exception as exc:  # Keras raises ValueError, OSError or its own types for bad files
            raise ValueError(
                f"{package.path}: {package.manifest.weights} is not a usable Keras model: {exc}"
            ) from exc
        last = self._network.layers[-1]
        self.outputs_probabilities = _activation_name(last) == "softmax"
        # The tensor holding the logits: a softmax layer's input, or a Dense-softmax layer's input
        # (the logits are then that input times the layer's kernel plus its bias).
        self._dense_softmax = self.outputs_probabilities and isinstance(last, keras.layers.Dense)
        logit_source = last.input if self.outputs_probabilities else self._network.output
        explain = package.manifest.explain
        outputs = [logit_source]
        if explain is not None:
            try:
                outputs.append(self._network.get_layer(explain.target_layer).output)
            except ValueError as exc:
                raise ValueError(
                    f"{package.path}: explain.target_layer {explain.target_layer!r} is not a layer"
                ) from exc
        self._probe = keras.Model(self._network.inputs, outputs)
        self._check()

    def _logits(self, source: tf.Tensor) -> tf.Tensor:
        if self._dense_softmax:
            last = self._network.layers[-1]
            return tf.matmul(source, last.kernel) + last.bias
        return source

    def _channels_last(self, x: np.ndarray) -> tf.Tensor:
        return tf.convert_to_tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))

    def _outputs(self, x: np.ndarray) -> np.ndarray:
        outputs = np.asarray(self._network(self._channels_last(x), training=False))
        return outputs.transpose(0, 3, 1, 2) if outputs.ndim == 4 else outputs  # segmentation maps to NCHW

    def _features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source, features = self._probe(self._channels_last(x), training=False)
        logits = np.asarray(self._logits(source))
        outputs = softmax(logits) if self.outputs_probabilities else logits
        return np.asarray(features).transpose(0, 3, 1, 2), outputs

    def _gradient_cam(self, x: np.ndarray, label_indices: Sequence[int]) -> np.ndarray:
        """One forward pass under a persistent tape, one gradient per label."""
        with tf.GradientTape(persistent=True) as tape:
            source, features = self._probe(self._channels_last(x), training=False)
            logits = self._logits(source)
            scores = [tf.reduce_sum(logits[:, label_index]) for label_index in label_indices]
        maps = []
        for score in scores:
            weights = tf.reduce_mean(tape.gradient(score, features), axis=(1, 2), keepdims=True)
            maps.append(np.asarray(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))))
        del tape
        return np.stack(maps)

    def _classifier_weights(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            layer = self._network.get_layer(name)
        except ValueError as exc:
            raise ValueError(f"{self.path}: explain.classifier {name!r} is not a layer") from exc
        if not isinstance(layer, keras.layers.Dense) or not layer.use_bias:
            raise ValueError(f"{self.path}: explain.classifier {name!r} is not a Dense layer with a bias")
        kernel, bias = (np.asarray(w, dtype=np.float32) for w in layer.get_weights())
        return kernel.T, bias
