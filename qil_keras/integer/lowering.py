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

import dataclasses

import numpy as np

from .._keras import keras, tf
from .integer_reference import round_half_away as _round_half_away
from ..quantization.layers import (SIGMOID_RANGE, AveragePooling2DInt8, FakeQuant8, QILActivation,
                                   QILConv2D, QILDense, QILDepthwiseConv2D, SwishInt8)
from ..quantization.quantize import (_Graph, _activation_name, _relu_cap, _role, sole_producer,
                                     tfop_constant, unsupported, whole_windows)

__all__ = ["LoweringError", "lower", "WeightPlan", "signature_output_name"]

L = keras.layers
_QIL_WEIGHT = (QILConv2D, QILDense, QILDepthwiseConv2D)


class LoweringError(ValueError):
    """The model has a layer or pattern the integer export cannot represent exactly."""


@dataclasses.dataclass
class WeightPlan:
    """How one weight layer is stored: integer levels, per-channel scale, storage."""

    name: str
    op: str
    w_bits: int
    storage: str           # "int4" or "int8"
    levels: np.ndarray     # folded integer kernel (Keras kernel layout)
    scale: np.ndarray      # per output channel, > 0
    calibrated: bool = False  # True for a float layer quantized post-training
    chosen_multiplier: np.ndarray | None = None  # set by the lowering (see ``_requantization``)
    rounding: str = "single"   # "single" (XNNPACK's fp32) or "double" (gemmlowp, builtin kernels)

    @property
    def multiplier(self):
        """The weight multiplier the file uses (``default_multiplier`` unless the lowering chose)."""
        if self.chosen_multiplier is not None:
            return self.chosen_multiplier
        return self.default_multiplier

    @property
    def default_multiplier(self):
        """``m = floor(limit / max|k|)`` (one per layer): the file stores ``k·m`` at scale ``s/m``.

        ``limit`` is 7 (INT4) or 127 (INT8). The learned grid is kept exactly
        (``2^b - 1`` distinct values per tensor at most, zeros stay zeros); the integer
        accumulator gets ``m`` times finer, so the int32 bias (whose unit is
        ``s_in · s/m``) rounds ``m`` times less: for 2-bit weights in INT8
        storage ``m = 127``. See REFERENCE §2 on the bias unit.
        """
        limit = 7.0 if self.storage == "int4" else 127.0
        peak = max(float(np.abs(self.levels).max(initial=0.0)), 1.0)
        return np.full(self.scale.shape, np.floor(limit / peak))


def _eager(read):
    """Run ``read()`` (variable reads, ``.numpy()``) eagerly while a graph is being traced."""
    with tf.init_scope():
        return read()


# ---------------------------------------------------------------------------
# values flowing through the lowering: emitted tensors or pending ops
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class _Tensor:
    tensor: object
    quantized: bool      # has an int8 range in the integer model
    source: object       # the Keras tensor it stands for (for errors and calibration)
    where: str


@dataclasses.dataclass
class _Affine:
    """Conv/dense (+ folded BN, + ReLU) not emitted yet, so a bias shift can still join."""

    layer: object
    x: object            # input _Value
    plan: WeightPlan
    bias: np.ndarray
    relu: bool = False
    cap: float | None = None
    source: object = None
    where: str = ""
    bias_owner: object = None   # the layer whose parameter sets the bias (BN or conv)


@dataclasses.dataclass
class _Relu:
    x: object
    cap: float | None
    source: object = None
    where: str = ""


@dataclasses.dataclass
class _Add:
    inputs: list
    source: object = None
    where: str = ""


@dataclasses.dataclass
class _Concat:
    """A Concatenate not emitted yet: its inputs are requantized to the output's int8 grid."""

    inputs: list
    axis: int
    source: object = None
    where: str = ""


@dataclasses.dataclass
class _FakeQuant:
    x: object
    layer: object
    source: object = None
    where: str = ""


@dataclasses.dataclass
class ResidualSum:
    """An int8 ADD whose output is a QIL activation: ``k = clip(round(Σ s_i (q_i - z_i) / s), 0, top)``.

    ``inputs``: per input ``(s_i, z_i, lowest, highest)``, the integers ``q_i`` it can hold
    (the lower threshold is already folded into one input's zero point); ``step``: ``s``.
    """

    where: str
    inputs: list
    step: float
    top: int


@dataclasses.dataclass
class AffineSum:
    """A conv/dense whose int8 input holds few integers, requantized once (XNNPACK's fp32 path).

    Per output channel the file computes ``v = (m·n + b) · u`` output levels (from the output
    zero point), then rounds it: ``n = Σ k · x`` over the folded weight levels ``k`` and input
    levels ``x`` in ``[x_lowest, x_highest]``, so ``n`` is an integer in ``[n_min, n_max]``;
    ``m`` the weight multiplier, ``b`` the int32 bias, ``u`` its unit over the output step. Only
    ``v`` in ``[v_min, v_max]`` is not clamped.
    """

    where: str
    n_min: np.ndarray
    n_max: np.ndarray
    multiplier: float
    bias_int: np.ndarray
    unit_levels: np.ndarray
    v_min: float
    v_max: float
    # Builtin kernels that round twice compute round(v + shift): the value Keras rounds.
    shift_levels: np.ndarray | None = None
    # The other kernel set rounds v + other_levels (XNNPACK: v − shift; builtin: v + 2^-(r+1)):
    # keeping v off ties for both makes one file exact under both.
    other_levels: np.ndarray | None = None


# Convolutions whose input has more integers than this (8-bit tensors) reach too many sums to
# keep them off rounding ties; see qil_keras.ties.
_MAX_INPUT_LEVELS = 15


def _int8_step(grid):
    """The int8 step of an output range ``grid = (lo, hi)``, widened to include 0."""
    return (max(float(grid[1]), 0.0) - min(float(grid[0]), 0.0)) / 255.0


def _int8_range(lo, hi):
    """``(lo, hi)`` widened to include 0 and made non-empty, as FakeQuant takes it."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    return lo, max(hi, lo + 1e-6)


def _int8_grid(lo, hi):
    """``(scale, zero_point)`` of the int8 tensor with range ``(lo, hi)``."""
    lo, hi = _int8_range(lo, hi)
    scale = (hi - lo) / 255.0
    return scale, int(np.clip(_round_half_away(-128.0 - lo / scale), -128, 127))


class _Lowering:
    def __init__(self, model, weight_storage, float_ranges, collect_float, kernels="xnnpack"):
        if kernels not in ("xnnpack", "builtin"):
            raise ValueError(f"kernels must be 'xnnpack' or 'builtin', got {kernels!r}.")
        self.kernels = kernels
        self.model = model
        self.graph = _Graph(model)
        self.weight_storage = weight_storage
        self.float_ranges = float_ranges or {}
        self.collect_float = collect_float
        self.float_tensors = []     # Keras tensors that need a calibrated range
        self.weight_plans = []
        self.activations = []
        self._consumers = {k: len(v) for k, v in self.graph.consumers.items()}
        self._out_ids = self.graph.output_ids
        self._emitted = {}  # (id(value), shift, relu, grid) -> (value, _Tensor)

    # -- helpers -----------------------------------------------------------
    def _single_use(self, source):
        return self._consumers.get(id(source), 0) <= 1 and id(source) not in self._out_ids

    def _need_int8(self, value, consumer):
        """Emit ``value`` and make sure it has an int8 range (else calibrate or refuse)."""
        t = self.emit(value)
        if t.quantized:
            return t.tensor
        key = id(t.source)
        if key in self.float_ranges:
            lo, hi = self.float_ranges[key]
            return self._fake_quant8(t.tensor, lo, hi)
        self.float_tensors.append((t.source, t.where, consumer))
        if self.collect_float:
            return t.tensor
        raise LoweringError(
            f"{t.where} gives a float tensor to {consumer}, which runs in int8, but no 8-bit "
            "range for it was learned (its layer is not quantized by qil_keras.quantize). "
            "Quantize that layer, or export with calibrate_float=True to measure an 8-bit range "
            "on the representative data (post-training calibration of the leftovers).")

    def _tag(self, tensor, scale, integers=None):
        """Remember the int8 scale of an emitted tensor (the bias unit needs the input's) and,
        for an int8 tensor, ``integers = (zero_point, lowest, highest)``: the integers it can
        hold (the rounding-tie guard of residual sums needs them)."""
        if scale is not None:
            self._scales[id(tensor)] = (tensor, float(scale), integers)
        return tensor

    def _scale(self, tensor):
        return self._scales.get(id(tensor), (None, None, None))[1]

    def _int8_params(self, tensor):
        """``(scale, zero_point, lowest, highest)`` of an emitted int8 tensor, or None."""
        _, scale, integers = self._scales.get(id(tensor), (None, None, None))
        return None if integers is None else (scale,) + integers

    def _fake_quant8(self, x, lo, hi, nonnegative=False):
        lo, hi = _int8_range(lo, hi)
        y = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8,
                                                         narrow_range=False)
        scale, zero_point = _int8_grid(lo, hi)
        return self._tag(y, scale, (zero_point, zero_point if nonnegative else -128, 127))

    # -- emitting pending values -------------------------------------------
    def emit(self, value, shift=0.0, relu=False, grid=None):
        """Materialize ``value - shift`` (then ReLU, then the int8 ``grid`` range) as a tensor.

        Memoized, so a pending value read by several consumers is emitted once.
        """
        key = (id(value), float(shift), bool(relu), grid)
        if key not in self._emitted:
            self._emitted[key] = (value, self._emit(value, shift, relu, grid))
        return self._emitted[key][1]

    def _emit(self, value, shift, relu, grid):
        if isinstance(value, _Tensor):
            if shift == 0.0 and not relu and grid is None:
                return value
            x = value.tensor
            if shift != 0.0:
                if not value.quantized:
                    raise LoweringError(f"{value.where}: cannot subtract a QIL threshold from a "
                                        "float tensor")
                x = x - np.float32(shift)  # int8 ADD with a constant: requantized exactly
            return self._epilogue(x, relu, grid, value)
        if isinstance(value, _Affine):
            return self._emit_affine(value, shift, relu, grid)
        if isinstance(value, _Relu):
            if value.cap is not None and grid is None:
                inner = self.emit(value.x, shift)
                y = tf.nn.relu6(inner.tensor) if value.cap == 6.0 else tf.minimum(
                    tf.nn.relu(inner.tensor), value.cap)
                return _Tensor(y, False, value.source, value.where)
            return self.emit(value.x, shift, True, grid)
        if isinstance(value, _Add):
            return self._emit_add(value, shift, relu, grid)
        if isinstance(value, _Concat):
            return self._emit_concat(value, shift, relu, grid)
        if isinstance(value, _FakeQuant):
            return self._emit_fake_quant(value, shift, relu, grid)
        raise TypeError(value)

    def _double_rounding(self, plan):
        """Does this layer's op requantize with two roundings in the file?

        XNNPACK (the default delegate) requantizes in fp32 with one rounding, as
        Keras does; it does not take convolutions with INT4 weights, which then
        run on LiteRT's builtin kernels, and the builtin-only resolver runs
        every op there. The builtin CONV_2D, DEPTHWISE_CONV_2D and
        FULLY_CONNECTED round twice, both roundings half up (measured against
        ``qil_keras.integer_reference.IntegerReference``).
        """
        if self.kernels == "builtin":
            return True
        per_tensor_dense = plan.op == "FULLY_CONNECTED" and np.ptp(plan.scale / plan.multiplier) == 0
        return plan.storage == "int4" and not per_tensor_dense

    def _check_xnnpack_scale(self, plan, input_scale, grid, where):
        """XNNPACK refuses a conv whose ``M = s_in·s_w/s_out`` is 256 or more (the whole
        file then fails to load); name the layer instead."""
        if input_scale is None or grid is None or plan.rounding == "double" \
                or self.kernels == "builtin":
            return
        output_scale = _int8_step(grid)
        m = input_scale * plan.scale / plan.multiplier / output_scale
        if np.max(m) >= 256.0:
            raise LoweringError(
                f"{where}: its output's int8 step ({output_scale:.3g}) is {np.max(m):.0f} times "
                "finer than the step of one input×weight product, and XNNPACK (the default "
                "delegate) refuses requantization scales of 256 or more, so the file would not "
                "load. The QIL activation (or 8-bit range) after this layer has collapsed to a "
                "tiny interval: train longer or re-initialize that interval; or export with "
                "kernels='builtin', whose kernels accept it.")

    def _requantization(self, plan, input_scale, grid):
        """Choose ``plan``'s multiplier ``m`` and return the bias offset that makes rounding exact.

        The builtin kernels requantize the int32 accumulator ``x`` with
        ``M = s_in·s_w/s_out = f·2^-r`` (``f`` in [1/2, 1)) as
        ``round(round(x·f) / 2^r)``, both roundings taking halves up (CONV_2D,
        DEPTHWISE_CONV_2D and FULLY_CONNECTED in LiteRT's optimized kernels;
        ``qil_keras.integer_reference.multiply_by_quantized_multiplier_ruy``,
        measured equal to them on every value). For every sign that is exactly
        ``floor(x·M + 1/2 + 2^-(r+1))``: one rounding of a value ``2^-(r+1)``
        output steps higher. So the file equals Keras' ``round(x·M + b)`` when
        the file's bias is ``b - 2^-(r+1)·s_out``; the returned offset (real
        units, per channel) is that difference and
        ``qil_keras.snap_to_integer`` puts the Keras bias on ``b_int·u +
        offset``.
        """
        plan.chosen_multiplier = None
        plan.rounding = "single"
        if input_scale is None or grid is None or not self._double_rounding(plan):
            return np.zeros_like(plan.scale)
        plan.rounding = "double"
        plan.chosen_multiplier = plan.default_multiplier
        return _second_rounding_offset(plan, input_scale, grid)

    def _epilogue(self, x, relu, grid, value):
        scale = self._scale(x)
        if relu:
            x = self._tag(tf.nn.relu(x), scale)
        if grid is not None:
            x = self._fake_quant8(x, *grid, nonnegative=relu)
        quantized = grid is not None or (isinstance(value, _Tensor) and value.quantized)
        return _Tensor(x, quantized, value.source, value.where)

    def _emit_affine(self, value, shift, relu, grid):
        plan, layer = value.plan, value.layer
        x = self._need_int8(value.x, value.where)
        with tf.name_scope(layer.name + "/"):
            kernel = (plan.levels * _broadcast_channels(plan.scale, plan.levels, plan.op))
            kernel = tf.constant(kernel.astype(np.float32))
            input_scale = self._scale(x)
            offset = self._requantization(plan, input_scale, grid)
            other = self._other_kernels_offset(plan, input_scale, grid, offset)
            limit = 7.0 if plan.storage == "int4" else 127.0
            bits = 4 if plan.storage == "int4" else 8
            self._check_xnnpack_scale(plan, input_scale, grid, value.where)
            # The stored scale is s/m and the stored integers k·m (same values): a
            # finer accumulator unit s_in·s/m, so the int32 bias loses m times less.
            scale = (plan.scale / plan.multiplier).astype(np.float32)
            if plan.op == "DEPTHWISE_CONV_2D":
                kh, kw, cin, mult = plan.levels.shape
                flat = tf.reshape(kernel, (kh, kw, cin * mult))
                flat = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    flat, -limit * scale, limit * scale, num_bits=bits, narrow_range=True)
                kernel = tf.reshape(flat, (kh, kw, cin, mult))
            elif plan.op == "FULLY_CONNECTED" and np.ptp(scale) == 0.0:
                kernel = tf.quantization.fake_quant_with_min_max_vars(
                    kernel, -limit * float(scale[0]), limit * float(scale[0]), num_bits=bits,
                    narrow_range=True)
            else:
                if plan.op == "FULLY_CONNECTED":  # per-channel: run as a 1x1 CONV_2D
                    kernel = tf.reshape(kernel, (1, 1) + tuple(plan.levels.shape))
                kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    kernel, -limit * scale, limit * scale, num_bits=bits, narrow_range=True)
            # The file's rounding of this layer equals Keras' rounding of bias + offset
            # (see _requantization): the file gets the bias without the offset.
            bias = value.bias - shift - offset
            unit = bias_int = None
            if input_scale is not None:  # TFLite stores the bias in units of s_in · s_w
                unit = input_scale * plan.scale / plan.multiplier
                bias_int = _round_half_away(bias / unit)
                self.bias_residuals[layer.name] = (
                    bias + offset, bias_int * unit + offset, unit, value.bias_owner)
            bias = tf.constant(bias.astype(np.float32))
            if plan.op == "CONV_2D":
                y = tf.nn.conv2d(x, kernel, strides=layer.strides, padding=layer.padding.upper(),
                                 dilations=layer.dilation_rate)
            elif plan.op == "DEPTHWISE_CONV_2D":
                y = tf.nn.depthwise_conv2d(x, kernel, strides=(1,) + tuple(layer.strides) + (1,),
                                           padding=layer.padding.upper(),
                                           dilations=layer.dilation_rate)
            elif len(kernel.shape) == 4:
                y = tf.reshape(tf.nn.conv2d(tf.reshape(x, (-1, 1, 1, x.shape[-1])), kernel, 1,
                                            "VALID"), (-1, kernel.shape[-1]))
            else:
                y = tf.matmul(x, kernel)
            y = y + bias
            relu = relu or value.relu
            if value.cap is not None and grid is None and value.relu:
                y = tf.nn.relu6(y) if value.cap == 6.0 else tf.minimum(tf.nn.relu(y), value.cap)
                return _Tensor(y, False, value.source, value.where)
            out = self._epilogue(y, relu, grid, _Tensor(None, False, value.source, value.where))
            if bias_int is not None:
                self._record_affine_sum(layer, plan, self._int8_params(x),
                                        self._int8_params(out.tensor), bias_int, unit, value.where,
                                        offset, other)
            return out

    def _other_kernels_offset(self, plan, input_scale, grid, offset):
        """How the kernel set the file is not written for shifts the rounded value, in real
        units per channel: the builtin kernels round ``v + 2^-(r+1)`` where XNNPACK rounds
        ``v`` (see ``_requantization``); XNNPACK rounds ``v − offset`` where the builtin
        kernels round ``v``."""
        if input_scale is None or grid is None:
            return np.zeros_like(plan.scale)
        if plan.rounding == "double":
            return -offset
        return _second_rounding_offset(plan, input_scale, grid)

    def _record_affine_sum(self, layer, plan, inputs, outputs, bias_int, unit, where, offset,
                           other):
        """Note, for the tie guard, the sums a low-bit-input layer can produce (see AffineSum).

        A layer the builtin kernels round twice is a single rounding of ``v + offset`` (see
        ``_requantization``)."""
        if inputs is None or outputs is None:
            return
        _, zero_point, lowest, highest = inputs
        if highest - lowest > _MAX_INPUT_LEVELS:
            return
        multiplier = float(np.max(plan.multiplier))
        if multiplier < 2 or np.ptp(plan.multiplier) != 0:  # m = 1: moving b only relabels n
            return
        channels = plan.scale.shape[0]
        k = plan.levels.reshape(-1, channels)
        a, b = lowest - zero_point, highest - zero_point
        n_min = np.sum(np.minimum(k * a, k * b), axis=0)
        n_max = np.sum(np.maximum(k * a, k * b), axis=0)
        out_scale, out_zero, out_lowest, out_highest = outputs
        self.affine_sums[layer.name] = AffineSum(
            where, n_min.astype(np.int64), n_max.astype(np.int64), multiplier,
            bias_int.astype(np.int64), np.asarray(unit / out_scale, np.float64),
            float(out_lowest - out_zero), float(out_highest - out_zero),
            np.asarray(offset, np.float64) / out_scale, np.asarray(other, np.float64) / out_scale)

    def _emit_add(self, value, shift, relu, grid):
        inputs = list(value.inputs)
        shifted = None
        if shift != 0.0:
            for i, item in enumerate(inputs):
                if (isinstance(item, _FakeQuant) and isinstance(item.x, _Affine)
                        and not item.x.relu and self._single_use(item.source)):
                    shifted = i
                    break
            if shifted is None:
                raise LoweringError(
                    f"{value.where}: the QIL activation after this sum prunes below "
                    f"{shift:.4g} > 0, and neither input comes straight from a conv/dense with "
                    "an 8-bit range whose bias could absorb that threshold.")
        tensors = []
        for i, item in enumerate(inputs):
            if i == shifted:
                tensors.append(self._emit_fake_quant(item, shift, False, None).tensor)
            else:
                tensors.append(self._need_int8(item, f"Add {value.where}"))
        self._add_inputs[id(value)] = [self._int8_params(t) for t in tensors]
        with tf.name_scope((value.where.split("'")[1] if "'" in value.where else "add") + "/"):
            y = tensors[0]
            for t in tensors[1:]:
                y = y + t
        return self._epilogue(y, relu, grid, _Tensor(None, False, value.source, value.where))

    def _emit_concat(self, value, shift, relu, grid):
        """CONCATENATION: TFLite's int8 kernel gives every input the output's scale (the
        converter would otherwise impose it on the producers, losing their QIL grids), so each
        input is first requantized to the output grid, as Keras' FakeQuant8 after the
        Concatenate rounds the concatenated values."""
        if shift != 0.0:
            raise LoweringError(f"{value.where}: cannot subtract a QIL threshold from a "
                                "Concatenate output.")
        xs = [self._need_int8(a, value.where) for a in value.inputs]
        name = value.where.split("'")[1] if "'" in value.where else "concatenate"
        if grid is not None:
            xs = [self._requantized(x, grid, f"{name}_input{i}", value.where)
                  for i, x in enumerate(xs)]
        with tf.name_scope(name + "/"):
            y = tf.concat(xs, axis=value.axis)
        return self._epilogue(y, relu, grid, _Tensor(None, False, value.source, value.where))

    def _requantized(self, x, grid, name, where):
        """``x`` moved to the int8 ``grid``: as is when it is already there, else through a
        1x1 DEPTHWISE_CONV_2D with weights 1 (one rounding, as Keras' FakeQuant8 rounds).
        The converter would drop a second FakeQuant, and an int8 QUANTIZE op rounds twice."""
        params = self._int8_params(x)
        target_scale, target_zero = _int8_grid(*grid)
        if params is not None and np.float32(params[0]) == np.float32(target_scale) \
                and params[1] == target_zero:
            return x
        channels = int(x.shape[-1])
        affine = self._depthwise_affine(name, _Tensor(x, True, None, where),
                                        np.ones((1, 1, channels, 1)), np.ones(channels),
                                        np.zeros(channels), f"{where} (input requantized)")
        return self.emit(affine, 0.0, False, grid).tensor

    def _depthwise_affine(self, name, x, levels, scale, bias, where, strides=(1, 1),
                          padding="valid", bias_owner=None):
        """A DEPTHWISE_CONV_2D the model has no layer for (requantization, a standalone
        BatchNorm, an average pool): 8-bit ``levels`` on the per-channel ``scale``, quantized
        here (``calibrated``), as a pending affine value."""
        plan = WeightPlan(name, "DEPTHWISE_CONV_2D", 8, "int8", levels, scale, True)
        self.weight_plans.append(plan)
        return _Affine(_PointwiseOp(name, tuple(strides), padding), x, plan,
                       np.asarray(bias, np.float64), where=where, bias_owner=bias_owner)

    def _emit_fake_quant(self, value, shift, relu, grid):
        scale, zero_point = _eager(value.layer.quantization_params)
        lo = (-128 - zero_point) * scale
        hi = lo + 255 * scale
        with tf.name_scope(value.layer.name + "/"):
            if shift != 0.0:
                steps = int(_round_half_away(shift / scale))
                if not -128 <= zero_point + steps <= 127:
                    raise LoweringError(
                        f"{value.where}: shifting this int8 range by the next QIL threshold "
                        f"({shift:.4g}) moves its zero point out of int8.")
                shifted = steps * scale
                self.add_thresholds[self._current_activation] = (shift, shifted)
                y = self.emit(value.x, shifted, False, (lo - shifted, hi - shifted)).tensor
            else:  # the grid goes to the producer: a conv needs its output scale
                y = self.emit(value.x, 0.0, False, (lo, hi)).tensor
        if relu or grid is not None:
            return self._epilogue(y, relu, grid, _Tensor(None, True, value.source, value.where))
        return _Tensor(y, True, value.source, value.where)

    # -- walking the Keras graph -------------------------------------------
    def __call__(self, *inputs):
        self.float_tensors, self.weight_plans, self.activations = [], [], []
        self.bias_residuals = {}  # layer -> (bias, representable bias, unit, owner layer)
        self.add_thresholds = {}  # QILActivation name -> (lower threshold, the one exported)
        self._emitted = {}  # every trace starts afresh
        self._scales = {}   # id(tf tensor) -> (tensor, int8 scale, (zero point, lo, hi) or None)
        self.residual_sums = {}  # QILActivation name -> ResidualSum (see the tie guard)
        self.affine_sums = {}    # weight layer name -> AffineSum (see the tie guard)
        self._add_inputs = {}    # id(_Add) -> int8 parameters of its emitted inputs
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
        if isinstance(layer, _QIL_WEIGHT) or role == "weights":
            return self._weight_layer(layer, args[0], where)
        if isinstance(layer, L.BatchNormalization):
            return self._batchnorm(layer, args[0], where)
        if isinstance(layer, QILActivation):
            return self._qil_activation(layer, args[0], where)
        if isinstance(layer, AveragePooling2DInt8):
            return self._average_pool_int8(layer, args[0], where)
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
            return self._simple(layer, args, role, where)
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
        """AVERAGE_POOL_2D on the layer's own int8 grid (input moved onto it first, by a 1x1
        depthwise conv where it is on another grid), output on the same grid: what
        ``qil_keras.layers.AveragePooling2DInt8`` computes."""
        tensor = self._need_int8(x, where)
        scale, zero_point = _eager(layer.quantization_params)
        grid = ((-128 - zero_point) * scale, (127 - zero_point) * scale)
        tensor = self._requantized(tensor, grid, f"{layer.name}_input", where)
        with tf.name_scope(layer.name + "/"):
            y = tf.nn.avg_pool2d(tensor, layer.pool_size, layer.strides, layer.padding.upper())
            y = self._fake_quant8(y, *grid)
        return _Tensor(y, True, None, where)

    def _average_as_depthwise(self, layer, x, where):
        """AveragePooling2D without partial windows as a DEPTHWISE_CONV_2D of weights ``1/n``
        (levels 1 on the scale ``1/n``): the sum is requantized once, from the input's grid
        straight to the output's, as Keras' FakeQuant8 rounds the average. (The int8
        AVERAGE_POOL_2D keeps its input's scale: it would round the average to a low-bit QIL
        step first.)"""
        ph, pw = layer.pool_size
        channels = int(layer.input_shape[-1])
        return self._depthwise_affine(layer.name, x, np.ones((ph, pw, channels, 1)),
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

    def _simple(self, layer, args, role, where):
        consumer = where
        with tf.name_scope(layer.name + "/"):
            if role == "pass":
                t = self.emit(args[0])
                _, scale, integers = self._scales.get(id(t.tensor), (None, None, None))
                y = self._tag(self._pass_op(layer, t.tensor, where), scale, integers)
                return _Tensor(y, t.quantized, None, where)
            if role == "output":
                x = self._need_int8(args[0], consumer)
                return _Tensor(self._tag(tf.nn.softmax(x), 1.0 / 256.0), True, None, where)
            if role == "average":
                if isinstance(layer, L.AveragePooling2D) and whole_windows(layer):
                    return self._average_as_depthwise(layer, args[0], where)
                x = self._need_int8(args[0], consumer)
                if isinstance(layer, L.GlobalAveragePooling2D):
                    y = tf.reduce_mean(x, axis=(1, 2), keepdims=bool(layer.keepdims))
                else:
                    y = tf.nn.avg_pool2d(x, layer.pool_size, layer.strides,
                                         layer.padding.upper())
                return _Tensor(y, False, None, where)
            return _Concat(list(args), layer.axis, where=where)  # merge (Concatenate)

    @staticmethod
    def _pass_op(layer, x, where):
        if isinstance(layer, (L.Dropout, L.SpatialDropout2D)) or (
                isinstance(layer, L.Activation) and _activation_name(layer.activation) == "linear"):
            return tf.identity(x)
        if isinstance(layer, L.MaxPooling2D):
            return tf.nn.max_pool2d(x, layer.pool_size, layer.strides, layer.padding.upper())
        if isinstance(layer, L.GlobalMaxPooling2D):
            return tf.reduce_max(x, axis=(1, 2), keepdims=bool(layer.keepdims))
        if isinstance(layer, (L.Flatten, L.Reshape)):
            shape = layer.output_shape[1:]
            return tf.reshape(x, (-1,) + tuple(shape))
        if isinstance(layer, L.ZeroPadding2D):
            (top, bottom), (left, right) = layer.padding
            return tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
        if isinstance(layer, L.Cropping2D):
            (top, bottom), (left, right) = layer.cropping
            h, w = x.shape[1], x.shape[2]
            return x[:, top:h - bottom, left:w - right, :]
        raise LoweringError(f"{where}: no integer lowering for {type(layer).__name__}.")


@dataclasses.dataclass
class _PointwiseOp:
    """The geometry of a depthwise conv the model has no layer for (see ``_depthwise_affine``)."""

    name: str
    strides: tuple = (1, 1)
    padding: str = "valid"
    dilation_rate: tuple = (1, 1)


def _second_rounding_offset(plan, input_scale, grid):
    """``2^-(r+1)`` output steps (real units, per channel) with ``M = f·2^-r`` the multiplier
    the converter derives from the float32 scales: what the builtin kernels' second rounding
    adds (none when ``M ≥ 1/2``); see ``_Lowering._requantization``."""
    output_scale = np.float64(np.float32(_int8_step(grid)))
    m1 = (np.float64(np.float32(input_scale)) * plan.scale.astype(np.float32).astype(np.float64)
          / output_scale)
    _, exponent = np.frexp(m1 / plan.multiplier)
    r = -exponent
    return np.where(r > 0, 2.0 ** (-(r + 1.0)), 0.0) * output_scale


def _broadcast_channels(per_channel, levels, op):
    """Per-output-channel vector -> shape broadcasting against the kernel ``levels``."""
    per_channel = np.asarray(per_channel)
    if op == "DEPTHWISE_CONV_2D":
        return per_channel.reshape(levels.shape[-2:])
    return per_channel.reshape((1,) * (levels.ndim - 1) + (-1,))


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
    signature = [tf.TensorSpec((None,) + tuple(spec.shape[1:]), tf.float32,
                               name=layer.name)
                 for spec, layer in zip(model.inputs, model._input_layers)]
    module = tf.Module()  # the converter's trackable_obj
    function = lowering
    if len(model.outputs) == 1:  # the signature's output key: the Keras output name
        output_name = signature_output_name(model)

        def function(*inputs):
            return {output_name: lowering(*inputs)}
    module.inference = tf.function(function, input_signature=signature, autograph=False)
    concrete = module.inference.get_concrete_function()
    return concrete, module, lowering
