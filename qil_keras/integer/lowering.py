"""``qil_keras.lowering``: a QIL Keras model as an inference graph the TFLite converter makes integer.

The converter turns ``FakeQuant`` ops into int8 tensors and 4/8-bit weight
tensors (REFERENCE §2). This module writes, for a model from
``qil_keras.quantize``, the inference graph whose FakeQuant ops carry the
learned grids exactly:

- **weights**: the integer levels ``k`` of each QIL layer with BatchNorm
  folded in, ``W' = k · sign(a) · s·|a|`` per output channel
  (``a = γ_BN / sqrt(σ² + ε)``), wrapped in a narrow-range FakeQuant of range
  ``±7·s|a|`` (4 bits: INT4 storage) or ``±127·s|a|`` (8 bits): every ``W'`` is
  representable, so storage is lossless and zeros stay zeros;
- **biases**: ``b' = (b - μ)·a + β - lo``, where ``lo = c - d`` is the lower
  threshold of the QIL activation quantizer that follows (FakeQuant ranges
  are nudged to contain 0, so ``lo`` cannot live in the range);
- **QIL activations** ``k = round(clip((x - lo)/step, 0, K))``: ReLU fused into
  the producer, then an 8-bit FakeQuant with ``scale = step`` and zero point
  ``127 - K`` (``K = 2^b - 1``, or less under a ReLU6 cap), so int8
  saturation clips at ``K`` (no MINIMUM op, which XNNPACK cannot run in int8);
- **8-bit tensors** (``qil_keras.layers.FakeQuant8``): the same
  ``fake_quant_with_min_max_vars`` range as in Keras. A residual sum followed
  by a QIL activation with ``lo > 0`` takes ``lo`` from one branch's bias and
  shifts that branch's int8 zero point by ``round(lo/scale)``: exact up to
  half of that branch's 8-bit step.

Ops without an int8 range in Keras ("float leftovers") are refused with the
layer named, unless 8-bit ranges measured on data are supplied.
"""

import collections
import dataclasses

import numpy as np

from .._keras import keras, tf
from .emission import (LoweringError, ResidualSum, WeightPlan, _Add, _Affine,
                       _broadcast_channels, _Concat, _eager, _Emitter, _FakeQuant, _int8_step,
                       _Relu, _relu_output, _round_half_away, _Tensor)
from ..quantization.layers import (SIGMOID_RANGE, AveragePooling2DInt8, FakeQuant8, LeakyReLUInt8,
                                   QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D,
                                   SwishInt8)
from ..quantization.quantize import (_Graph, _activation_name, _relu_cap, _role, sole_producer,
                                     tfop_constant, unsupported, whole_windows)

__all__ = ["LoweringError", "lower", "WeightPlan", "signature_output_name"]

L = keras.layers
_QIL_WEIGHT = (QILConv2D, QILDense, QILDepthwiseConv2D)

# In a file written for the builtin kernels, a GlobalAveragePooling2D over at most this many
# positions (7x7, the last map of 224x224 MobileNets and EfficientNets; 8x8, CIFAR ResNets) is
# exported as a depthwise conv over the whole map instead of a MEAN
# (``_global_average_as_depthwise``): one int8 weight per position and channel (1280 x 49 =
# 61 KB on MobileNetV2's last map), in INT4 files too. Larger maps keep the MEAN, and so do
# files for XNNPACK, whose MEAN rounds once like Keras and runs faster than the conv (the
# default export measured 1.17x PTQ int8 latency with the conv, 1.03x with the MEAN).
MAX_POOLED_TAPS = 64


class _Lowering(_Emitter):
    """Each Keras layer as a value: a weight layer as a pending ``_Affine`` (BatchNorm folded
    into it), a ReLU fused into it, a QIL activation as the int8 grid and threshold its
    producer is emitted with, int8 ops with their own range, pass-through ops as they are.
    ``qil_keras.integer.emission`` writes the values out."""

    def __init__(self, model, weight_storage, float_ranges, collect_float, kernels="xnnpack"):
        if kernels not in ("xnnpack", "builtin"):
            raise ValueError(f"kernels must be 'xnnpack' or 'builtin', got {kernels!r}.")
        self.kernels = kernels
        self.model = model
        self.graph = _Graph(model)
        self.weight_storage = weight_storage
        self.float_ranges = float_ranges or {}
        self.collect_float = collect_float
        self.activations = []
        self._consumers = {k: len(v) for k, v in self.graph.consumers.items()}
        self._out_ids = self.graph.output_ids
        self._start_trace()  # float_tensors: Keras tensors that need a calibrated range

    def _single_use(self, source):
        return self._consumers.get(id(source), 0) <= 1 and id(source) not in self._out_ids

    # -- walking the Keras graph -------------------------------------------
    def __call__(self, *inputs):
        self._start_trace()  # every trace starts afresh
        self.activations = []
        self._call_index = collections.Counter()
        values = {}
        for spec, layer, x in zip(self.model.inputs, self.model._input_layers, inputs):
            values[id(spec)] = _Tensor(x, False, spec, f"model input {layer.name!r}")
        for node in self.graph.nodes:
            args = [values[id(t)] for t in node.keras_inputs]
            out = self._node(node, args)
            for tensor in tf.nest.flatten(node.outputs):
                values[id(tensor)] = out
                if isinstance(out, (_Affine, _Relu, _Add, _Concat, _FakeQuant, _Tensor)):
                    out.source = tensor
        outputs = []
        for tensor in self.model.outputs:
            value = values[id(tensor)]
            outputs.append(self._need_int8(value, "the model output"))
        return outputs[0] if len(outputs) == 1 else outputs

    def _node(self, node, args):
        layer = node.layer
        where = f"{type(layer).__name__} {layer.name!r}"
        role = _role(layer)
        calls = self.graph.calls[id(layer)]
        if calls > 1 and (isinstance(layer, (_QIL_WEIGHT, L.BatchNormalization))
                          or role == "weights"):
            raise LoweringError(
                f"{where} is called {calls} times in the model (shared weights): the integer "
                "export folds, snaps and checks each weight or BatchNorm layer as one op of "
                "the file. Give each call its own layer (the same weights copied in) before "
                "quantizing.")
        if isinstance(layer, _QIL_WEIGHT) or role == "weights":
            return self._weight_layer(layer, args[0], where)
        if isinstance(layer, L.BatchNormalization):
            return self._batchnorm(layer, args[0], where)
        if isinstance(layer, QILActivation):
            return self._qil_activation(layer, args[0], where)
        if isinstance(layer, AveragePooling2DInt8):
            return self._average_pool_int8(layer, args[0], where)
        if isinstance(layer, LeakyReLUInt8):
            return self._leaky_relu_int8(layer, args[0], where)
        if isinstance(layer, FakeQuant8):
            return _FakeQuant(args[0], layer, where=where)
        if role == "relu":
            cap = _relu_cap(layer)
            x = args[0]
            if isinstance(x, _Affine) and not x.relu and self._single_use(x.source):
                return dataclasses.replace(x, relu=True, cap=cap, where=where)
            return _Relu(x, cap, where=where)
        if isinstance(layer, L.Add):
            return _Add(list(args), where=where)
        if role in ("pass", "average", "merge", "output"):
            return self._simple(node, args, role, where, self._call_name(layer))
        if role == "int8":
            return self._int8_op(node, layer, args, where)
        if role == "preprocess":
            return self._preprocess(layer, args[0], where)
        raise LoweringError(
            f"{where}: {unsupported(layer)}. Replace it with a supported layer, or keep it "
            "out of the exported model.")

    def _weight_layer(self, layer, x, where):
        if isinstance(layer, _QIL_WEIGHT):
            levels = _eager(layer.integer_levels).astype(np.float64)
            scale = np.asarray(_eager(layer.weight_scale), np.float64)
            bits, calibrated = int(_eager(lambda: layer.w_bits)), False
        else:  # float leftover: quantize post-training if allowed
            key = ("weights", layer.name)
            if key not in self.float_ranges:
                self.float_tensors.append((None, where, "weights"))
                if not self.collect_float:
                    raise LoweringError(
                        f"{where} is a float weight layer (kept float by layer_bits or not "
                        "quantized): the integer export needs its weights in int8. Quantize it "
                        "with qil_keras.quantize, or export with calibrate_float=True for a "
                        "post-training 8-bit quantization of its weights.")
            kernel = getattr(layer, "depthwise_kernel", None)
            kernel = _eager((kernel if kernel is not None else layer.kernel).numpy).astype(np.float64)
            axes = tuple(range(kernel.ndim - (2 if isinstance(layer, L.DepthwiseConv2D) else 1)))
            scale = np.maximum(np.abs(kernel).max(axis=axes), 1e-12) / 127.0
            levels = _round_half_away(kernel / scale)
            bits, calibrated = 8, True
        op = {L.Conv2D: "CONV_2D", L.DepthwiseConv2D: "DEPTHWISE_CONV_2D",
              L.Dense: "FULLY_CONNECTED"}[next(c for c in (L.DepthwiseConv2D, L.Conv2D, L.Dense)
                                               if isinstance(layer, c))]
        self._check_weight_layer(layer, op, where)
        out_channels = levels.shape[-1] if op != "DEPTHWISE_CONV_2D" else int(
            np.prod(levels.shape[-2:]))
        scale = np.broadcast_to(scale.reshape(-1) if scale.size > 1 else scale, (out_channels,))
        storage = self._storage(bits, where)
        bias = (_eager(layer.bias.numpy).astype(np.float64).reshape(-1) if layer.use_bias
                else np.zeros(out_channels))
        plan = WeightPlan(layer.name, op, bits, storage, levels, np.array(scale, np.float64),
                          calibrated)
        self.weight_plans.append(plan)
        activation = _activation_name(layer.activation)
        value = _Affine(layer, x, plan, bias, where=where,
                        bias_owner=layer if getattr(layer, "use_bias", False) else None)
        if activation in ("relu", "relu6"):
            value.relu, value.cap = True, (6.0 if activation == "relu6" else None)
        elif activation != "linear":
            raise LoweringError(
                f"{where} applies {activation!r} itself; qil_keras.quantize splits such "
                "activations off. Quantize the float model again with qil_keras.quantize.")
        return value

    @staticmethod
    def _check_weight_layer(layer, op, where):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise LoweringError(f"{where}: data_format must be 'channels_last' (TFLite is NHWC).")
        if op == "CONV_2D" and getattr(layer, "groups", 1) != 1:
            raise LoweringError(f"{where}: grouped convolutions (groups > 1) are not supported.")
        if op == "FULLY_CONNECTED" and len(layer.input_shape) != 2:
            raise LoweringError(
                f"{where}: Dense on a rank-{len(layer.input_shape)} input is not supported; "
                "Flatten (or GlobalAveragePooling2D) before it.")

    def _storage(self, bits, where):
        """INT8 for layers of more than 4 bits; INT4 below unless ``weight_storage="int8"``."""
        return "int8" if self.weight_storage == "int8" or bits > 4 else "int4"

    def _batchnorm(self, layer, x, where):
        axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
        if axis not in (-1, len(layer.input_shape) - 1):
            raise LoweringError(f"{where}: only channels-last BatchNormalization is exported.")
        gamma = _eager(layer.gamma.numpy) if layer.scale else 1.0
        beta = _eager(layer.beta.numpy) if layer.center else 0.0
        a = np.asarray(gamma, np.float64) / np.sqrt(_eager(layer.moving_variance.numpy).astype(np.float64)
                                                    + layer.epsilon)
        if not (isinstance(x, _Affine) and not x.relu and self._single_use(x.source)):
            return self._standalone_batchnorm(layer, x, a, beta, where)
        a = np.broadcast_to(a, x.plan.scale.shape)
        sign = np.where(a < 0, -1.0, 1.0)
        plan = dataclasses.replace(
            x.plan,
            levels=x.plan.levels * _broadcast_channels(sign, x.plan.levels, x.plan.op),
            scale=np.maximum(x.plan.scale * np.abs(a), 1e-30))
        position = next(i for i, p in enumerate(self.weight_plans) if p is x.plan)
        self.weight_plans[position] = plan
        bias = (x.bias - _eager(layer.moving_mean.numpy)) * a + beta
        return dataclasses.replace(x, plan=plan, bias=bias, where=f"{x.where} + {where}",
                                   bias_owner=layer)

    def _standalone_batchnorm(self, layer, x, a, beta, where):
        """A BatchNormalization with no conv/dense to fold into (pre-activation nets:
        DenseNet, ResNetV2): ``y = a·x + (β − μ·a)`` per channel, as a 1x1 DEPTHWISE_CONV_2D
        with weight levels ``sign(a)`` on the per-channel scale ``|a|`` (the int8 weight
        ``±127`` at scale ``|a|/127``: ``a`` kept to float32)."""
        channels = int(layer.input_shape[-1])
        a = np.broadcast_to(a, (channels,)).astype(np.float64)
        sign = np.where(a < 0, -1.0, 1.0)
        bias = np.broadcast_to(beta - _eager(layer.moving_mean.numpy) * a, (channels,))
        return self._depthwise_affine(layer.name, x, sign.reshape(1, 1, channels, 1),
                                      np.maximum(np.abs(a), 1e-30), bias,
                                      f"{where} (as a 1x1 depthwise conv)", bias_owner=layer)

    def _average_pool_int8(self, layer, x, where):
        """AVERAGE_POOL_2D on the layer's own int8 grid: what
        ``qil_keras.layers.AveragePooling2DInt8`` computes."""
        return self._on_own_grid(layer, x, where, lambda t: tf.nn.avg_pool2d(
            t, layer.pool_size, layer.strides, layer.padding.upper()))

    def _leaky_relu_int8(self, layer, x, where):
        """LEAKY_RELU on the layer's own int8 grid: what ``qil_keras.layers.LeakyReLUInt8``
        computes."""
        return self._on_own_grid(layer, x, where, lambda t: tf.nn.leaky_relu(t, layer.alpha))

    def _on_own_grid(self, layer, x, where, op):
        """``op`` with input and output on ``layer``'s own int8 grid (the input moved onto it
        first, by a 1x1 depthwise conv, where it is on another grid)."""
        tensor = self._need_int8(x, where)
        scale, zero_point = _eager(layer.quantization_params)
        grid = ((-128 - zero_point) * scale, (127 - zero_point) * scale)
        moved = self._requantized(tensor, grid, f"{layer.name}_input", where)
        with tf.name_scope(layer.name + "/"):
            if moved is tensor:
                # Already on the grid: read it through a FakeQuant of the same range (an
                # identity). Without it the converter (tensorflow 2.21) left the convs that read
                # the same tensor in float when it came through a MaxPool (DEQUANTIZE, float
                # CONV_2D; Inception's pool branch straight after quantize).
                moved = self._fake_quant8(tensor, *grid)
            y = self._fake_quant8(op(moved), *grid)
        return _Tensor(y, True, None, where)

    def _pooled_as_depthwise(self, shape):
        """Whether a GlobalAveragePooling2D of an input of ``shape`` is exported as a depthwise
        conv (MAX_POOLED_TAPS)."""
        h, w = shape[1:3]
        return (self.kernels == "builtin" and h is not None and w is not None
                and 1 < h * w <= MAX_POOLED_TAPS)

    def _global_average_as_depthwise(self, layer, x, where, shape, name):
        """GlobalAveragePooling2D over an ``h x w`` map (``1 < h·w <= MAX_POOLED_TAPS``) as a
        DEPTHWISE_CONV_2D of weights ``1/(h·w)`` over the whole map (stored as 127), not a
        MEAN: the sum is requantized once, as in an average pool (``_average_as_depthwise``).
        The builtin kernels' int8 MEAN folds ``1/(h·w)`` into its multiplier, which leaves few
        bits for its second rounding: it can land a level away from Keras' mean on values far
        from a rounding boundary (a band of up to 1/8 of a step on an untrained digits CNN,
        ``tests/integer/test_export.py``), and a ``keepdims`` mean also corrects its zero point
        approximately (``qil_keras.integer_reference``). With weights 127 the conv's band is
        127 times narrower against the sums' spacing, and the tie guard moves its bias as for
        any conv; under the builtin kernels it also ran faster than the MEAN (45 against 123 us
        on an 8x8x192 map, a development run). ``shape``, ``name``: this call's input shape and
        name (``_call_name``)."""
        h, w = shape[1:3]
        channels = int(shape[-1])
        return self._depthwise_affine(name, x, np.ones((h, w, channels, 1)),
                                      np.full(channels, 1.0 / (h * w)), np.zeros(channels),
                                      f"{where} (as a depthwise conv over the whole map)",
                                      flatten=not getattr(layer, "keepdims", False))

    def _average_as_depthwise(self, layer, x, where, channels, name):
        """AveragePooling2D without partial windows as a DEPTHWISE_CONV_2D of weights ``1/n``
        (levels 1 on the scale ``1/n``): the sum is requantized once, from the input's grid
        straight to the output's, as Keras' FakeQuant8 rounds the average. (The int8
        AVERAGE_POOL_2D keeps its input's scale: it would round the average to a low-bit QIL
        step first.)"""
        ph, pw = layer.pool_size
        return self._depthwise_affine(name, x, np.ones((ph, pw, channels, 1)),
                                      np.full(channels, 1.0 / (ph * pw)), np.zeros(channels),
                                      f"{where} (as a depthwise conv)", layer.strides,
                                      layer.padding)

    def _int8_op(self, node, layer, args, where):
        """An int8 op with its own output range (the FakeQuant8 that follows gives it)."""
        xs = [self._need_int8(a, where) for a in args]
        x = xs[0]
        with tf.name_scope(layer.name + "/"):
            if isinstance(layer, L.Multiply):
                y = xs[0]
                for other in xs[1:]:
                    y = y * other
            elif isinstance(layer, SwishInt8):
                y = self._swish(x)
            elif isinstance(layer, (L.LeakyReLU, L.ReLU)):
                alpha = float(layer.alpha if isinstance(layer, L.LeakyReLU)
                              else layer.negative_slope)
                y = tf.nn.leaky_relu(x, alpha)
            elif isinstance(layer, L.Activation):
                name = _activation_name(layer.activation)
                y = {"sigmoid": tf.sigmoid, "tanh": tf.tanh}[name](x) if name in (
                    "sigmoid", "tanh") else self._swish(x)
            else:  # TFOpLambda with a scalar constant
                op, constant, tensor_first = tfop_constant(layer)
                c = np.float32(constant)
                y = {"add": lambda: x + c, "mul": lambda: x * c,
                     "sub": lambda: x - c if tensor_first else c - x}[op]()
        return _Tensor(y, False, None, where)

    def _swish(self, x):
        """Swish as LOGISTIC (on its fixed output grid) then MUL, as SwishInt8 computes it."""
        gate = tf.quantization.fake_quant_with_min_max_args(
            tf.sigmoid(x), *SIGMOID_RANGE, num_bits=8, narrow_range=False)
        self._tag(gate, (SIGMOID_RANGE[1] - SIGMOID_RANGE[0]) / 255.0)
        return x * gate

    def _preprocess(self, layer, x, where):
        """Rescaling/Normalization at the model input: the same float32 ops as Keras, before
        the file's QUANTIZE op."""
        if not isinstance(x, _Tensor) or x.quantized:
            raise LoweringError(
                f"{where}: Rescaling and Normalization are exported only at the model input "
                "(computed in float before the input is quantized); inside the network they "
                "have no int8 lowering. Move the preprocessing to the model input or fold it "
                "into the layer before it.")
        if isinstance(layer, L.Normalization) and getattr(layer, "invert", False):
            raise LoweringError(f"{where}: Normalization(invert=True) is not supported.")
        with tf.name_scope(layer.name + "/"):
            return _Tensor(layer.call(x.tensor), False, None, where)

    def _qil_activation(self, layer, x, where):
        c, d = _eager(layer.interval)
        bits = int(_eager(lambda: layer.a_bits))
        levels = float(2 ** bits - 1)
        step = 2.0 * d / levels
        lo = c - d
        if isinstance(x, _Affine) and x.relu:
            cap, inner = x.cap, dataclasses.replace(x, relu=False, cap=None)
        elif isinstance(x, _Relu):
            cap, inner = x.cap, x.x
        elif isinstance(x, _Concat) and (shared := _relu_inputs(x)) is not None:
            (cap,), inner = shared, x  # one interval shared by the branches
        else:
            raise LoweringError(f"{where}: a QIL activation quantizer must follow a ReLU.")
        top = int(levels)
        if cap is not None:
            top = int(min(levels, max(0.0, _round_half_away((cap - lo) / step))))
        grid = (step * (top - 255), step * top)
        self.activations.append(dict(name=layer.name, a_bits=bits, c=c, d=d, step=step,
                                     levels=top + 1, lower_threshold=lo))
        self._current_activation = layer.name
        out = self.emit(inner, lo, True, grid)
        inputs = self._add_inputs.get(id(inner)) if isinstance(inner, _Add) else None
        if inputs is not None and all(p is not None for p in inputs):
            self.residual_sums[layer.name] = ResidualSum(where, inputs, _int8_step(grid), top)
        return out

    def _call_name(self, layer):
        """The layer's name, or for a layer called more than once ``<name>_call<i>``: the
        name of what this call adds to the file (a pooling layer's depthwise conv)."""
        index = self._call_index[id(layer)]
        self._call_index[id(layer)] += 1
        return layer.name if self.graph.calls[id(layer)] == 1 else f"{layer.name}_call{index}"

    def _simple(self, node, args, role, where, name):
        """A layer without weights, from the shapes of this call (``node``): a layer called
        more than once (a shared pooling layer) has no single ``input_shape``; ``name``: this
        call's (``_call_name``)."""
        layer, consumer = node.layer, where
        in_shape, out_shape = _node_shapes(node)
        with tf.name_scope(name + "/"):
            if role == "pass":
                t = self.emit(args[0])
                _, scale, integers = self._scales.get(id(t.tensor), (None, None, None))
                y = self._tag(self._pass_op(layer, t.tensor, where, out_shape), scale, integers)
                return _Tensor(y, t.quantized, None, where)
            if role == "output":
                x = self._need_int8(args[0], consumer)
                return _Tensor(self._tag(tf.nn.softmax(x), 1.0 / 256.0), True, None, where)
            if role == "average":
                if isinstance(layer, L.AveragePooling2D) and whole_windows(layer):
                    return self._average_as_depthwise(layer, args[0], where, int(in_shape[-1]),
                                                      name)
                if isinstance(layer, L.GlobalAveragePooling2D) and self._pooled_as_depthwise(
                        in_shape):
                    return self._global_average_as_depthwise(layer, args[0], where, in_shape,
                                                             name)
                x = self._need_int8(args[0], consumer)
                if isinstance(layer, L.GlobalAveragePooling2D) and x.shape[1:3] == (1, 1):
                    # the mean of one value: a reshape on the input's grid, so that a
                    # FakeQuant8 after it is an explicit requantization (the converter drops
                    # the MEAN, then the second FakeQuant: measured on MobileNet at 32x32)
                    _, scale, integers = self._scales.get(id(x), (None, None, None))
                    y = tf.reshape(x, (-1,) + tuple(out_shape[1:]))
                    return _Tensor(self._tag(y, scale, integers), True, None, where)
                if isinstance(layer, L.GlobalAveragePooling2D):
                    y = tf.reduce_mean(x, axis=(1, 2), keepdims=bool(layer.keepdims))
                else:
                    y = tf.nn.avg_pool2d(x, layer.pool_size, layer.strides,
                                         layer.padding.upper())
                return _Tensor(y, False, None, where)
            return _Concat(list(args), layer.axis, where=where)  # merge (Concatenate)

    @staticmethod
    def _pass_op(layer, x, where, out_shape):
        if isinstance(layer, (L.Dropout, L.SpatialDropout2D)) or (
                isinstance(layer, L.Activation) and _activation_name(layer.activation) == "linear"):
            return tf.identity(x)
        if isinstance(layer, L.MaxPooling2D):
            return tf.nn.max_pool2d(x, layer.pool_size, layer.strides, layer.padding.upper())
        if isinstance(layer, L.GlobalMaxPooling2D):
            return tf.reduce_max(x, axis=(1, 2), keepdims=bool(layer.keepdims))
        if isinstance(layer, (L.Flatten, L.Reshape)):
            return tf.reshape(x, (-1,) + tuple(out_shape[1:]))
        if isinstance(layer, L.ZeroPadding2D):
            (top, bottom), (left, right) = layer.padding
            return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        if isinstance(layer, L.Cropping2D):
            (top, bottom), (left, right) = layer.cropping
            h, w = x.shape[1], x.shape[2]
            return x[:, top:h - bottom, left:w - right, :]
        raise LoweringError(f"{where}: no integer lowering for {type(layer).__name__}.")



def _node_shapes(node):
    """``(input shape, output shape)`` of one call of a layer (its first input and output)."""
    return (tuple(tf.nest.flatten(node.keras_inputs)[0].shape),
            tuple(tf.nest.flatten(node.outputs)[0].shape))


def _relu_inputs(concat):
    """``(cap,)``: the one ReLU cap (``None``: uncapped) of a ``_Concat`` whose inputs are all
    ReLU outputs with the same cap (``quantize``'s shared concat interval); else ``None``."""
    caps = set()
    for item in concat.inputs:
        if not _relu_output(item):
            return None
        caps.add(item.cap)
    return (caps.pop(),) if len(caps) == 1 else None


def signature_output_name(model):
    """The output key of the file's signature: the name of the model's output layer, or, where
    ``qil_keras.quantize`` put a ``FakeQuant8`` after the user's output layer (named
    ``<layer>_fq8``), the name of that layer: an app keeps the name the float model had."""
    name = model.output_names[0]
    layer = model.get_layer(name)
    producer = sole_producer(layer) if isinstance(layer, FakeQuant8) else None
    if producer is not None and name == f"{producer.name}_fq8":
        return producer.name
    return name


def input_signature(model, dtype=None):
    """The model's inputs as ``tf.TensorSpec`` with a dynamic batch, named after their input
    layers (the keys of the file's ``serving_default`` signature); ``dtype``: that of every
    input (default: each input's own)."""
    return [tf.TensorSpec((None,) + tuple(spec.shape[1:]), dtype or spec.dtype, name=layer.name)
            for spec, layer in zip(model.inputs, model._input_layers)]


def lower(model, *, weight_storage="auto", float_ranges=None, collect_float=False,
          kernels="xnnpack"):
    """Trace ``model`` into an inference ``tf.function`` with FakeQuant ops (dynamic batch).

    ``kernels``: which kernels will run the file, ``"xnnpack"`` (the default
    delegate) or ``"builtin"`` (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``); they
    round differently, and the biases are written for the one named.

    Returns ``(concrete_function, module, lowering)`` (``module`` owns the function); ``lowering.weight_plans``,
    ``lowering.activations`` and ``lowering.float_tensors`` describe the result.
    """
    lowering = _Lowering(model, weight_storage, float_ranges, collect_float, kernels)
    signature = input_signature(model, tf.float32)
    module = tf.Module()  # the converter's trackable_obj
    function = lowering
    if len(model.outputs) == 1:  # the signature's output key: the Keras output name
        output_name = signature_output_name(model)

        def named_output(*inputs):
            return {output_name: lowering(*inputs)}
        function = named_output
    module.inference = tf.function(function, input_signature=signature, autograph=False)
    concrete = module.inference.get_concrete_function()
    return concrete, module, lowering
