"""``qil_keras.integer.emission``: how the lowering's values become TF ops the converter makes integer.

The lowering (``qil_keras.integer.lowering``) walks the Keras graph and turns
each layer into a *value*: an emitted tensor (``_Tensor``) or a pending op
(``_Affine`` conv/dense with BatchNorm folded in, ``_Relu``, ``_Add``,
``_Concat``, ``_FakeQuant``) that is only written out when a consumer asks,
so that a later QIL activation can still move its lower threshold into a
bias or a zero point. This module owns that second half:

- ``_Emitter.emit(value, shift, relu, grid)``: write ``value - shift`` (then
  ReLU, then the int8 range ``grid``) as TF ops, memoized per trace;
- the requantization of each conv/dense: which multiplier the file stores,
  which rounding its kernels apply (``_requantization``: XNNPACK rounds once,
  LiteRT's builtin kernels twice), and the bias offset that makes the file's
  rounding equal Keras';
- the records the export checks afterwards: ``bias_residuals`` (what
  ``qil_keras.snap_to_integer`` moves), ``affine_sums`` and
  ``residual_sums`` (the rounding-tie guard, ``qil_keras.integer.ties``);
- the 1x1 depthwise convs the model has no layer for (a requantization, a
  standalone BatchNorm, an average pool).

It imports only the quantization layers' parameters and the integer
reference's rounding; it knows nothing of Keras layer types.
"""

import dataclasses

import numpy as np

from .._keras import tf
from .integer_reference import round_half_away as _round_half_away
from . import ties


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
    """A conv/dense requantized once (XNNPACK's fp32 path), as the tie guard sees it.

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
    # Channels with too many sums to enumerate (8-bit inputs into an 8-bit output; a bool or
    # one per channel): the guard examines them only where the multiplier is a fraction p/q,
    # one sum per phase (ties.bias_offsets).
    dense: np.ndarray | bool = False


# The tie guard enumerates, per output channel, the sums whose output is not clamped (see
# qil_keras.integer.ties.bias_offsets). A layer that would need more than this many in all
# (wide layers reach millions) is left unguarded, unless its weights take the rational γ move
# (2 to 4 bits): then its channels with more than ties.DENSE_WINDOW sums are guarded by phases
# and the others enumerated, if those are at most this many.
_MAX_GUARDED_SUMS = 2 ** 21


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


class _Emitter:
    """Writes the lowering's values as TF ops (see the module docstring).

    The lowering subclass provides ``_single_use(keras_tensor)`` (does one consumer read it?)
    and ``float_ranges`` / ``collect_float`` (calibrated ranges of float leftovers), and calls
    ``_start_trace()`` before each trace.
    """

    def _start_trace(self):
        self.float_tensors, self.weight_plans = [], []
        self.bias_residuals = {}  # layer -> (bias, representable bias, unit, owner layer)
        self.add_thresholds = {}  # QILActivation name -> (lower threshold, the one exported)
        self._emitted = {}  # (id(value), shift, relu, grid) -> (value, _Tensor)
        self._scales = {}   # id(tf tensor) -> (tensor, int8 scale, (zero point, lo, hi) or None)
        self.residual_sums = {}  # QILActivation name -> ResidualSum (see the tie guard)
        self.affine_sums = {}    # weight layer name -> AffineSum (see the tie guard)
        self._add_inputs = {}    # id(_Add) -> int8 parameters of its emitted inputs
        self._current_activation = None  # the QILActivation whose threshold is being placed

    # -- int8 tensors --------------------------------------------------
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
        return self.kernels == "builtin" or self._builtin_everywhere(plan)

    @staticmethod
    def _builtin_everywhere(plan):
        """Does this op run on the builtin kernels under every configuration? XNNPACK does not
        take convolutions with INT4 weights (nor per-channel INT4 dense layers): there is no
        other kernel set to agree with."""
        per_tensor_dense = plan.op == "FULLY_CONNECTED" and np.ptp(plan.scale / plan.multiplier) == 0
        return plan.storage == "int4" and not per_tensor_dense

    @staticmethod
    def _free_pruned_channels(plan, input_scale, grid):
        """An output channel whose integer weights are all zero (QIL pruned it whole) computes its
        bias alone, whatever its weight scale: give it the scale whose requantization multiplier
        ``M = s_in·s_w/s_out`` is 1, so its int32 bias counts output steps. Its folded scale
        (weight step × BatchNorm ``γ/σ``, with ``σ`` near 0 for a channel that only ever outputs
        a constant) can otherwise put ``M`` far above XNNPACK's limit of 256 (a development run:
        a fully pruned layer of a 2/2 ResNet-20, see the superseded rows of
        ``bench/results/cifar_study.json``)."""
        if input_scale is None or grid is None:
            return
        # output channels are the last axis (depthwise: the last two, flattened in this order)
        pruned = ~np.any(plan.levels.reshape(-1, plan.scale.shape[0]) != 0, axis=0)
        if np.any(pruned):
            free = _int8_step(grid) * plan.multiplier / input_scale
            plan.scale = np.where(pruned, free, plan.scale).astype(plan.scale.dtype)

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
        if grid is not None and not relu and self._int8_params(x) is not None:
            # already int8 (a pass op's output): the converter would drop a second FakeQuant
            name = f"{_layer_name(value.where, 'tensor')}_requantized"
            x = self._requantized(x, grid, name, value.where)
        elif grid is not None:
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
            self._free_pruned_channels(plan, input_scale, grid)
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
            if getattr(layer, "flatten", False):
                _, scale, integers = self._scales.get(id(out.tensor), (None, None, None))
                flat = tf.reshape(out.tensor, (-1, int(out.tensor.shape[-1])))
                out = dataclasses.replace(out, tensor=self._tag(flat, scale, integers))
            return out

    def _other_kernels_offset(self, plan, input_scale, grid, offset):
        """How the kernel set the file is not written for shifts the rounded value, in real
        units per channel: the builtin kernels round ``v + 2^-(r+1)`` where XNNPACK rounds
        ``v`` (see ``_requantization``); XNNPACK rounds ``v − offset`` where the builtin
        kernels round ``v``."""
        if input_scale is None or grid is None or self._builtin_everywhere(plan):
            return np.zeros_like(plan.scale)
        if plan.rounding == "double":
            return -offset
        return _second_rounding_offset(plan, input_scale, grid)

    def _record_affine_sum(self, layer, plan, inputs, outputs, bias_int, unit, where, offset,
                           other):
        """Note, for the tie guard, the sums a conv/dense can produce (see AffineSum).

        Only layers whose weights are stored with a multiplier ``m ≥ 2`` (low-bit weights):
        a bias move then shifts the sums by a fraction ``1/m`` of an input×weight step, which
        can move them off a rounding tie; with ``m = 1`` and inputs that reach every integer
        it only relabels them. A layer the builtin kernels round twice is a single rounding
        of ``v + offset`` (see ``_requantization``)."""
        if inputs is None or outputs is None:
            return
        _, zero_point, lowest, highest = inputs
        multiplier = float(np.max(plan.multiplier))
        if multiplier < 2 or np.ptp(plan.multiplier) != 0:
            return
        channels = plan.scale.shape[0]
        k = plan.levels.reshape(-1, channels)
        a, b = lowest - zero_point, highest - zero_point  # a ≤ b: the extreme input levels
        # Σ min(k·a, k·b) over a channel's weights: a·Σk⁺ + b·Σk⁻ (and the reverse for max).
        positive = np.sum(np.maximum(k, 0), axis=0)
        negative = np.sum(np.minimum(k, 0), axis=0)
        n_min = a * positive + b * negative
        n_max = b * positive + a * negative
        out_scale, out_zero, out_lowest, out_highest = outputs
        affine = AffineSum(
            where, n_min.astype(np.int64), n_max.astype(np.int64), multiplier,
            bias_int.astype(np.int64), np.asarray(unit / out_scale, np.float64),
            float(out_lowest - out_zero), float(out_highest - out_zero),
            np.asarray(offset, np.float64) / out_scale, np.asarray(other, np.float64) / out_scale)
        windows = ties.sum_windows(affine)
        if np.sum(windows) <= _MAX_GUARDED_SUMS:
            self.affine_sums[layer.name] = affine
        elif multiplier >= ties.MIN_SCALE_MULTIPLIER:  # the rational γ move can serve it
            affine.dense = windows > ties.DENSE_WINDOW
            if np.sum(windows[~affine.dense]) <= _MAX_GUARDED_SUMS:
                self.affine_sums[layer.name] = affine

    def _emit_add(self, value, shift, relu, grid):
        inputs = list(value.inputs)
        if len(inputs) > 2:
            raise LoweringError(
                f"{value.where}: an Add of {len(inputs)} inputs. TFLite's int8 ADD takes two, "
                "and the converter computes a longer sum in float (DEQUANTIZE, float ADD, "
                "QUANTIZE), so the file would not be fully integer. Nest two-input Adds "
                "(keras.layers.Add()([keras.layers.Add()([a, b]), c])) in the float model and "
                "quantize it again: each partial sum then gets its own 8-bit range.")
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
        with tf.name_scope(_layer_name(value.where, "add") + "/"):
            y = tensors[0]
            for t in tensors[1:]:
                y = y + t
        return self._epilogue(y, relu, grid, _Tensor(None, False, value.source, value.where))

    def _emit_concat(self, value, shift, relu, grid):
        """CONCATENATION: TFLite's int8 kernel gives every input the output's scale (the
        converter would otherwise impose it on the producers, losing their QIL grids), so each
        input is first requantized to the output grid, as Keras' FakeQuant8 after the
        Concatenate rounds the concatenated values.

        A Concatenate of ReLU outputs followed by one QIL activation (``relu`` with a
        ``grid``: ``quantize``'s shared interval) needs none of that: each input is emitted
        with the threshold ``shift`` and the shared ``grid``, so every producer writes the
        output grid itself (a conv's bias takes the threshold) and the kernel copies integers.
        """
        if relu and grid is not None and all(_relu_output(a) for a in value.inputs):
            xs = [self.emit(a, shift, True, grid).tensor for a in value.inputs]
            with tf.name_scope(_layer_name(value.where, "concatenate") + "/"):
                y = self._fake_quant8(tf.concat(xs, axis=value.axis), *grid, nonnegative=True)
            return _Tensor(y, True, value.source, value.where)
        if shift != 0.0:
            raise LoweringError(f"{value.where}: cannot subtract a QIL threshold from a "
                                "Concatenate output.")
        name = _layer_name(value.where, "concatenate")
        xs = []
        for i, a in enumerate(value.inputs):
            if grid is not None and isinstance(a, _Affine) and not a.relu \
                    and self._single_use(a.source):
                # a linear conv read only here (quantize gave it no quantizer): it writes the
                # output grid itself, one rounding, as the FakeQuant8 after the Concatenate
                xs.append(self.emit(a, 0.0, False, grid).tensor)
                continue
            x = self._need_int8(a, value.where)
            xs.append(x if grid is None else
                      self._requantized(x, grid, f"{name}_input{i}", value.where))
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
        flat = x.shape.rank == 2   # (batch, channels): requantized as (batch, 1, 1, channels)
        if flat:
            x = self._tag(tf.reshape(x, (-1, 1, 1, channels)), params[0], params[1:])
        affine = self._depthwise_affine(name, _Tensor(x, True, None, where),
                                        np.ones((1, 1, channels, 1)), np.ones(channels),
                                        np.zeros(channels), f"{where} (input requantized)")
        y = self.emit(affine, 0.0, False, grid).tensor
        if flat:
            y = self._tag(tf.reshape(y, (-1, channels)), *self._scales[id(y)][1:])
        return y

    def _depthwise_affine(self, name, x, levels, scale, bias, where, strides=(1, 1),
                          padding="valid", bias_owner=None, flatten=False):
        """A DEPTHWISE_CONV_2D the model has no layer for (requantization, a standalone
        BatchNorm, an average pool): 8-bit ``levels`` on the per-channel ``scale``, quantized
        here (``calibrated``), as a pending affine value; ``flatten``: its ``(batch, 1, 1,
        channels)`` output is reshaped to ``(batch, channels)`` (a global pooling)."""
        plan = WeightPlan(name, "DEPTHWISE_CONV_2D", 8, "int8", levels, scale, True)
        self.weight_plans.append(plan)
        return _Affine(_PointwiseOp(name, tuple(strides), padding, flatten=flatten), x, plan,
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


def _relu_output(value):
    """Whether a pending value ends in a ReLU (a conv/dense with its ReLU fused, or a ReLU)."""
    return isinstance(value, _Affine) and value.relu or isinstance(value, _Relu)


def _layer_name(where, default):
    """The layer name quoted in a ``where`` text (``"Conv2D 'conv1'"`` -> ``conv1``)."""
    return where.split("'")[1] if "'" in where else default


@dataclasses.dataclass
class _PointwiseOp:
    """The geometry of a depthwise conv the model has no layer for (see ``_depthwise_affine``)."""

    name: str
    strides: tuple = (1, 1)
    padding: str = "valid"
    dilation_rate: tuple = (1, 1)
    flatten: bool = False   # reshape the (batch, 1, 1, channels) output to (batch, channels)


def _second_rounding_offset(plan, input_scale, grid):
    """``2^-(r+1)`` output steps (real units, per channel) with ``M = f·2^-r`` the multiplier
    the converter derives from the float32 scales: what the builtin kernels' second rounding
    adds (none when ``M ≥ 1/2``); see ``_Emitter._requantization``."""
    output_scale = np.float64(np.float32(_int8_step(grid)))
    m1 = (np.float64(np.float32(input_scale)) * plan.scale.astype(np.float32).astype(np.float64)
          / output_scale)
    return ties.second_rounding_offset(m1 / plan.multiplier) * output_scale


def _broadcast_channels(per_channel, levels, op):
    """Per-output-channel vector -> shape broadcasting against the kernel ``levels``."""
    per_channel = np.asarray(per_channel)
    if op == "DEPTHWISE_CONV_2D":
        return per_channel.reshape(levels.shape[-2:])
    return per_channel.reshape((1,) * (levels.ndim - 1) + (-1,))
