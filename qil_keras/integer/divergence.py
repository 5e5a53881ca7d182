"""``qil_keras.first_divergence``: where an integer file and its Keras model part.

The Keras model computes in float32 and the file in integers; where they disagree, the
question is which tensor differs first and by how much. Each quantizer of the Keras model
(``QILActivation``, ``FakeQuant8``, ``AveragePooling2DInt8``) outputs ``k · s`` on an int8
grid that the file holds as a tensor with the same scale ``s`` and shape: the file's tensor
is found by that grid, its values come from ``qil_keras.IntegerReference`` (the arithmetic
of the kernels that run the file, checked against them by the export), and the two are
compared in levels ``round((file - keras) / s)``, in the file's op order.
"""

import dataclasses

import numpy as np

from .._keras import keras
from ..quantization.layers import AveragePooling2DInt8, FakeQuant8, LeakyReLUInt8, QILActivation
from .integer_reference import IntegerReference

__all__ = ["first_divergence", "Divergence", "divergence_profile", "TensorDivergence"]


def _grid_scale(layer):
    if isinstance(layer, QILActivation):
        return float(np.asarray(layer.step()))
    return float(layer.quantization_params()[0])


@dataclasses.dataclass
class TensorDivergence:
    """One quantized tensor of the file against its Keras quantizer's output (in levels)."""

    layer: str            # the Keras quantizer layer
    op_index: int
    op: str               # the file op that writes the tensor
    values: int           # values that differ
    total: int
    max_levels: float     # largest difference in levels of the tensor's grid
    # FakeQuant8 tensors with differing values, when asked for: the median and largest
    # distance, in steps, of the Keras quantizer's input from the nearest rounding boundary at
    # those values (~1e-5 or less: float32 rounding at a boundary; ~0.25: the difference came
    # in with the op's inputs)
    boundary_distance_median: float | None = None
    boundary_distance_max: float | None = None
    # of those, how many lay within NEAR_BOUNDARY steps of one: differences that start at
    # this op rather than arrive with its inputs
    near_boundary: int | None = None


# Steps from a rounding boundary within which a differing Keras value counts as rounded apart
# at its own op: above float32 rounding (measured 1e-6 to 1e-5 at the first differing tensor of
# bench/divergence_depth.py's files), far below a difference carried in from an input (a
# quarter step typically).
NEAR_BOUNDARY = 1e-4


@dataclasses.dataclass
class Divergence(TensorDivergence):
    """The first file tensor (in op order) whose values differ from its Keras layer's."""

    examples: int = 0           # examples compared
    compared: int = 0           # tensors compared
    kernels: str = "xnnpack"    # whose arithmetic gave the file's values

    def message(self):
        return (f"the first tensor where the file and the Keras model differ is the output of "
                f"{self.layer!r} (op {self.op_index}, {self.op}): {self.values} of {self.total} "
                f"values on {self.examples} example(s), by up to {self.max_levels:g} level(s)"
                + (f", {self.near_boundary} of them within {NEAR_BOUNDARY:g} steps of a "
                   "rounding boundary in Keras" if self.near_boundary is not None else "")
                + f" ({self.compared} quantized tensors compared)")


def _inbound(layer):
    """The layers whose outputs ``layer`` takes (its first call), or ``[]`` for an input."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    if not nodes:
        return []
    inbound = nodes[0].inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def divergence_profile(model, model_bytes, x, *, kernels="xnnpack", boundary_distances=False):
    """Every quantized tensor that ``model_bytes`` and ``model`` share, compared on ``x``, in
    the file's op order: a list of ``TensorDivergence``.

    The file's values come from ``qil_keras.IntegerReference`` with the arithmetic of
    ``kernels`` (``"xnnpack"``, the default delegate, or ``"builtin"``). The first tensor with
    differing values is where the two part (``first_divergence``); the ones after it show how
    a difference spreads with depth. ``boundary_distances=True`` also fetches each
    ``FakeQuant8``'s input (one more set of activations in memory) to say how close to a
    rounding boundary the Keras values that differ were.
    """
    reference = IntegerReference(model_bytes, kernels=kernels)
    tensors = reference.run(x, all_tensors=True)
    quantizers = [layer for layer in model.layers
                  if isinstance(layer, (QILActivation, FakeQuant8, AveragePooling2DInt8))]
    # Layers that move their input onto their own grid first: the file holds that grid twice
    # (the moved input, the op's output); match the op itself.
    own_op = {LeakyReLUInt8: "LEAKY_RELU", AveragePooling2DInt8: "AVERAGE_POOL_2D"}
    if not quantizers:
        return []
    fetched = [layer.output for layer in quantizers]
    with_input = [boundary_distances and type(layer) is FakeQuant8 for layer in quantizers]
    fetched += [layer.input for layer, wanted in zip(quantizers, with_input) if wanted]
    outputs = keras.Model(model.inputs, fetched).predict(x, verbose=0, batch_size=256)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    inputs = iter(outputs[len(quantizers):])
    # Pairing. A candidate is an int8 tensor on the quantizer's grid with its shape; several can
    # qualify (every sigmoid output has the fixed grid 1/256; the squeeze-excite gates of one
    # width have one shape), so a candidate must also be computed from the file tensors of the
    # quantizer's own upstream quantizers (the nearest ones, through ops and layers that hold
    # no grid of their own): quantizers are paired in Keras' order, which is topological, so
    # those are paired already. Among candidates that pass (parallel branches from one input
    # look alike), the one whose values agree best, the earliest op on a tie.
    producer = {int(op.outputs[0]): (op_index, op) for op_index, _, op in reference.ops}
    graph_inputs = {int(i) for i in reference.graph.inputs}
    paired = {}              # file tensor index -> the Keras quantizer's name
    paired_layers = set()    # id() of the Keras quantizers paired so far

    def keras_upstream(layer):
        found, stack, seen = set(), _inbound(layer), set()
        while stack:
            item = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if id(item) in paired_layers:
                found.add(item.name)
            elif not _inbound(item):
                found.add("<input>")
            else:
                stack.extend(_inbound(item))
        return found

    def file_upstream(op):
        found, stack, seen = set(), [int(i) for i in op.inputs if i >= 0], set()
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            if index in paired:
                found.add(paired[index])
            elif index in graph_inputs:
                found.add("<input>")
            elif index in producer:
                stack.extend(int(i) for i in producer[index][1].inputs if i >= 0)
        return found

    matched = []
    for layer, keras_out, wanted in zip(quantizers, outputs, with_input):
        keras_in = next(inputs) if wanted else None
        scale = _grid_scale(layer)
        upstream = keras_upstream(layer)
        best = None
        for op_index, name, op in reference.ops:
            index = int(op.outputs[0])
            tensor = reference.tensors[index]
            if (index in paired or tensor.dtype is not np.int8 or tensor.scale.size != 1
                    or own_op.get(type(layer), name) != name
                    or tensors[index].shape[1:] != keras_out.shape[1:]
                    or abs(float(tensor.scale[0]) - scale) > 1e-5 * scale
                    or file_upstream(op) != upstream):
                continue
            tensor_scale, zero = float(tensor.scale[0]), int(tensor.zero_point[0])
            file_values = (tensors[index].astype(np.float64) - zero) * tensor_scale
            levels = np.abs(np.rint((file_values - keras_out) / tensor_scale)).astype(np.int16)
            differing = int(np.count_nonzero(levels))
            if best is None or differing < best[0]:
                best = (differing, op_index, name, index, levels, tensor_scale)
            if differing == 0:
                break
        if best is None:
            continue
        differing, op_index, name, index, levels, tensor_scale = best
        paired[index] = layer.name
        paired_layers.add(id(layer))
        matched.append((op_index, name, layer.name, levels, keras_in, tensor_scale))
    profile = []
    for op_index, name, layer, levels, keras_in, scale in sorted(matched, key=lambda m: m[0]):
        record = TensorDivergence(layer, op_index, name, int(np.count_nonzero(levels)),
                                  int(levels.size), float(levels.max()))
        if keras_in is not None and record.values:
            # FakeQuant8's grid is (k - zero_point) · s with an integer zero point: its rounding
            # boundaries lie at half-integers of input / s
            steps = keras_in.astype(np.float64)[levels != 0] / scale
            distance = np.abs(steps - np.floor(steps) - 0.5)
            record.boundary_distance_median = float(np.median(distance))
            record.boundary_distance_max = float(distance.max())
            record.near_boundary = int(np.count_nonzero(distance < NEAR_BOUNDARY))
        profile.append(record)
    return profile


def first_divergence(model, model_bytes, x, *, kernels="xnnpack", boundary_distances=False):
    """Compare every quantized tensor of ``model_bytes`` with ``model`` on ``x``.

    ``kernels``: the arithmetic of the file's run, ``"xnnpack"`` (the default delegate) or
    ``"builtin"``; ``boundary_distances``: as in ``divergence_profile``. Returns a
    ``Divergence``, or ``None`` when every matched tensor is equal (``divergence_profile``
    gives every tensor).
    """
    profile = divergence_profile(model, model_bytes, x, kernels=kernels,
                                 boundary_distances=boundary_distances)
    for record in profile:
        if record.values:
            return Divergence(**dataclasses.asdict(record), examples=len(x),
                              compared=len(profile), kernels=kernels)
    return None
