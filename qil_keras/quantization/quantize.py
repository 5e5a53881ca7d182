"""``qil_keras.quantize``: rewrite a float tf-keras model into a QIL model.

The pipeline, driven by the table ``LAYER_ROLES``:

1. check the model (tf-keras, Sequential or Functional, built; not already
   quantized with other bits);
2. choose bits per weight layer (``w_bits``/``a_bits``, the first and last
   weight layers at ``first_last_bits``, ``layer_bits`` overrides);
3. plan, for every tensor, whether a quantizer follows it: a
   ``qil_keras.layers.QILActivation`` after each ReLU whose output
   reaches quantized compute, a ``qil_keras.layers.FakeQuant8`` after
   every other tensor that the integer file stores as int8 (model input,
   inputs of residual adds, signed inputs of quantized layers, the logits
   that the last weight layer hands to the output);
4. rebuild the graph with new layers (QIL subclasses for weight layers,
   copies for everything else), copying the float weights, so the original
   model is untouched;
5. initialize intervals: weights by MSE-optimal range, activations from a
   calibration batch (or from the preceding BatchNorm's statistics, or the
   default ``[0, 6]``);
6. attach a ``qil_keras.report.QuantizationReport`` as ``model.qil_report``.
"""

import collections
import dataclasses
import math

import numpy as np

from .._keras import check_model, keras, tf
from ..data.checks import require_finite
from ..training.batchnorm import (QILBatchNormalization, _input_batches, batch_statistics_pass,
                                  called_in_inference_mode, check_freeze_after,
                                  restart_batchnorm_statistics)
from ..training.model import QILModel, QILSequential, drop_traced_steps
from .flatten import clone_layer, flatten_nested, nested_models
from .init import interval_from_values
from .layers import (SIGMOID_RANGE, TANH_RANGE, AveragePooling2DInt8, FakeQuant8, LeakyReLUInt8,
                     QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D, QILReLU, SwishInt8)
from .quantizers import check_bits
from .report import QuantizationReport, ReportRow

__all__ = ["quantize", "set_bits", "untie_inputs", "LAYER_ROLES", "DEFAULT_ACTIVATION_RANGE"]

L = keras.layers

# Role of each known layer class (exact class match; subclasses are unknown):
#   "weights": quantized with QIL (the value is the QIL class);
#   "pass":    output stays on its input's grid (max, reshape, dropout, padding);
#   "average": int8 op whose output leaves the grid (needs an 8-bit quantizer);
#   "merge":   int8 op with several inputs, each must be on a grid;
#   "folded":  BatchNormalization, folded into the preceding conv/dense at export; replaced by
#              kept (batch statistics in training, re-estimated after fit), or a
#              QILBatchNormalization with bn_freeze_after (statistics frozen after it);
#   "relu":    ReLU-family activation, followed by a QIL activation quantizer;
#   "output":  kept as is at the end of the network (softmax);
#   "int8":    int8 op with its own output range: its inputs and its output get 8-bit
#              quantizers (LeakyReLU, sigmoid, tanh, swish, Multiply, a TFOpLambda adding or
#              multiplying a constant, as in MobileNetV3's hard-swish);
#   "preprocess": Rescaling/Normalization at the model input: computed in float, before the
#              quantizer of the model input (the file's QUANTIZE op).
LAYER_ROLES = {
    L.Conv2D: ("weights", QILConv2D),
    L.DepthwiseConv2D: ("weights", QILDepthwiseConv2D),
    L.Dense: ("weights", QILDense),
    L.SeparableConv2D: ("weights", None),  # split into QILDepthwiseConv2D + 1x1 QILConv2D
    L.ReLU: ("relu", None),
    QILReLU: ("relu", None),
    L.Activation: ("activation", None),  # resolved per instance below
    L.BatchNormalization: ("folded", QILBatchNormalization),
    QILBatchNormalization: ("folded", QILBatchNormalization),
    L.MaxPooling2D: ("pass", None),
    L.GlobalMaxPooling2D: ("pass", None),
    L.Flatten: ("pass", None),
    L.Reshape: ("pass", None),
    L.Dropout: ("pass", None),
    L.SpatialDropout2D: ("pass", None),
    L.ZeroPadding2D: ("pass", None),
    L.Cropping2D: ("pass", None),
    L.AveragePooling2D: ("average", None),
    L.GlobalAveragePooling2D: ("average", None),
    L.Add: ("merge", None),
    L.Concatenate: ("merge", None),
    L.Softmax: ("output", None),
    L.LeakyReLU: ("int8", None),
    L.Multiply: ("int8", None),
    SwishInt8: ("int8", None),
    L.Rescaling: ("preprocess", None),
    L.Normalization: ("preprocess", None),
}
# Activations that run as int8 ops (the FakeQuant8 after sigmoid/tanh has the kernel's fixed
# output range); swish runs as LOGISTIC then MUL (SwishInt8).
_INT8_ACTIVATIONS = {"sigmoid": SIGMOID_RANGE, "tanh": TANH_RANGE, "swish": None, "silu": None}
# TFOpLambda functions that run as an int8 ADD/SUB/MUL with a scalar constant.
_TFOP_CONSTANT_OPS = {"__operators__.add": "add", "math.add": "add", "__operators__.sub": "sub",
                      "math.subtract": "sub", "math.multiply": "mul"}
_QIL_CLASSES = (QILConv2D, QILDense, QILDepthwiseConv2D, QILActivation, FakeQuant8)
_RELU_NAMES = ("relu", "relu6")
# Fused activations split off a quantized weight layer (its logits get an int8 range).
_SPLIT_ACTIVATIONS = ("softmax", "sigmoid", "tanh", "swish", "silu")
DEFAULT_ACTIVATION_RANGE = 6.0  # [0, 6], the ReLU6 range, when nothing better is known


def _activation_name(fn):
    return getattr(fn, "__name__", str(fn))


def _role(layer):
    """Role of ``layer`` (see LAYER_ROLES), resolving Activation and ReLU options."""
    if isinstance(layer, L.InputLayer):
        return "input"
    if isinstance(layer, _QIL_CLASSES):
        return "qil"
    if type(layer).__name__ == "TFOpLambda":
        return "int8" if tfop_constant(layer) is not None else "unknown"
    role, _ = LAYER_ROLES.get(type(layer), ("unknown", None))
    if role == "activation":
        name = _activation_name(layer.activation)
        role = {"relu": "relu", "relu6": "relu", "linear": "pass", "softmax": "output"}.get(
            name, "int8" if name in _INT8_ACTIVATIONS else "unknown")
    if role == "relu" and isinstance(layer, L.ReLU):
        if float(layer.threshold) != 0.0:
            return "unknown"
        if float(layer.negative_slope) != 0.0:  # a leaky ReLU: LEAKY_RELU
            return "int8" if layer.max_value is None else "unknown"
    return role


def whole_windows(layer):
    """Whether every pooling window of an AveragePooling2D lies inside its input."""
    if layer.padding == "valid":
        return True
    (ph, pw), (sh, sw) = layer.pool_size, layer.strides
    h, w = layer.input_shape[1:3]
    if h is None or w is None:
        return False
    # 'same' pads (out-1)*stride + pool - size in total; no padding means no partial window.
    return all(max((-(-n // s) - 1) * s + p - n, 0) == 0 for n, s, p in ((h, sh, ph), (w, sw, pw)))


def tfop_constant(layer):
    """``(op, constant, tensor_first)`` of a TFOpLambda adding, subtracting or multiplying one
    tensor and a Python scalar (MobileNetV3's ``x + 3``, ``x * (1/6)``), else None."""
    op = _TFOP_CONSTANT_OPS.get(layer.get_config().get("function"))
    nodes = getattr(layer, "_inbound_nodes", [])
    if op is None or not nodes:
        return None
    found = set()
    for node in nodes:  # a copied model calls the layer again, with the same arguments
        kwargs = dict(node.call_kwargs)
        kwargs.pop("name", None)
        args = list(node.call_args)  # op(x, y), y (or x) possibly by keyword after a copy
        if "x" in kwargs:
            args.insert(0, kwargs.pop("x"))
        if "y" in kwargs:
            args.append(kwargs.pop("y"))
        if kwargs or len(args) != 2:
            return None
        scalar = [isinstance(a, (int, float)) and not isinstance(a, bool) for a in args]
        if scalar.count(True) != 1:
            return None
        found.add((op, float(args[scalar.index(True)]), scalar[1]))
    return found.pop() if len(found) == 1 else None


def fixed_output_range(layer):
    """The fixed int8 output range of a sigmoid/tanh (applied by ``layer`` or split off it)."""
    name = _activation_name(getattr(layer, "activation", None))
    return _INT8_ACTIVATIONS.get(name) if name in ("sigmoid", "tanh") else None


def unsupported(layer):
    """Why ``layer`` (role ``"unknown"``) is not quantized: the op, with its options."""
    name = type(layer).__name__
    if name == "TFOpLambda":
        return (f"TFOpLambda({layer.get_config().get('function')!r}) has no int8 lowering in "
                "qil_keras (only adding, subtracting or multiplying a scalar constant runs in "
                "int8); replace it with a Keras layer")
    if isinstance(layer, L.Activation):
        name = f"Activation({_activation_name(layer.activation)!r})"
    elif isinstance(layer, L.ReLU):
        name = (f"ReLU(negative_slope={float(layer.negative_slope):g}, "
                f"threshold={float(layer.threshold):g})")
    return f"{name} has no int8 lowering in qil_keras (see qil_keras.LAYER_ROLES)"


def _fused_relu(layer):
    return _activation_name(getattr(layer, "activation", None)) in _RELU_NAMES


def _relu_cap(layer):
    """Upper bound of a ReLU-family output (6 for relu6), or None."""
    if isinstance(layer, L.ReLU) and layer.max_value is not None:
        return float(layer.max_value)
    if _activation_name(getattr(layer, "activation", None)) == "relu6":
        return 6.0
    return None


class _Graph:
    """Nodes of a built Sequential/Functional model in topological order."""

    def __init__(self, model):
        self.model = model
        self.nodes = []
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if not isinstance(node.layer, L.InputLayer):
                    self.nodes.append(node)
        self.consumers = {}
        self.producer = {}
        for node in self.nodes:
            for tensor in node.keras_inputs:
                self.consumers.setdefault(id(tensor), []).append(node)
            for tensor in tf.nest.flatten(node.outputs):
                self.producer[id(tensor)] = node
        self.output_ids = {id(t) for t in model.outputs}
        # how many times the model calls each layer (by id): a shared layer has several nodes
        self.calls = collections.Counter(id(node.layer) for node in self.nodes)

    def weight_layers(self):
        seen, ordered = set(), []
        for node in self.nodes:
            if _role(node.layer) == "weights" or isinstance(
                    node.layer, (QILConv2D, QILDense, QILDepthwiseConv2D)):
                if id(node.layer) not in seen:
                    seen.add(id(node.layer))
                    ordered.append(node.layer)
        return ordered

    def edge_weight_layers(self):
        """Names of the first and last weight layers: those fed by a model input, and
        those whose output reaches a model output, through non-weight layers only."""
        layers = self.weight_layers()
        if not layers:
            return set()
        first = {lyr.name for t in self.model.inputs
                 for lyr in self.reachable_weight_layers(id(t), through=("pass", "average",
                                                                         "folded", "relu",
                                                                         "preprocess"))}
        last, stack, seen = set(), [id(t) for t in self.model.outputs], set()
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.layer in layers:
                last.add(node.layer.name)
            elif _role(node.layer) in ("pass", "average", "folded", "relu", "output", "qil"):
                stack.extend(id(t) for t in node.keras_inputs)
        return (first or {layers[0].name}) | (last or {layers[-1].name})

    def _downstream(self, tensor_id, follow):
        """Consumer nodes of a tensor, continuing past those where ``follow(node)``."""
        stack, seen = [tensor_id], set()
        while stack:
            for node in self.consumers.get(stack.pop(), []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                yield node
                if follow(node):
                    stack.extend(id(t) for t in tf.nest.flatten(node.outputs))

    def reachable_weight_layers(self, tensor_id, through=("pass", "average")):
        """Weight layers fed by the tensor through roles in ``through``."""
        def is_weight(layer):
            return _role(layer) == "weights" or isinstance(
                layer, (QILConv2D, QILDense, QILDepthwiseConv2D))

        def follow(node):
            return not is_weight(node.layer) and (
                _role(node.layer) in through or isinstance(node.layer, (QILActivation, FakeQuant8)))

        return [node.layer for node in self._downstream(tensor_id, follow) if is_weight(node.layer)]

    def reaches_output(self, tensor_id):
        """Whether the tensor is a model output, or becomes one through "pass"/"output" layers."""
        if tensor_id in self.output_ids:
            return True
        return any(id(t) in self.output_ids
                   for node in self._downstream(
                       tensor_id, lambda node: _role(node.layer) in ("pass", "output"))
                   if _role(node.layer) in ("pass", "output")
                   for t in tf.nest.flatten(node.outputs))

    def feeds_integer_compute(self, tensor_id, quantized):
        """Whether a consumer (through "pass" layers) is quantized or an int8 op."""
        return any(self._needs_int8_input(node, quantized)
                   for node in self._downstream(tensor_id, lambda node: _role(node.layer) == "pass"))

    def _needs_int8_input(self, node, quantized):
        role = _role(node.layer)
        if role == "weights":
            return node.layer.name in quantized
        if role == "folded":  # a BatchNormalization that cannot fold runs as an int8 affine op
            return not self.folds(node)
        return role in ("average", "merge", "int8")

    def at_input(self, node):
        """Whether a node reads only model inputs, directly or through "preprocess" layers."""
        for tensor in node.keras_inputs:
            producer = self.producer.get(id(tensor))
            if producer is not None and not (_role(producer.layer) == "preprocess"
                                             and self.at_input(producer)):
                return False
        return True

    def only_int8_consumers(self, tensor_id):
        """Whether every consumer (through "pass" layers) is an "int8" op (no weight layer)."""
        nodes = [node for node in self._downstream(tensor_id, lambda n: _role(n.layer) == "pass")
                 if _role(node.layer) != "pass"]
        return bool(nodes) and all(_role(node.layer) == "int8" for node in nodes)

    def relu_output(self, tensor_id, plan):
        """Whether a tensor is a ReLU's output (a ReLU layer, or a quantized weight layer with a
        fused relu/relu6)."""
        node = self.producer.get(tensor_id)
        if node is None:
            return False
        role = _role(node.layer)
        return role == "relu" or (role == "weights" and node.layer.name in plan
                                  and _fused_relu(node.layer))

    def shared_concat(self, node, plan):
        """Whether a Concatenate takes one QIL activation quantizer after it, shared by its
        inputs, instead of one per input: every input is a ReLU output (same cap) read by
        nothing else, as Inception's branches. ReLU then quantizer is elementwise, so this is
        one interval for all branches; the int8 CONCATENATION then needs no requantization of
        its inputs (each producer writes the shared grid), as post-training int8 does."""
        if not isinstance(node.layer, L.Concatenate) or len(node.keras_inputs) < 2:
            return False
        output = id(tf.nest.flatten(node.outputs)[0])
        if not self.feeds_integer_compute(output, plan) or self.only_int8_consumers(output):
            return False  # no QIL quantizer would follow the Concatenate
        caps = set()
        for tensor in node.keras_inputs:
            tid = id(tensor)
            if not self.relu_output(tid, plan) or tid in self.output_ids \
                    or len(self.consumers.get(tid, [])) != 1:
                return False
            caps.add(_relu_cap(self.producer[tid].layer))
        return len(caps) == 1

    def feeds_shared_concat(self, tensor_id, plan):
        """Whether the tensor's one consumer is a Concatenate with a shared quantizer."""
        consumers = self.consumers.get(tensor_id, [])
        return len(consumers) == 1 and self.shared_concat(consumers[0], plan)

    def writes_concat_grid(self, tensor_id, plan):
        """Whether a tensor is the linear output of a quantized conv/dense (or of the BatchNorm
        folded into one) read only by a Concatenate whose output gets an 8-bit quantizer
        (DenseNet's new features): the conv then writes that quantizer's grid itself, as
        post-training int8 gives the CONCATENATION's inputs its output's scale, and the input
        needs no quantizer (and the file no requantizing op) of its own."""
        node = self.producer.get(tensor_id)
        consumers = self.consumers.get(tensor_id, [])
        if node is None or tensor_id in self.output_ids or len(consumers) != 1 \
                or not isinstance(consumers[0].layer, L.Concatenate):
            return False
        if _role(node.layer) == "folded":
            if not self.folds(node):
                return False
            node = self.producer[id(node.keras_inputs[0])]
        layer = node.layer
        if not (_role(layer) == "weights" and layer.name in plan
                and _activation_name(layer.activation) == "linear"):
            return False
        output = id(tf.nest.flatten(consumers[0].outputs)[0])
        return self.feeds_integer_compute(output, plan) or self.reaches_output(output)

    def folds(self, node):
        """Whether a BatchNormalization node folds into the conv/dense that produces its input
        (directly, linear, and read by nothing else)."""
        tensor = node.keras_inputs[0]
        producer = self.producer.get(id(tensor))
        if producer is None:
            return False
        layer = producer.layer
        is_weight = _role(layer) == "weights" or isinstance(
            layer, (QILConv2D, QILDense, QILDepthwiseConv2D))
        return (is_weight and _activation_name(getattr(layer, "activation", None)) == "linear"
                and len(self.consumers.get(id(tensor), [])) == 1
                and id(tensor) not in self.output_ids)


def _normalize_bits(value, where):
    """``int``, ``(w, a)`` or ``None`` -> ``(w_bits, a_bits)`` or ``None``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{where}: expected an int, a (w_bits, a_bits) pair or None, "
                             f"got {value!r}")
        return (check_bits(value[0], f"{where} w_bits"), check_bits(value[1], f"{where} a_bits"))
    bits = check_bits(value, where)
    return (bits, bits)


def _bit_plan(graph, w_bits, a_bits, first_last_bits, layer_bits):
    """``{layer name: (w_bits, a_bits)}``; absent names stay float."""
    weight_layers = graph.weight_layers()
    plan, names = {}, [layer.name for layer in weight_layers]
    if isinstance(layer_bits, dict):
        unknown = sorted(set(layer_bits) - set(names))
        if unknown:
            raise ValueError(
                f"layer_bits names layers that are not quantizable weight layers of this "
                f"model: {unknown}. Quantizable layers: {names}.")
    edge = graph.edge_weight_layers() if first_last_bits is not None else set()
    for layer in weight_layers:
        bits = (w_bits, a_bits)
        if layer.name in edge:
            bits = (first_last_bits, first_last_bits)
        if callable(layer_bits):
            override = layer_bits(layer)
            if override is not ...:
                bits = _normalize_bits(override, f"layer_bits({layer.name!r})")
        elif isinstance(layer_bits, dict) and layer.name in layer_bits:
            bits = _normalize_bits(layer_bits[layer.name], f"layer_bits[{layer.name!r}]")
        if bits is not None:
            plan[layer.name] = bits
    return plan


def _check_calibration(model, data):
    """First batch of ``data`` as a list of arrays matching ``model.inputs``."""
    if isinstance(data, tf.data.Dataset):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(next(iter(data)))
    arrays = data if isinstance(data, (list, tuple)) else [data]
    if len(arrays) != len(model.inputs):
        raise ValueError(f"calibration_data has {len(arrays)} inputs but the model has "
                         f"{len(model.inputs)}; pass one array per model input (the inputs only: "
                         "x, not (x, y)).")
    out = []
    for array, spec in zip(arrays, model.inputs):
        array = np.asarray(array)
        expected = tuple(spec.shape)
        if not np.issubdtype(array.dtype, np.number):
            raise TypeError(f"calibration_data must be numeric images/features, got dtype "
                            f"{array.dtype}.")
        if array.ndim != len(expected) or any(
                e is not None and e != a for e, a in zip(expected[1:], array.shape[1:])):
            raise ValueError(
                f"calibration_data has shape {array.shape} but the model input "
                f"{spec.name!r} expects {expected} (batch first). Pass a batch of the "
                "same preprocessed inputs the model is trained on.")
        if array.shape[0] == 0:
            raise ValueError("calibration_data is empty; pass at least one example.")
        out.append(require_finite(array.astype(np.float32), "calibration_data"))
    return out


def _interval_from_batchnorm(bn, q, cap):
    """MSE-optimal ``(c, d)`` for ReLU(BN output) assuming N(β, γ²) per channel."""
    gamma = np.abs(bn.gamma.numpy()) if bn.scale else np.float32(1.0)
    beta = bn.beta.numpy() if bn.center else np.float32(0.0)
    shape = np.broadcast_shapes(np.shape(gamma), np.shape(beta)) or (1,)
    gamma, beta = np.broadcast_to(gamma, shape).ravel(), np.broadcast_to(beta, shape).ravel()
    samples = np.random.default_rng(0).standard_normal((4096, gamma.size)) * gamma + beta
    samples = np.maximum(samples, 0.0)
    if cap is not None:
        samples = np.minimum(samples, cap)
    return interval_from_values(samples, q)


def quantize(model, w_bits=4, a_bits=4, *, first_last_bits=8, layer_bits=None,
             per_channel=False, train_gamma=True, calibration_data=None,
             bn_freeze_after=None, concat_intervals="shared"):
    """Return a QIL-quantized copy of a float tf-keras model.

    Args:
      model: built tf-keras Sequential or Functional model (left untouched). A nested
        Functional or Sequential model in it (a transfer-learning base model) is inlined
        (``qil_keras.quantization.flatten``); its BatchNorms called with ``training=False``
        keep normalizing with their moving statistics and are not re-estimated.
      w_bits, a_bits: weight and activation bits (2 to 8) for every weight
        layer (Conv2D, DepthwiseConv2D, Dense) and the activations feeding it.
      first_last_bits: bits for the first and last weight layers and their
        input activations (default 8, so the whole model runs as integers);
        ``None`` quantizes them like the rest.
      layer_bits: per-layer overrides: ``{layer_name: bits | (w, a) | None}``
        (``None`` keeps the layer in float) or a callable ``layer -> same``
        (return ``...`` to keep the default for that layer).
      per_channel: one interval per output channel instead of per tensor.
      train_gamma: whether the weight transformer's exponent ``γ`` trains.
      calibration_data: a batch of inputs (array, list of arrays, or a
        ``tf.data.Dataset`` whose first batch is used) to initialize
        activation intervals and 8-bit ranges. Without it, activation
        intervals come from the preceding BatchNorm (else ``[0, 6]``) and
        8-bit ranges from the first training batch.
      bn_freeze_after: ``None`` (default) keeps BatchNorm as it is: it trains
        with batch statistics and the model's ``fit`` ends by re-estimating
        the moving statistics from the final weights (see
        ``qil_keras.model``). An int: every
        BatchNormalization becomes a
        ``qil_keras.batchnorm.QILBatchNormalization`` that trains with
        batch statistics for this many steps (the last ``min(100, n)`` of them
        blending towards the moving statistics), then with its frozen moving
        statistics (Jacob et al. 2018).
      concat_intervals: ``"shared"`` (default): a Concatenate whose inputs
        are all ReLU outputs read by nothing else (Inception's branches) gets
        one QIL activation quantizer after it, shared by the branches, so the
        file's int8 CONCATENATION needs no requantization of its inputs (as
        in post-training int8); an input that is a linear conv output read by
        nothing else (DenseNet's new features) gets no quantizer of its own:
        the conv writes the grid of the 8-bit quantizer after the
        Concatenate. ``"per_input"``: a quantizer on every input and one after
        the Concatenate (each input whose grid differs then costs the file a
        requantizing op).

    Returns:
      A new model (``qil_keras.model.QILModel``, or
      ``qil_keras.model.QILSequential`` for a Sequential input without nested models:
      ``keras.Model`` subclasses whose ``fit`` ends with BatchNorm
      re-estimation and the integer snap) with the
      float weights copied in; ``model.qil_report`` lists what was done to
      every layer and why (``qil_keras.report.QuantizationReport``).
    """
    check_model(model)
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    if first_last_bits is not None:
        first_last_bits = check_bits(first_last_bits, "first_last_bits")
    if layer_bits is not None and not (isinstance(layer_bits, dict) or callable(layer_bits)):
        raise TypeError("layer_bits must be a dict {layer name: bits} or a callable "
                        f"layer -> bits, got {type(layer_bits).__name__}.")
    nested = nested_models(model)
    if nested:   # transfer learning's base models: one graph of layers (the caller's untouched)
        model = flatten_nested(model)
    _refuse_quantized(model, w_bits, a_bits, first_last_bits, layer_bits)
    graph = _Graph(model)
    plan = _bit_plan(graph, w_bits, a_bits, first_last_bits, layer_bits)
    check_freeze_after(bn_freeze_after, "bn_freeze_after")
    if concat_intervals not in ("shared", "per_input"):
        raise ValueError("concat_intervals must be 'shared' or 'per_input', got "
                         f"{concat_intervals!r}.")
    new_model, rows, inserted = _rebuild(graph, plan, a_bits, per_channel, train_gamma,
                                         bn_freeze_after, concat_intervals == "shared")
    if calibration_data is not None:
        arrays = _check_calibration(model, calibration_data)
        # On the activations training will see: BatchNorms with batch statistics. The float
        # model's moving statistics can be far from those (a few steps at momentum 0.99 leave
        # them near mean 0, variance 1), and ranges calibrated on them were up to 100x too small
        # for training, whose gradients then overflowed (MobileNetV2 after one float epoch).
        _calibrate(new_model, arrays, batch_statistics=True)
        sources = {row.layer: "calibration batch" for row in rows if row.action == "inserted"}
        for name, (count, steps) in untie_inputs(
                new_model, arrays if len(arrays) > 1 else arrays[0]).items():
            sources[name] = (f"calibration batch, range widened by {steps} step(s) to keep "
                             f"{count} distinct input values off rounding ties")
    else:
        sources = _initialize_activations_without_data(new_model, inserted)
        sources.update({row.layer: "the first training batch (no calibration_data)"
                        for row in rows if row.layer_class == "FakeQuant8"})
    rows = [_with_init_source(row, sources) for row in rows]
    rows[:0] = [ReportRow(layer.name, type(layer).__name__, "inlined", None, None,
                          f"nested model: its {sum(not isinstance(inner, L.InputLayer) for inner in layer.layers)}"
                          " layers are rewritten as part "
                          "of this model (qil_keras.quantization.flatten)") for layer in nested]
    if isinstance(model, keras.Sequential):
        # Fresh copies, so the layers' .input/.output belong to the Sequential's graph.
        sequential = QILSequential(
            [keras.Input(batch_shape=model.input_shape, dtype=model.inputs[0].dtype)]
            + [type(layer).from_config(layer.get_config()) for layer in new_model.layers[1:]],
            name=model.name)
        sequential.set_weights(new_model.get_weights())
        new_model = sequential
    new_model.qil_report = QuantizationReport(rows)
    return new_model


def copy_model(model):
    """An independent copy of a (QIL) model: same classes, weights, bits and report."""
    if isinstance(model, keras.Sequential):
        # a model of its own class (QILSequential) on an input like the model's, of layers
        # cloned as clone_model clones them (no registry needed): clone_model makes a plain
        # Sequential, and putting its layers (already called, without their input) in a new
        # QILSequential left the copy unbuilt
        spec, (input_layer,) = model.inputs[0], model._input_layers
        inputs = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=input_layer.name)
        clone = type(model)([inputs] + [layer.__class__.from_config(layer.get_config())
                                        for layer in model.layers], name=model.name)
    else:
        clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for setting in ("reestimate_images", "snap_after_fit", "snap_storage"):
        if setting in vars(model):
            setattr(clone, setting, getattr(model, setting))
    if hasattr(model, "qil_report"):
        clone.qil_report = model.qil_report
    return clone


def _refuse_quantized(model, w_bits, a_bits, first_last_bits, layer_bits):
    if any(type(layer).__name__.startswith("QuantizeWrapper") for layer in model.layers):
        raise ValueError("This model is already quantized by tfmot (it has QuantizeWrapper "
                         "layers). Pass the float model to qil_keras.quantize.")
    qil = [layer for layer in model.layers if isinstance(layer, _QIL_CLASSES)]
    if not qil:
        return
    expected = _bit_plan(_Graph(model), w_bits, a_bits, first_last_bits, layer_bits)
    conflicts = [f"{layer.name}: w_bits={layer.w_bits} (asked {expected[layer.name][0]})"
                 for layer in qil if hasattr(layer, "w_bits") and layer.name in expected
                 and layer.w_bits != expected[layer.name][0]]
    raise ValueError(
        "This model is already QIL-quantized"
        + (f" with other bit widths ({'; '.join(conflicts[:3])})" if conflicts else "")
        + ". To change its bits keep the learned intervals and call "
        "qil_keras.set_bits(model, w_bits=..., a_bits=...); to start over, pass the "
        "float model to qil_keras.quantize.")


def _rebuild(graph, plan, default_a_bits, per_channel, train_gamma, bn_freeze_after,
             shared_concats=True):
    model = graph.model
    tensors, new_layers, rows, inserted = {}, {}, [], {}
    on_grid = set()  # ids of original tensors whose new value is on an integer grid
    taken = {layer.name for layer in model.layers}

    def unique(name):
        """``name``, or ``name_1``, ``name_2``... for a layer called several times."""
        candidate, n = name, 0
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate)
        return candidate

    def insert_after(tensor, new_value, producer_name):
        """Apply the planned quantizer (if any) to a produced tensor."""
        tid = id(tensor)
        node = graph.producer.get(tid)
        layer = node.layer if node is not None else None
        role = _role(layer) if layer is not None else "input"
        is_relu = graph.relu_output(tid, plan)
        cap = _relu_cap(layer) if is_relu else None
        if shared_concats and is_relu and graph.feeds_shared_concat(tid, plan):
            return new_value  # quantized after the Concatenate, with its other inputs
        if shared_concats and role == "merge" and graph.shared_concat(node, plan):
            is_relu = True    # a Concatenate of ReLU outputs is a ReLU output
            cap = _relu_cap(graph.producer[id(node.keras_inputs[0])].layer)
            rows[:] = [dataclasses.replace(row, reason=(
                "int8 op; its inputs are ReLU outputs that share the QIL activation quantizer "
                "after it (concat_intervals='shared'): the file copies their integers"))
                if row.layer == layer.name else row for row in rows]
        if is_relu and graph.feeds_integer_compute(tid, plan) \
                and not graph.only_int8_consumers(tid):
            consumers = [lyr for lyr in graph.reachable_weight_layers(tid) if lyr.name in plan]
            bits = max([plan[lyr.name][1] for lyr in consumers], default=default_a_bits)
            quantizer = QILActivation(bits, name=unique(f"{producer_name}_qil_act"))
            inserted[quantizer.name] = (layer, cap)
            on_grid.add(tid)
            why = (f"quantizes the ReLU outputs that {producer_name!r} concatenates (one "
                   "interval shared by its inputs)" if role == "merge"
                   else f"quantizes the ReLU output of {producer_name!r}")
            rows.append(ReportRow(quantizer.name, "QILActivation", "inserted", None, bits, why))
            return quantizer(new_value)
        if isinstance(getattr(new_value, "_keras_history", (None,))[0],
                      (AveragePooling2DInt8, LeakyReLUInt8)):
            on_grid.add(tid)  # its output is on its own int8 grid
            return new_value
        if role == "pass" and node is not None and all(
                id(t) in on_grid for t in node.keras_inputs):
            on_grid.add(tid)
            return new_value
        if shared_concats and graph.writes_concat_grid(tid, plan):
            return new_value  # its conv writes the 8-bit grid of the Concatenate's quantizer
        integer_output = graph.reaches_output(tid) and (
            role in ("average", "merge", "folded", "int8", "relu") or (
                role == "weights" and layer.name in plan
                and _activation_name(layer.activation) != "softmax"))
        if graph.feeds_integer_compute(tid, plan) or integer_output:
            # The model input is quantized by the file's QUANTIZE op: round as it does.
            quantizer = FakeQuant8(name=unique(f"{producer_name}_fq8"),
                                   quantize_op_rounding=role in ("input", "preprocess"),
                                   fixed_range=fixed_output_range(layer) if layer else None)
            on_grid.add(tid)
            why = "model input" if role == "input" else f"output of {producer_name!r}"
            if integer_output:
                why = f"{why} (the model's output, as int8 logits)"
            rows.append(ReportRow(quantizer.name, "FakeQuant8", "inserted", None, 8,
                                  f"{why} is an int8 tensor of the integer model"))
            return quantizer(new_value)
        return new_value

    inputs = []
    for spec, layer in zip(model.inputs, model._input_layers):
        inputs.append(keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=layer.name))
        rows.append(ReportRow(layer.name, "InputLayer", "kept", None, None, "model input"))
        tensors[id(spec)] = insert_after(spec, inputs[-1], layer.name)

    for node in graph.nodes:
        layer = node.layer
        first_use = id(layer) not in new_layers
        if first_use:
            new_layers[id(layer)] = _new_layer(layer, plan, per_channel, train_gamma, rows,
                                               bn_freeze_after)
            if _role(layer) == "preprocess" and not graph.at_input(node):
                rows[-1] = dataclasses.replace(rows[-1], action="float", reason=(
                    f"{type(layer).__name__} inside the network has no int8 lowering (it is "
                    "exported only at the model input, in float before the input quantizer): "
                    "left in float, and export_tflite refuses the model"))
            calls = graph.calls[id(layer)]
            if calls > 1 and rows[-1].layer == layer.name and (
                    _role(layer) in ("weights", "folded")):
                rows[-1] = dataclasses.replace(rows[-1], reason=(
                    f"{rows[-1].reason}; called {calls} times (shared weights): export_tflite "
                    "refuses it, give each call its own layer"))
        new_layer = new_layers[id(layer)]
        args, kwargs = tf.nest.map_structure(
            lambda t: tensors[id(t)] if id(t) in tensors else t,
            (node.call_args, node.call_kwargs))
        if isinstance(new_layer, tuple):  # SeparableConv2D: depthwise, [FakeQuant8], pointwise
            outputs = args[0]
            for part in new_layer:
                outputs = part(outputs)
            if first_use:
                _copy_separable_weights(layer, new_layer)
        else:
            outputs = new_layer(*args, **kwargs)
            if first_use:
                _copy_weights(layer, new_layer)
        split = getattr(new_layer, "_qil_split_activation", None)
        if split is not None:  # Dense(softmax) -> Dense, int8 logits, Activation(softmax)
            quantizer = FakeQuant8(name=unique(f"{layer.name}_fq8"))
            activation = (SwishInt8 if split in ("swish", "silu") else
                          lambda name: L.Activation(split, name=name))(
                name=unique(f"{layer.name}_{split}"))
            rows.append(ReportRow(quantizer.name, "FakeQuant8", "inserted", None, 8,
                                  f"logits of {layer.name!r}, an int8 tensor of the integer model"))
            rows.append(ReportRow(activation.name, "Activation", "inserted", None, None,
                                  f"the {split} that {layer.name!r} applied itself, split off "
                                  "so that its input can be quantized"))
            outputs = activation(quantizer(outputs))
        for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
            tensors[id(old)] = insert_after(old, new, layer.name)

    outputs = tf.nest.map_structure(lambda t: tensors[id(t)], model._nested_outputs)
    new_model = QILModel(inputs if len(inputs) > 1 else inputs[0], outputs, name=model.name)
    for layer in new_model.layers:  # a ReLU read only by QIL quantizers need not run in training
        if isinstance(layer, QILReLU):
            readers = [node.layer for node in layer._outbound_nodes]
            layer.pass_through_in_training = bool(readers) and all(
                isinstance(reader, QILActivation) for reader in readers)
    return new_model, rows, inserted


def _new_layer(layer, plan, per_channel, train_gamma, rows, bn_freeze_after):
    role = _role(layer)
    name, cls = layer.name, type(layer).__name__
    if isinstance(layer, L.SeparableConv2D):
        return _separable_layers(layer, plan, per_channel, train_gamma, rows)
    if role == "int8" and isinstance(layer, L.Activation) and _activation_name(
            layer.activation) in ("swish", "silu"):
        rows.append(ReportRow(name, cls, "kept", None, None,
                              "swish as int8 LOGISTIC then MUL (SwishInt8: the sigmoid on the "
                              "int8 grid 1/256); its output gets an 8-bit quantizer"))
        return SwishInt8(name=name)
    if role == "int8" and isinstance(layer, (L.LeakyReLU, L.ReLU)):
        alpha = float(layer.alpha if isinstance(layer, L.LeakyReLU) else layer.negative_slope)
        new = LeakyReLUInt8(alpha, name=name)
        rows.append(ReportRow(name, cls, "kept", None, 8, (
            f"LeakyReLUInt8: XNNPACK's int8 LEAKY_RELU on its input's 8-bit grid, alpha "
            f"{alpha:g} -> {new.alpha:g} (a multiple of 1/256, as the kernel computes it)")))
        return new
    if isinstance(layer, L.AveragePooling2D) and not whole_windows(layer):
        rows.append(ReportRow(name, cls, "kept", None, 8, (
            "windows cross the 'same' border: AveragePooling2DInt8 computes TFLite's int8 "
            "AVERAGE_POOL_2D (on an 8-bit grid of its input, integer average of the valid "
            "positions)")))
        return AveragePooling2DInt8(layer.pool_size, layer.strides, layer.padding, name=name)
    if role == "weights" and name in plan:
        w, a = plan[name]
        qil_class = LAYER_ROLES[type(layer)][1]
        options = dict(w_bits=w, per_channel=per_channel, train_gamma=train_gamma)
        note = ""
        if not layer.get_config().get("use_bias", True) and not _feeds_batchnorm(layer):
            # The file adds the builtin kernels' second-rounding offset (2^-(r+1) output steps,
            # INT4 storage) through the int32 bias, which holds it only to the nearest unit;
            # snap_to_integer puts the Keras bias on that value, so the layer needs a bias (a
            # BatchNorm after it would hold it instead). Zero at first: the same function.
            options.update(use_bias=True, bias_initializer="zeros")
            note = ("; a zero bias added (no BatchNorm follows): the export needs one to hold "
                    "the kernels' rounding offset")
        rows.append(ReportRow(name, cls, "quantized", w, a,
                              f"{cls} -> {qil_class.__name__}{note}"))
        split = _activation_name(layer.activation)
        if split in _SPLIT_ACTIVATIONS:
            options["activation"] = "linear"
        new = clone_layer(layer, qil_class, options)
        if split in _SPLIT_ACTIVATIONS:
            new._qil_split_activation = split
        return new
    reasons = {
        "weights": ("float", "kept in float by layer_bits"),
        "relu": ("kept", "ReLU; its output is quantized by the QIL activation quantizer"),
        "folded": ("kept", "folded into the preceding conv/dense at export"),
        "pass": ("kept", "passes its input's integer grid through"),
        "average": ("kept", "int8 op; its output gets an 8-bit quantizer where needed"),
        "merge": ("kept", "int8 op; its inputs are quantized"),
        "output": ("kept", "output activation, runs in the integer model as is"),
        "qil": ("kept", "already a qil_keras layer"),
        "int8": ("kept", "int8 op; its inputs and output get 8-bit quantizers"),
        "preprocess": ("kept", "preprocessing at the model input, computed in float before "
                       "the input quantizer (the file's QUANTIZE op)"),
    }
    action, reason = reasons.get(role, ("float", ""))
    inputs = layer.input if role == "merge" else None
    if isinstance(layer, L.Add) and isinstance(inputs, (list, tuple)) and len(inputs) > 2:
        reason = (f"Add of {len(inputs)} inputs: export_tflite refuses it (TFLite's int8 ADD "
                  "takes two; a longer sum converts to float ops): nest two-input Adds")
    if role == "unknown":
        reason = (f"{unsupported(layer)}: left in float, and export_tflite refuses the model "
                  "(calibrate_float covers float weight layers and tensors, not such ops)")
        if isinstance(layer, keras.Model):
            reason = ("nested subclassed model: its layer graph is unknown, so it cannot be "
                      "rewritten; build it with the functional API (nested Functional and "
                      "Sequential models are inlined)")
    if role == "folded" and called_in_inference_mode(layer):
        reason = (f"{reason}; called with training=False: normalizes with its moving statistics "
                  "in training too, not re-estimated")
    elif role == "folded" and bn_freeze_after is None:
        reason = f"{reason}; batch statistics in training, re-estimated at the end of fit"
    elif role == "folded" and bn_freeze_after is not None:
        reason = (f"{reason}; statistics frozen after {bn_freeze_after} training steps "
                  "(QILBatchNormalization)")
        rows.append(ReportRow(name, QILBatchNormalization.__name__, action, None, None, reason))
        return clone_layer(layer, QILBatchNormalization, {"freeze_after": bn_freeze_after})
    if role == "relu" and isinstance(layer, L.ReLU) and layer.max_value is None:
        rows.append(ReportRow(name, QILReLU.__name__, action, None, None, (
            f"{reason} (QILReLU: read only by QIL quantizers, it passes its input through in "
            "training and the quantizer applies the ReLU)")))
        return clone_layer(layer, QILReLU)  # _rebuild decides pass_through_in_training
    rows.append(ReportRow(name, cls, action, None, None, reason))
    return clone_layer(layer)


def _separable_layers(layer, plan, per_channel, train_gamma, rows):
    """A SeparableConv2D as TFLite runs it: DEPTHWISE_CONV_2D, then a 1x1 CONV_2D.

    Quantized: ``QILDepthwiseConv2D``, a FakeQuant8 on its signed output, and a ``QILConv2D``
    1x1 named as the layer (the layer's bias and activation); kept float: the two Keras layers.
    The quantized depthwise gets a bias of its own, starting at zero (the same function): the
    export moves it by a fraction of an input×weight step so that its sums stay off the
    rounding ties of both CPU kernel sets (``qil_keras.integer.ties.bias_offsets``).
    """
    config = layer.get_config()
    depthwise_options = dict(
        kernel_size=config["kernel_size"], strides=config["strides"], padding=config["padding"],
        depth_multiplier=config["depth_multiplier"], dilation_rate=config["dilation_rate"],
        use_bias=False, name=f"{layer.name}_depthwise")
    pointwise_options = dict(filters=config["filters"], kernel_size=1,
                             activation=config["activation"], use_bias=config["use_bias"],
                             name=layer.name)
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"SeparableConv2D {layer.name!r}: data_format must be 'channels_last'.")
    if layer.name not in plan:
        rows.append(ReportRow(layer.name, "SeparableConv2D", "float",
                              None, None, "kept in float by layer_bits (as depthwise + 1x1)"))
        return (L.DepthwiseConv2D(**depthwise_options), L.Conv2D(**pointwise_options))
    w, a = plan[layer.name]
    options = dict(w_bits=w, per_channel=per_channel, train_gamma=train_gamma)
    depthwise = QILDepthwiseConv2D(**dict(depthwise_options, use_bias=True), **options)
    between = FakeQuant8(name=f"{layer.name}_depthwise_fq8")
    pointwise = QILConv2D(**pointwise_options, **options)
    rows.append(ReportRow(depthwise.name, "SeparableConv2D", "quantized", w, a,
                          f"depthwise part of {layer.name!r} -> QILDepthwiseConv2D"))
    rows.append(ReportRow(between.name, "FakeQuant8", "inserted", None, 8,
                          f"the depthwise output of {layer.name!r}, an int8 tensor"))
    rows.append(ReportRow(layer.name, "SeparableConv2D", "quantized", w, a,
                          f"pointwise part of {layer.name!r} -> 1x1 QILConv2D"))
    return (depthwise, between, pointwise)


def _copy_separable_weights(old, parts):
    depthwise_kernel, pointwise_kernel, *bias = old.get_weights()
    depthwise, pointwise = parts[0], parts[-1]
    depthwise.set_weights([depthwise_kernel] + depthwise.get_weights()[1:])
    pointwise.set_weights([pointwise_kernel] + bias + pointwise.get_weights()[1 + len(bias):])
    for part in (depthwise, pointwise):
        if isinstance(part, (QILConv2D, QILDepthwiseConv2D)):
            part.initialize_interval()


def _feeds_batchnorm(layer):
    """Does a BatchNormalization take ``layer``'s output directly (and fold into it)?"""
    return any(isinstance(node.outbound_layer, L.BatchNormalization)
               for node in getattr(layer, "_outbound_nodes", []))


def _copy_weights(old, new):
    old_weights = old.get_weights()
    extra = new.get_weights()[len(old_weights):]
    new.set_weights(old_weights + extra)
    if isinstance(new, (QILConv2D, QILDense, QILDepthwiseConv2D)):
        new.initialize_interval()


def _calibrate(model, arrays, layers=None, batch_statistics=False):
    """Set the intervals and 8-bit ranges of ``layers`` (default: every QILActivation and
    FakeQuant8) from one inference pass over ``arrays``. ``batch_statistics``: the BatchNorms
    that train with batch statistics normalize with the batch's own in this pass, as in
    training (``qil_keras.training.batchnorm.batch_statistics_pass``)."""
    if layers is None:
        layers = [lyr for lyr in model.layers if isinstance(lyr, (QILActivation, FakeQuant8))]
    norms = [lyr for lyr in model.layers if batch_statistics
             and isinstance(lyr, keras.layers.BatchNormalization) and lyr.trainable
             and getattr(lyr, "freeze_after", None) != 0 and not called_in_inference_mode(lyr)]
    for layer in layers:
        layer._calibrating = True
    try:
        with batch_statistics_pass(norms):
            model(arrays if len(arrays) > 1 else arrays[0], training=False)
    finally:
        for layer in layers:
            layer._calibrating = False


def untie_inputs(model, x):
    """Widen each model-input quantizer of ``model`` (``FakeQuant8(quantize_op_rounding)``,
    in place, through its ``extra_steps``) so that no value of ``x`` at its input sits on a
    rounding tie of its grid; likewise the 8-bit quantizer after a ReLU that feeds only int8
    ops (hard-sigmoid's ``ReLU6(x + 3)``: its range is exactly ``[0, 6]`` once the cap is
    reached, and every ``x`` at zero gives ``3 = 127.5`` steps, a tie that LiteRT's builtin ADD
    rounds down and its reference up). Where a quantizer's input is such a function of another
    quantizer's grid, it is checked on every value that grid lets through
    (``reachable_inputs``), not on ``x``: the widening then does not depend on which data is
    probed, so the fit-end snap (training inputs) and the export (``representative_data``)
    widen it alike. Each widening adds whole steps of the tracked range (``extra_steps``), to
    the first grid on which no value is left on a tie, so a second call widens nothing more.

    The file's QUANTIZE op computes ``x/s`` (or ``x·(1/s)``) in float32 and the kernels round
    halves differently (LiteRT's reference kernel away from zero, its optimized one and
    XNNPACK to even), so tied inputs (every pixel of ``x/127.5 − 1`` on ``[-1, 1]``) come out
    one level apart from kernel to kernel and from Keras. A step or two more of range (the
    scale grows by under 1 %) moves every value off the ties; see
    ``qil_keras.ties.input_range_without_ties``. Returns ``{layer: (values on ties
    before, steps added)}`` for the quantizers it widened.
    """
    from ..integer import ties

    pending = [layer for layer in model.layers
               if isinstance(layer, FakeQuant8) and (layer.quantize_op_rounding
                                                     or _after_relu(layer))
               and layer.fixed_range is None and int(layer.num_updates.numpy()) > 0]
    moved = {}
    while pending:
        # One eager pass reads the inputs of all pending quantizers (a traced model per
        # quantizer traced the network's prefix again for each: minutes on MobileNetV3, whose
        # every hard-sigmoid quantizer widens); after a widening, the quantizers behind it
        # are read again, as their inputs may have moved. Eager calls read extra_steps anew.
        # A quantizer whose input is a per-tensor function of another quantizer's grid
        # (hard-sigmoid) is checked on every value that grid lets through, not on x.
        counters, probed = [], []
        for layer in pending:
            # the grids of the layer's own widenings (the step is that of the tracked range,
            # whatever extra_steps it already has)
            counter = ties.InputTies(
                [layer.quantization_params(layer.extra_steps + steps)[0]
                 for steps in range(ties.MAX_INPUT_WIDENING + 1)])
            values = reachable_inputs(layer)
            if values is None:
                probed.append((layer, counter))
            else:
                counter.add(values)
            counters.append(counter)
        if probed:
            probe = keras.Model(model.inputs, [layer.input for layer, _ in probed])
            for batch in _input_batches(x, _UNTIE_BATCH, math.inf):
                outputs = probe(batch, training=False)
                for (_, counter), values in zip(probed,
                                                outputs if len(probed) > 1 else [outputs]):
                    counter.add(values)
        done, pending = pending, []
        for i, (layer, counter) in enumerate(zip(done, counters)):
            steps, before = counter.result()
            if steps:
                layer.extra_steps += steps
                moved[layer.name] = (before, steps)
                pending = done[i + 1:]
                break
    if moved:  # extra_steps is read when a function is traced: drop the traced ones
        drop_traced_steps(model)
    return moved


_UNTIE_BATCH = 64  # images per pass of untie_inputs' probe (it holds every probed tensor)


def sole_producer(layer):
    """The one layer whose output ``layer`` takes, or ``None`` (several inputs, or a layer
    called more than once)."""
    nodes = layer._inbound_nodes
    producer = nodes[0].inbound_layers if len(nodes) == 1 else None
    return None if isinstance(producer, (list, tuple)) else producer


def reachable_inputs(layer):
    """Every value the input of ``layer`` can take, when that input is a ReLU of a per-tensor
    elementwise function (scalar add/subtract/multiply, ReLU) of another ``FakeQuant8``'s
    output: the function applied to each of that quantizer's 256 levels, as Keras computes it
    (float32). Hard-sigmoid's ``ReLU6(x + 3)`` is one: ``x`` at its zero level gives 3, a
    rounding tie (127.5 steps) once the range has reached ``[0, 6]``, whatever data is
    probed. ``None`` for any other input.
    """
    chain, producer = [], sole_producer(layer)
    while producer is not None and (_role(producer) == "relu" or (
            _role(producer) == "int8" and type(producer).__name__ == "TFOpLambda")):
        chain.append(producer)
        producer = sole_producer(producer)
    if not chain or _role(chain[0]) != "relu" or not isinstance(producer, FakeQuant8) \
            or int(producer.num_updates.numpy()) == 0:
        return None
    scale, zero_point = producer.quantization_params()
    lo = (-128 - zero_point) * scale
    # Eight points per step over the grid and one step beyond: every level's rounding
    # interval (one step wide) holds some; the layer itself says where each lands.
    probe = np.linspace(lo - scale, lo + 256 * scale, 8 * 257 + 1, dtype=np.float32)
    values = np.unique(np.asarray(producer(probe[None], training=False)))
    values = tf.constant(values[None])
    for layer in reversed(chain):
        if _role(layer) == "relu":
            values = layer(values)
        else:
            op, constant, tensor_first = tfop_constant(layer)
            fn = {"add": tf.add, "sub": tf.subtract, "mul": tf.multiply}[op]
            constant = tf.constant(constant, tf.float32)
            values = fn(values, constant) if tensor_first else fn(constant, values)
    return np.asarray(values).ravel()


def _after_relu(layer):
    """True for a quantizer whose input is a ReLU's output (a ReLU that feeds only int8 ops)."""
    producer = sole_producer(layer)
    return producer is not None and _role(producer) == "relu"


def _initialize_activations_without_data(model, inserted):
    sources = {}
    for name, (producer, cap) in inserted.items():
        layer = model.get_layer(name)
        q = float(2 ** layer.a_bits - 1)
        bn = _batchnorm_before(producer)
        if bn is not None:
            c, d = _interval_from_batchnorm(bn, q, cap)
            sources[name] = f"BatchNorm {bn.name!r} statistics"
        else:
            top = cap if cap is not None else DEFAULT_ACTIVATION_RANGE
            c = d = np.float32(top / 2)
            sources[name] = f"default [0, {top:g}]; pass calibration_data for a data-driven start"
        layer.quantizer_vars["c"].assign(c)
        layer.quantizer_vars["d"].assign(d)
    return sources


def _batchnorm_before(relu_layer):
    """The BatchNormalization whose output this ReLU layer consumes, if any."""
    if relu_layer is None or _role(relu_layer) != "relu":
        return None
    try:
        producer = relu_layer.input.node.layer
    except AttributeError:
        return None
    return producer if isinstance(producer, L.BatchNormalization) else None


def _with_init_source(row, sources):
    if row.layer in sources:
        return ReportRow(row.layer, row.layer_class, row.action, row.w_bits, row.a_bits,
                         f"{row.reason}; range from {sources[row.layer]}")
    return row


def set_bits(model, w_bits, a_bits, *, first_last_bits=8, layer_bits=None):
    """Change the bits of a QIL model in place, keeping weights and intervals.

    The same policy as ``quantize`` (first/last layers at
    ``first_last_bits``, ``layer_bits`` overrides) decides each layer's bits;
    a QIL activation quantizer takes the largest ``a_bits`` of the weight
    layers it feeds. A compiled model trains at the new bits without recompiling,
    also when a callback calls this in the middle of ``fit`` (its steps are traced
    again: ``drop_traced_steps``).
    """
    check_model(model)
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits")
    graph = _Graph(model)
    weight_layers = [lyr for lyr in graph.weight_layers()  # float ones decide first/last
                     if isinstance(lyr, (QILConv2D, QILDense, QILDepthwiseConv2D))]
    if not weight_layers:
        raise ValueError("set_bits needs a QIL model; call qil_keras.quantize first.")
    if first_last_bits is not None:
        first_last_bits = check_bits(first_last_bits, "first_last_bits")
    plan = _bit_plan(graph, w_bits, a_bits, first_last_bits, layer_bits)
    plan = {lyr.name: plan[lyr.name] for lyr in weight_layers if lyr.name in plan}
    changed = False
    for layer in weight_layers:
        if layer.name in plan:
            changed |= layer.w_bits != plan[layer.name][0]
            layer.set_bits(plan[layer.name][0])
    for node in graph.nodes:
        if isinstance(node.layer, QILActivation):
            fed = [lyr for lyr in graph.reachable_weight_layers(id(node.outputs)) if lyr.name in plan]
            bits = max([plan[lyr.name][1] for lyr in fed], default=a_bits)
            changed |= node.layer.a_bits != bits
            node.layer.set_bits(bits)
    if changed:  # new grids: a frozen QILBatchNormalization counts batch statistics again
        restart_batchnorm_statistics(model)
        drop_traced_steps(model)
    return model
