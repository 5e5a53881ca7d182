"""Read the integer grids a QIL model computes with, without private attributes."""

import dataclasses

import numpy as np

from .layers import QILConv2D, QILDense, QILDepthwiseConv2D

__all__ = ["QuantizedWeights", "quantized_weights"]

_WEIGHT_LAYERS = (QILConv2D, QILDense, QILDepthwiseConv2D)


@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
    """A layer's quantized kernel as ``levels * scale`` (exactly what ``call`` uses).

    ``levels``: int32 array of the kernel's shape, ``|k| ≤ 2^(bits-1) - 1``.
    ``scale``: float32 scalar (per tensor) or array broadcasting against
    ``levels`` over the channel axes (per channel).
    """

    layer: str
    bits: int
    levels: np.ndarray
    scale: np.ndarray

    @property
    def values(self):
        """The quantized kernel ``levels * scale`` (float32)."""
        return (self.levels * self.scale).astype(np.float32)

    @property
    def zero_fraction(self):
        """Fraction of weights pruned to exactly zero."""
        return float(np.mean(self.levels == 0))

    @property
    def distinct_levels(self):
        return int(np.unique(self.levels).size)


def quantized_weights(model):
    """``{layer name: QuantizedWeights}`` for every QIL weight layer of ``model``.

    The integers and scales are the ones the forward pass multiplies, so
    ``levels * scale`` equals the layer's quantized kernel; the integer
    export writes the same integers.
    """
    result = {}
    for layer in model.submodules if hasattr(model, "submodules") else model.layers:
        if isinstance(layer, _WEIGHT_LAYERS):
            result[layer.name] = QuantizedWeights(
                layer=layer.name,
                bits=layer.w_bits,
                levels=layer.integer_levels(),
                scale=np.asarray(layer.weight_scale(), np.float32),
            )
    return result
