"""QIL quantizers as tfmot ``Quantizer`` subclasses.

One class per kind of tensor. A quantizer holds settings only; its state
(``c``, ``d``, ``γ`` and the bit width) is created on the owning layer by
``build(tensor_shape, name, layer)`` through ``layer.add_weight``, so the same
objects serve qil_keras's own layers and tfmot's ``QuantizeWrapper``, and
checkpoints, ``trainable_weights`` and ``tf.distribute`` handle the state like
any other weight. The bit width lives in a non-trainable int32 variable, saved
with the model; a step reads it when it is traced (``ops.bits_when_traced``),
and a QIL model traces its steps again after ``set_bits`` (``width_changes``),
keeping the learned intervals.
"""

import numpy as np
import tensorflow_model_optimization as tfmot

from . import ops
from .._keras import keras, tf
from .init import interval_from_values

__all__ = ["QILWeightQuantizer", "QILActivationQuantizer", "check_bits"]


def check_bits(bits, name="bits"):
    """Validate a bit width: an integer from 2 to 8. Returns it as ``int``."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise TypeError(
            f"{name} must be an integer from {ops.MIN_BITS} to {ops.MAX_BITS}, got "
            f"{bits!r} ({type(bits).__name__}). Pass e.g. {name}=4."
        )
    if not ops.MIN_BITS <= int(bits) <= ops.MAX_BITS:
        raise ValueError(
            f"{name}={bits} is out of range: QIL bit widths must be from "
            f"{ops.MIN_BITS} to {ops.MAX_BITS} (2-bit weights are ternary; above 8 "
            "bits there is no integer kernel to export to). Keep such a layer in "
            "float with layer_bits={'name': None} instead (the integer export then "
            "needs export_tflite(..., calibrate_float=True) to give it 8-bit ranges)."
        )
    return int(bits)


class IntervalConstraint(keras.constraints.Constraint):
    """Projection of ``d`` after each optimizer step: ``d ≥ ε``.

    A weight interval's width is also reflected at ``|c|/16`` in the forward pass
    (``ops.effective_weight_interval``), where its straight-through slope stays bounded.

    ``c`` is not projected: the forward pass reflects the lower threshold at zero
    (``ops.effective_interval``: ``c' - d' = |c - d'|``), so zero maps to zero whatever ``c``
    is and ``c`` never loses its gradient. A projection ``c ≥ d`` was tried during development
    and dropped: on the MNIST CNN of ``tests/training/test_learning.py`` at 2/2 the pruning
    threshold ran away (almost every weight pruned) and accuracy ended far below frozen
    intervals (a development run, not kept as a benchmark). ``bench/intervals.py`` compares learned, frozen and clip-only intervals: after 4
    epochs with Adam, learned intervals are not ahead of the other two (five seeds, MNIST digits
    and a CIFAR-10 subset; ``bench/results/intervals.md``).
    """

    def __call__(self, value):
        return tf.maximum(value, tf.constant(ops.EPSILON, value.dtype))


_width_changes = 0


def width_changes():
    """How many times ``set_bits`` has changed a quantizer's bit width variable (any model): a
    QIL model traces its steps again when this has moved (``training.model.DeployableFit``)."""
    return _width_changes


class _QILQuantizer(tfmot.quantization.keras.quantizers.Quantizer):
    """Shared parts: bit width bookkeeping and the interval variables."""

    def __init__(self, bits):
        self.bits = check_bits(bits)

    def _add_interval(self, layer, name, shape, weights):
        for key, constraint in (("c", None), ("d", IntervalConstraint())):
            weights[key] = layer.add_weight(
                name=f"{name}_{key}" if name else key,
                shape=shape,
                initializer=keras.initializers.Constant(0.5),
                constraint=constraint,
                trainable=True,
            )
        weights["bits"] = layer.add_weight(
            name=f"{name}_bits" if name else "bits",
            shape=(),
            dtype=tf.int32,
            initializer=keras.initializers.Constant(self.bits),
            trainable=False,
        )
        return weights

    def set_bits(self, weights, bits):
        """Change the bit width (``weights=None`` before build); intervals are kept."""
        global _width_changes
        self.bits = check_bits(bits)
        if weights is not None and int(weights["bits"].numpy()) != self.bits:
            weights["bits"].assign(self.bits)
            _width_changes += 1

    @staticmethod
    def current_bits(weights):
        return int(weights["bits"].numpy())

    # (c, d) -> (c', d') as the forward pass uses them
    effective_interval = staticmethod(ops.effective_interval)

    def step(self, weights):
        """Quantization step ``s = 2d' / q`` (numpy): values are ``k · s``."""
        _, d = self.effective_interval(weights["c"], weights["d"])
        return (2.0 * d / self.levels(weights["bits"])).numpy()

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@keras.utils.register_keras_serializable(package="qil_keras")
class QILWeightQuantizer(_QILQuantizer):
    """QIL weight quantizer ``Q_W(w) = k · 2d/q_W``, ``k = round(q_W · T_W(w))``.

    Args:
      bits: 2 to 8. ``q_W = 2^(bits-1) - 1`` levels each side of zero.
      per_channel: one ``(c, d, γ)`` per output channel instead of per tensor.
      train_gamma: whether the transformer exponent ``γ`` (init 1) trains.
      channel_axes: kernel axes that index output channels (``(-1,)`` for
        Conv2D/Dense, ``(-2, -1)`` for DepthwiseConv2D).
    """

    levels = staticmethod(ops.weight_levels)
    effective_interval = staticmethod(ops.effective_weight_interval)

    def __init__(self, bits=4, per_channel=False, train_gamma=True, channel_axes=(-1,)):
        super().__init__(bits)
        self.per_channel = bool(per_channel)
        self.train_gamma = bool(train_gamma)
        self.channel_axes = tuple(int(a) for a in channel_axes)

    def param_shape(self, tensor_shape):
        if not self.per_channel:
            return ()
        dims = list(tensor_shape)
        return tuple(int(dims[a]) for a in self.channel_axes)

    def build(self, tensor_shape, name, layer):
        shape = self.param_shape(tensor_shape)
        weights = self._add_interval(layer, name, shape, {})
        weights["gamma"] = layer.add_weight(
            name=f"{name}_gamma",
            shape=shape,
            initializer=keras.initializers.Constant(1.0),
            trainable=self.train_gamma,
        )
        return weights

    def __call__(self, inputs, training, weights, **kwargs):
        return ops.quantize_weight(
            inputs, weights["c"], weights["d"], weights["gamma"], weights["bits"]
        )

    def integer_levels(self, inputs, weights):
        """The integer levels ``k`` of ``inputs`` (numpy int32)."""
        k = ops.quantize_weight_levels(
            inputs, weights["c"], weights["d"], weights["gamma"], weights["bits"]
        )
        return k.numpy().astype(np.int32)

    def initialize(self, weights, tensor):
        """Set ``c = d`` to the MSE-optimal range of ``tensor`` and ``γ = 1``."""
        q = float(self.levels(weights["bits"]).numpy())
        axes = self.channel_axes if self.per_channel else None
        c, d = interval_from_values(np.asarray(tensor), q, axes)
        weights["c"].assign(np.broadcast_to(c, weights["c"].shape))
        weights["d"].assign(np.broadcast_to(d, weights["d"].shape))
        weights["gamma"].assign(np.ones(weights["gamma"].shape, np.float32))

    def get_config(self):
        return {
            "bits": self.bits,
            "per_channel": self.per_channel,
            "train_gamma": self.train_gamma,
            "channel_axes": list(self.channel_axes),
        }


@keras.utils.register_keras_serializable(package="qil_keras")
class QILActivationQuantizer(_QILQuantizer):
    """QIL activation quantizer ``Q_X(x) = k · 2d/q_X``, ``k = round(q_X · T_X(x))``.

    For non-negative inputs (after ReLU): values below ``c - d`` become 0,
    values above ``c + d`` the top level ``q_X = 2^bits - 1``.
    """

    levels = staticmethod(ops.activation_levels)

    def build(self, tensor_shape, name, layer):
        return self._add_interval(layer, name, (), {})

    def __call__(self, inputs, training, weights, **kwargs):
        return ops.quantize_activation(inputs, weights["c"], weights["d"], weights["bits"])

    def initialize(self, weights, values):
        """Set ``c = d`` to the MSE-optimal range ``[0, h]`` of ``values``."""
        q = float(self.levels(weights["bits"]).numpy())
        values = np.maximum(np.asarray(values, np.float32), 0.0)
        c, d = interval_from_values(values, q)
        weights["c"].assign(c)
        weights["d"].assign(d)

    def get_config(self):
        return {"bits": self.bits}
