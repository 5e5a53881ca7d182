"""``qil_keras.integer_reference``: LiteRT's int8 kernels, builtin and XNNPACK, in numpy.

``IntegerReference`` reads a ``.tflite`` file through the LiteRT schema
and runs its ops with the arithmetic of LiteRT's builtin int8 kernels
(``tensorflow/lite/kernels/internal/reference/integer_ops`` and the
``Prepare`` functions that derive their multipliers), on every tensor:

- requantization ``MultiplyByQuantizedMultiplier(acc, M0, shift)``: the real
  multiplier ``m`` (computed in double from the float32 scales) becomes
  ``M0 · 2^(shift − 31)`` with a 31-bit ``M0`` (``QuantizeMultiplier``), and
  ``acc · m`` is rounded twice (gemmlowp's fixed point, in the reference kernels and in
  the builtin MUL, ADD, LEAKY_RELU):
  ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc · 2^left, M0), right)``,
  the high multiply rounding ties up, the shift rounding ties away from zero;
- CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED:
  ``acc = Σ w · (x − z_x) + b`` in int32, requantized per output channel with
  ``m_c = s_x · s_w,c / s_y``, plus ``z_y``, clamped to the fused activation's range;
- ADD: both inputs are shifted left by 20 bits, scaled by
  ``s_i / (2 · max(s_1, s_2))``, summed and scaled by
  ``2 · max(s_1, s_2) / (2^20 · s_y)``, each a separate rounding;
- MUL: ``(x_1 − z_1)(x_2 − z_2)`` requantized with ``s_1 s_2 / s_y``;
- MEAN: the float32 formula of ``QuantizedMeanOrSum`` (or integer division
  when input and output share scale and zero point);
- pooling, PAD, RESHAPE, CONCATENATION and QUANTIZE/DEQUANTIZE as in the
  reference kernels.

The builtin kernels differ from the reference kernels in how they requantize
weight ops: the optimized CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED
round twice with halves up (``multiply_by_quantized_multiplier_ruy``:
``floor(acc·m + 1/2 + 2^-(r+1))`` for every sign), the reference
FULLY_CONNECTED once (``IntegerReference.SINGLE_ROUNDING_OPS``).
LOGISTIC and TANH are tables computed in float32 (``LUTPopulate``), LEAKY_RELU
requantizes each sign with its own multiplier, and the float ADD/SUB/MUL/DIV
of preprocessing in front of the QUANTIZE op run in float32. The optimized
float32 QUANTIZE multiplies by ``1/s`` in float32 and rounds halves to even, as
XNNPACK does, where the reference kernel divides by ``s`` and rounds halves away
from zero (on x86-64, inputs at exact rounding ties come out apart from the division:
``test_quantize_op_rounding_ties_under_each_kernel_set``).
On x86-64 the optimized kernels also run their NEON paths (through NEON_2_SSE) on whole
vectors of the flat tensor and their scalar code on the rest: ADD of two same-shape inputs
rescales each input with one rounding on 16-value vectors and two on the tail (and wraps
sums beyond ±32,767 output steps), DEQUANTIZE computes ``q·s + (−z·s)`` in float32 on
8-value vectors and ``s·(q − z)`` in double on the tail, and DEPTHWISE_CONV_2D requantizes
output channels in groups of 8 with halves up and the last ``channels mod 8`` with gemmlowp's
halves away from zero (``test_int8_add_equals_the_optimized_kernel_on_every_pair_of_inputs``,
``test_dequantize_of_any_size_equals_the_optimized_kernel``,
``test_depthwise_requantization_of_any_channel_count_equals_the_optimized_kernel``).

``kernels="xnnpack"`` computes the ops LiteRT's default XNNPACK delegate runs with
XNNPACK's arithmetic (read from its sources: ``src/operators``, ``src/microparams-init.c``
and the ``fp32`` microkernels): CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED requantize
the int32 sum once in float32 (``s_in·s_w/s_out`` in float32, halves to even); ADD uses
21-bit integer multipliers and one shift (halves up); MUL requantizes in float32;
LEAKY_RELU uses 8.8 fixed-point multipliers; MEAN converts the int32 sum in float32;
QUANTIZE multiplies by ``1/s`` in float32 and rounds halves to even. Convolutions with
INT4 weights (which XNNPACK does not take) keep the builtin arithmetic.

Measured status (``tests/integer/test_integer_reference.py``,
``tests/integer/test_layer_coverage.py``): it equals LiteRT's reference kernels
(``kernels="reference"`` against ``OpResolverType.BUILTIN_REF``) and its
optimized builtin kernels (``kernels="builtin"`` against
``BUILTIN_WITHOUT_DEFAULT_DELEGATES``) on every tensor of exported QIL files
(INT8 and INT4 storage; the layer-coverage models with LOGISTIC, MUL,
LEAKY_RELU, CONCATENATION and float preprocessing) and of a post-training
file with PAD, pooling, CONCATENATION, MUL and RESHAPE; with
``kernels="xnnpack"`` it equals the default XNNPACK delegate on every output of the
same files (the delegate keeps no intermediate tensors;
``compare_outputs_with_xnnpack``), on x86-64 with ai-edge-litert 2.3.0. Ops it does not
implement raise ``UnsupportedOpError``, never a guess.
``kernel_differences`` computes every op with both arithmetics from the same inputs and
lists the ops where the two kernel sets give different values: where a file is
kernel-dependent, and by how much.
``compare_with_interpreter`` runs the file in LiteRT's builtin kernels
with every intermediate tensor preserved and compares each one with the
reference; the first op whose output differs is named with the number of
values that differ and by how many levels.

Reference: Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (§2.2, appendix B).
"""

import dataclasses
import math

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from .tflite_inspect import unpack_int4

__all__ = ["IntegerReference", "ReferenceMismatchError", "UnsupportedOpError",
           "TensorComparison", "compare_with_interpreter", "compare_outputs_with_xnnpack",
           "kernel_differences", "quantize_multiplier", "multiply_by_quantized_multiplier"]

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPES = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.INT8: np.int8,
          schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64,
          schema.TensorType.UINT8: np.uint8, schema.TensorType.INT4: np.int8,
          schema.TensorType.INT16: np.int16}
_ACT = schema.ActivationFunctionType
_INT8_MIN, _INT8_MAX = -128, 127


class UnsupportedOpError(NotImplementedError):
    """The file has an op (or an op variant) the integer reference does not compute."""


class ReferenceMismatchError(AssertionError):
    """The file's kernels and the integer reference disagree on a tensor."""


# ----------------------------------------------------------------------------------------------
# Fixed-point arithmetic (tensorflow/lite/kernels/internal/common.h, quantization_util.cc)


def round_half_away(x):
    """``std::round`` on numpy values: halves go away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_multiplier(real_multiplier):
    """``QuantizeMultiplier``: ``m ≈ M0 · 2^(shift − 31)`` with ``M0`` in ``[2^30, 2^31)``.

    Returns ``(M0, shift)`` as Python ints; ``(0, 0)`` for ``m = 0`` or ``m < 2^-31``.
    """
    real_multiplier = float(real_multiplier)
    if real_multiplier == 0.0:
        return 0, 0
    mantissa, shift = math.frexp(real_multiplier)
    q = int(round_half_away(mantissa * (1 << 31)))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q, shift


def _vqrdmulh(x, multiplier):
    """NEON ``vqrdmulhq_s32`` (``(2·x·M0 + 2^31) >> 32``; equal to gemmlowp's
    ``SaturatingRoundingDoublingHighMul`` short of saturation)."""
    return (2 * x * np.int64(multiplier) + (np.int64(1) << 31)) >> 32


def _wrap_int16(x):
    """NEON ``vmovn``/``vaddq_s16``: keep the low 16 bits, as a signed value."""
    return ((x + 32768) & 0xFFFF) - 32768


def _optimized_add(q1, q2, m1, m2, mo, zero_point, low, high):
    """The builtin int8 ADD of two same-shape inputs (``optimized_integer_ops::AddElementwise``,
    offsets ``q_i − z_i`` given), over the flat tensor: 16 values at a time as its NEON path
    computes them (also on x86, through NEON_2_SSE), the last ``size mod 16`` as
    ``reference_integer_ops::Add``.

    The vector path shifts each input by ``20 + shift_i`` before ``vqrdmulh`` (one rounding)
    where the scalar path multiplies ``x·2^20`` and then divides by ``2^-shift_i`` (two
    roundings), so the rescaled inputs can differ by one unit of ``2^-20`` input steps (an
    output level apart where the sum lies that close to a rounding boundary: a ResNet50V2
    residual ADD in a development run; ``test_int8_add_equals_the_optimized_kernel_on_every_pair_of_inputs``
    checks every pair of inputs); and it narrows to int16 without saturation,
    so sums beyond ±32,767 output steps wrap (measured exactly: an input scale 363 times the
    output's).
    """
    flat1, flat2 = q1.reshape(-1), q2.reshape(-1)
    head = flat1.size - flat1.size % 16
    out = np.empty(flat1.size, np.int64)

    def rescaled(x, multiplier):
        shift = 20 + multiplier[1]
        x = x << shift if shift >= 0 else x >> -shift
        return _vqrdmulh(x, multiplier[0])

    total = rescaled(flat1[:head], m1) + rescaled(flat2[:head], m2)
    vector = _rounding_divide_by_pot(_vqrdmulh(total, mo[0]), max(-mo[1], 0))
    out[:head] = np.clip(_wrap_int16(_wrap_int16(vector) + zero_point), -128, 127)
    out[head:] = _reference_add(flat1[head:], flat2[head:], m1, m2, mo, zero_point)
    return np.clip(out, low, high).astype(np.int8).reshape(q1.shape)


def _reference_add(q1, q2, m1, m2, mo, zero_point):
    """``reference_integer_ops::Add`` before clamping (offsets ``q_i − z_i`` given): each input
    times ``2^20`` rescaled with two roundings, the sum rescaled to the output grid."""
    total = (multiply_by_quantized_multiplier(q1 << 20, *m1)
             + multiply_by_quantized_multiplier(q2 << 20, *m2))
    return multiply_by_quantized_multiplier(total, *mo) + zero_point


def _rounding_divide_by_pot(x, exponent):
    """gemmlowp: ``x / 2^exponent`` rounded half away from zero."""
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """``MultiplyByQuantizedMultiplier`` (double rounding) on int64 arrays.

    ``SaturatingRoundingDoublingHighMul``: ``(x·2^left·M0 + nudge) / 2^31`` with
    C++ division (towards zero) and ``nudge = 2^30`` (``1 − 2^30`` for a negative
    product), so ties round up; then ``RoundingDivideByPOT`` by ``2^right``, ties
    away from zero. ``multiplier`` and ``shift`` are scalars or arrays
    broadcasting against ``x`` (per output channel on the last axis).
    """
    x = np.asarray(x, np.int64)
    multiplier = np.asarray(multiplier, np.int64)
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    ab = x * (np.int64(1) << left) * multiplier
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    total = ab + nudge
    quotient = np.abs(total) // (1 << 31)
    high = np.where(total < 0, -quotient, quotient)
    return _rounding_divide_by_pot(high, right)


def multiply_by_quantized_multiplier_ruy(x, multiplier, shift):
    """The optimized builtin CONV_2D and FULLY_CONNECTED (ruy's x86 kernels): two roundings,
    both with halves going up (towards +inf).

    ``t = (x · 2^left · M0 + 2^30) >> 31`` then ``(t + 2^(right − 1)) >> right``, arithmetic
    shifts. For every sign this is ``floor(x·m + 1/2 + ε)`` with ``0 ≤ ε ≲ 2^-(right+1)``:
    one rounding of a value shifted up by a constant, unlike gemmlowp's sign-symmetric
    double rounding (``multiply_by_quantized_multiplier``). Equal to the kernel on every
    value of the convolutions in ``tests/integer/test_integer_reference.py``; a value at
    −15.50013 levels comes out −15 (``test_fixed_point_rounding_golden_values``).
    """
    x = np.asarray(x, np.int64)
    multiplier = np.asarray(multiplier, np.int64)
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    high = (x * (np.int64(1) << left) * multiplier + np.int64(1 << 30)) >> 31
    rounding = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), 0)
    return (high + rounding) >> right


def _depthwise_output_stage(acc, multiplier, shift):
    """The optimized builtin DEPTHWISE_CONV_2D's requantization, per output channel (last axis):
    channels in whole groups of 8 on its vector path (``multiply_by_quantized_multiplier_ruy``,
    halves up), the last ``channels mod 8`` on its scalar path (gemmlowp's
    ``MultiplyByQuantizedMultiplier``, halves away from zero); a 12-channel requantizing
    depthwise conv, whose last 4 channels take the scalar path, is checked against the kernel
    (``test_depthwise_requantization_of_any_channel_count_equals_the_optimized_kernel``)."""
    acc = np.asarray(acc, np.int64)
    channels = acc.shape[-1]
    multiplier = np.broadcast_to(np.asarray(multiplier, np.int64), (channels,))
    shift = np.broadcast_to(np.asarray(shift, np.int64), (channels,))
    out = multiply_by_quantized_multiplier_ruy(acc, multiplier, shift)
    tail = channels - channels % 8
    if tail < channels:
        out[..., tail:] = multiply_by_quantized_multiplier(acc[..., tail:], multiplier[tail:],
                                                           shift[tail:])
    return out


def multiply_by_quantized_multiplier_single(x, multiplier, shift):
    """ruy's ``MultiplyByQuantizedMultiplier``: one rounding, halves go up.

    ``(x · M0 + 2^(30 − shift)) >> (31 − shift)``; the optimized builtin
    CONV_2D and FULLY_CONNECTED kernels requantize through ruy this way.
    """
    x = np.asarray(x, np.int64)
    total_shift = 31 - np.asarray(shift, np.int64)
    rounding = np.int64(1) << (total_shift - 1)
    return (x * np.asarray(multiplier, np.int64) + rounding) >> total_shift


def _xnnpack_requantize(acc, in_scale, w_scales, out_scale, out_zero, out_range):
    """XNNPACK's ``fp32`` requantization of a conv/dense accumulator: the int32 sum converted
    to float32, times ``s_in · s_w / s_out`` computed in float32 (per channel), clamped, then
    rounded half to even (``cvtps2dq`` / the magic-bias add), plus the output zero point
    (``src/operators/convolution-nhwc.c``, ``fully-connected-nc.c``; the qs8-qc8w-gemm
    ``fp32`` microkernels)."""
    f32 = np.float32
    scale = np.array([f32(f32(in_scale) * f32(s)) / f32(out_scale) for s in w_scales],
                     np.float32)
    return _xnnpack_fp32_output(acc.astype(np.float32) * scale, out_zero, out_range)


def _xnnpack_fp32_output(value, out_zero, out_range):
    """The last step of XNNPACK's ``fp32`` requantization (conv, dense, MUL): the float32
    value in output levels clamped to the output range less the zero point, rounded half to
    even, plus the zero point."""
    low, high = out_range
    value = np.clip(value, np.float32(low - out_zero), np.float32(high - out_zero))
    return (np.rint(value).astype(np.int64) + out_zero).astype(np.int8)


def _xnnpack_add(a, b, a_params, b_params, out_params):
    """XNNPACK's int8 ADD (``xnn_init_qs8_add_minmax_scalar_params``): ``s_i/s_out`` in float32
    become integer multipliers ``lrintf(s_i/s_out · 2^shift)`` with ``shift = 20 − e``
    (``e`` the exponent of the larger ratio), one sum in int32 and one arithmetic shift
    with halves going up."""
    f32 = np.float32
    (sa, za), (sb, zb), (so, zo) = a_params, b_params, out_params
    ra, rb = f32(f32(sa) / f32(so)), f32(f32(sb) / f32(so))
    exponent = int(np.frexp(max(abs(ra), abs(rb)))[1]) - 1
    shift = 20 - exponent
    if not 12 <= shift <= 30:
        raise UnsupportedOpError(f"ADD with input/output scale ratio {max(ra, rb):.3g} "
                                 "(outside XNNPACK's range)")
    ma = int(np.rint(np.ldexp(np.float64(ra), shift)))   # exact in float64, then half-even
    mb = int(np.rint(np.ldexp(np.float64(rb), shift)))
    bias = (1 << (shift - 1)) - ma * za - mb * zb
    acc = bias + a.astype(np.int64) * ma + b.astype(np.int64) * mb
    return (acc >> shift) + zo


def _activation_range(activation, scale, zero_point):
    """``CalculateActivationRangeQuantized`` for int8 outputs."""
    quantize = lambda f: zero_point + int(round_half_away(np.float32(f) / np.float32(scale)))
    if activation == _ACT.NONE:
        return _INT8_MIN, _INT8_MAX
    if activation == _ACT.RELU:
        return max(_INT8_MIN, quantize(0.0)), _INT8_MAX
    if activation == _ACT.RELU6:
        return max(_INT8_MIN, quantize(0.0)), min(_INT8_MAX, quantize(6.0))
    if activation == _ACT.RELU_N1_TO_1:
        return max(_INT8_MIN, quantize(-1.0)), min(_INT8_MAX, quantize(1.0))
    raise UnsupportedOpError(f"fused activation {activation} on an int8 op")


def _padding(padding, in_size, filter_size, stride, dilation):
    """TFLite's output size and leading padding for one spatial axis."""
    effective = (filter_size - 1) * dilation + 1
    if padding == schema.Padding.SAME:
        out = (in_size + stride - 1) // stride
    else:
        out = (in_size + stride - effective) // stride
    total = (out - 1) * stride + effective - in_size
    return out, max(total // 2, 0)


# ----------------------------------------------------------------------------------------------
# The file


@dataclasses.dataclass
class _Tensor:
    index: int
    name: str
    dtype: type
    shape: tuple
    scale: np.ndarray
    zero_point: np.ndarray
    data: np.ndarray | None   # constants only


@dataclasses.dataclass
class TensorComparison:
    """Outcome of ``compare_with_interpreter``."""

    tensors_compared: int
    mismatches: list   # [(op index, op name, tensor name, values differing, total, max levels)]

    @property
    def exact(self):
        return not self.mismatches

    @property
    def first(self):
        return self.mismatches[0] if self.mismatches else None

    def message(self):
        if self.exact:
            return f"all {self.tensors_compared} tensors equal the integer reference"
        op_index, op, name, count, total, levels = self.first
        return (f"op {op_index} ({op}, output {name or '<unnamed>'}) is the first to differ from "
                f"the integer reference: {count} of {total} values, by up to {levels} levels; "
                f"{len(self.mismatches)} op outputs differ in all")


class IntegerReference:
    """The integer arithmetic of a fully integer ``.tflite`` file, in numpy.

    ``IntegerReference(model_bytes).run(x)`` returns the file's outputs for
    float inputs ``x`` (or int8 inputs for an int8-input file), as the builtin
    kernels compute them; ``run(x, all_tensors=True)`` returns every tensor
    by index. ``num_threads``: the builtin kernels' thread count (one op depends on it: the
    keep_dims MEAN over height and width, ``_optimized_spatial_mean``).
    """

    #: Ops that do not requantize with gemmlowp's sign-symmetric two roundings: the
    #: reference FULLY_CONNECTED rounds once (``(acc · M0 + 2^(30 − shift)) >> (31 − shift)``:
    #: one rounding, ties up, as ``multiply_by_quantized_multiplier_single``, whose golden values
    #: ``test_fixed_point_rounding_golden_values`` checks against the two-rounding forms); the
    #: optimized CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED round twice with halves
    #: going up (``multiply_by_quantized_multiplier_ruy``).
    SINGLE_ROUNDING_OPS = {"builtin": frozenset({"CONV_2D", "DEPTHWISE_CONV_2D",
                                                 "FULLY_CONNECTED"}),
                           "reference": frozenset({"FULLY_CONNECTED"}),
                           # ops XNNPACK does not take run on the builtin kernels
                           "xnnpack": frozenset({"CONV_2D", "DEPTHWISE_CONV_2D",
                                                 "FULLY_CONNECTED"})}

    def __init__(self, model_bytes, kernels="builtin", num_threads=1):
        if kernels not in self.SINGLE_ROUNDING_OPS:
            raise ValueError(f"kernels must be one of {sorted(self.SINGLE_ROUNDING_OPS)}, "
                             f"got {kernels!r}")
        if int(num_threads) < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads!r}")
        self.kernels = kernels
        self.num_threads = int(num_threads)
        self._single = self.SINGLE_ROUNDING_OPS[kernels]
        self.model = flatbuffer_utils.convert_bytearray_to_object(bytes(model_bytes))
        if len(self.model.subgraphs) != 1:
            raise UnsupportedOpError(f"the file has {len(self.model.subgraphs)} subgraphs; the "
                                     "integer reference computes single-subgraph files")
        self.graph = self.model.subgraphs[0]
        self.tensors = [self._read_tensor(i, t) for i, t in enumerate(self.graph.tensors)]
        self.ops = []
        for index, op in enumerate(self.graph.operators):
            code = self.model.operatorCodes[op.opcodeIndex]
            name = _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            if not hasattr(self, "_op_" + name):
                raise UnsupportedOpError(
                    f"op {index} ({name}) is not computed by the integer reference; it covers "
                    f"{', '.join(sorted(self.supported_ops()))}")
            self.ops.append((index, name, op))

    @classmethod
    def supported_ops(cls):
        return {name[4:] for name in dir(cls) if name.startswith("_op_")}

    def _read_tensor(self, index, tensor):
        if tensor.type not in _TYPES:
            raise UnsupportedOpError(f"tensor {index} has type {tensor.type}")
        if tensor.sparsity is not None:
            raise UnsupportedOpError(f"tensor {index} is sparse-encoded; the integer reference "
                                     "reads dense files (export without sparse=True)")
        shape = tuple(int(n) for n in (tensor.shape if tensor.shape is not None else []))
        quant = tensor.quantization
        scale = np.asarray(quant.scale if quant is not None and quant.scale is not None else [],
                           np.float32)
        zero = np.asarray(quant.zeroPoint if quant is not None and quant.zeroPoint is not None
                          else [], np.int64)
        raw = self.model.buffers[tensor.buffer].data if tensor.buffer < len(
            self.model.buffers) else None
        data = None
        if raw is not None and len(raw):
            raw = bytes(bytearray(raw))
            count = int(np.prod(shape)) if shape else 1
            if tensor.type == schema.TensorType.INT4:
                data = unpack_int4(raw, count).reshape(shape)
            else:
                data = np.frombuffer(raw, _TYPES[tensor.type]).reshape(shape)
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else (tensor.name or "")
        return _Tensor(index, name, _TYPES[tensor.type], shape, scale, zero, data)

    # -- running --------------------------------------------------------------------------

    def run(self, *inputs, all_tensors=False):
        values = {t.index: t.data for t in self.tensors if t.data is not None}
        if len(inputs) != len(self.graph.inputs):
            raise ValueError(f"the file has {len(self.graph.inputs)} inputs, got {len(inputs)}")
        for index, x in zip(self.graph.inputs, inputs):
            values[int(index)] = np.asarray(x, self.tensors[index].dtype)
        for op_index, name, op in self.ops:
            result = getattr(self, "_op_" + name)(op, values)
            values[int(op.outputs[0])] = result
        if all_tensors:
            return values
        outputs = [values[int(i)] for i in self.graph.outputs]
        return outputs[0] if len(outputs) == 1 else outputs

    # -- helpers ----------------------------------------------------------------------------

    def _q(self, index):
        t = self.tensors[index]
        return float(t.scale[0]), int(t.zero_point[0]) if t.zero_point.size else 0

    def _options(self, op, kind):
        options = op.builtinOptions
        if options is None:
            raise UnsupportedOpError(f"op without {kind} options")
        return options

    def _requantize_weights(self, op, values, acc, out_index, channel_axis_size, activation,
                            name):
        in_scale, _ = self._q(op.inputs[0])
        w = self.tensors[op.inputs[1]]
        out_scale, out_zero = self._q(out_index)
        w_scales = w.scale if w.scale.size > 1 else np.repeat(w.scale, channel_axis_size)
        if name == "FULLY_CONNECTED" and w.scale.size == 1:
            # GetQuantizedConvolutionMultipler: the scales' product is taken in float32.
            products = [float(np.float32(in_scale) * np.float32(w.scale[0]))] * channel_axis_size
        else:   # PopulateConvolutionQuantizationParams: per channel, in double
            products = [float(np.float32(in_scale)) * float(s) for s in w_scales]
        params = [quantize_multiplier(p / float(np.float32(out_scale))) for p in products]
        multiplier = np.array([p[0] for p in params], np.int64)
        shift = np.array([p[1] for p in params], np.int64)
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            acc = acc + values[int(op.inputs[2])].astype(np.int64)
        if self._by_xnnpack(op, name):
            return _xnnpack_requantize(acc, in_scale, w_scales, out_scale, out_zero,
                                       _activation_range(activation, out_scale, out_zero))
        requantize = multiply_by_quantized_multiplier
        if name in self._single:
            requantize = (multiply_by_quantized_multiplier_single if self.kernels == "reference"
                          else multiply_by_quantized_multiplier_ruy)
        if name == "DEPTHWISE_CONV_2D" and self.kernels == "builtin":
            requantize = _depthwise_output_stage
        out = requantize(acc, multiplier, shift) + out_zero
        low, high = _activation_range(activation, out_scale, out_zero)
        return np.clip(out, low, high).astype(np.int8)

    def _by_xnnpack(self, op, name):
        """Does XNNPACK run this weight op? Not with INT4 weights, except a FULLY_CONNECTED
        with an even number of input channels (REFERENCE §2)."""
        if self.kernels != "xnnpack":
            return False
        weights = self.graph.tensors[op.inputs[1]]
        if weights.type != schema.TensorType.INT4:
            return True
        return name == "FULLY_CONNECTED" and self.tensors[op.inputs[1]].shape[-1] % 2 == 0

    def _check_int8(self, op, name):
        for i in list(op.inputs[:1]) + list(op.outputs):
            if self.tensors[i].dtype is not np.int8:
                raise UnsupportedOpError(f"{name} on {self.tensors[i].dtype.__name__} tensors "
                                         "(the reference computes int8 ops)")

    # -- ops --------------------------------------------------------------------------------

    def _op_QUANTIZE(self, op, values):
        x = values[int(op.inputs[0])]
        scale, zero = self._q(op.outputs[0])
        if self.tensors[op.inputs[0]].dtype is np.float32 and self.kernels != "reference":
            # XNNPACK's f32-qs8-vcvt and the optimized builtin kernel: x · (1/s) in float32,
            # rounded half to even
            inverse = np.float32(1.0) / np.float32(scale)
            q = np.rint(x.astype(np.float32) * inverse).astype(np.int64) + zero
        elif self.tensors[op.inputs[0]].dtype is np.float32:
            q = round_half_away(x.astype(np.float32) / np.float32(scale)).astype(np.int64) + zero
        else:  # requantize int8 -> int8
            in_scale, in_zero = self._q(op.inputs[0])
            multiplier, shift = quantize_multiplier(float(in_scale) / float(scale))
            q = multiply_by_quantized_multiplier(x.astype(np.int64) - in_zero, multiplier,
                                                 shift) + zero
        return np.clip(q, _INT8_MIN, _INT8_MAX).astype(np.int8)

    def _op_DEQUANTIZE(self, op, values):
        x = values[int(op.inputs[0])]
        scale, zero = self._q(op.inputs[0])
        if self.kernels == "xnnpack":   # qs8-f32-vcvt: (q − z) · s, one float32 rounding
            return (x.astype(np.int64) - zero).astype(np.float32) * np.float32(scale)
        if self.kernels == "reference":   # reference_ops::Dequantize: double scale
            return (np.float64(scale) * (x.astype(np.int64) - zero)).astype(np.float32)
        # optimized_ops::Dequantize: 8 values at a time q·s + (−z·s) in float32, two roundings
        # (measured: equal on every value where s·(q − z) differed by an ulp on 55 %); the last
        # (size mod 8) values of the flat tensor as reference_ops, with the double scale
        # (measured: a 500-value output differed by an ulp at 2 of its last 4 values)
        flat = x.reshape(-1)
        head = flat.size - flat.size % 8
        out = np.empty(flat.size, np.float32)
        out[:head] = flat[:head].astype(np.float32) * np.float32(scale) + np.float32(-zero * scale)
        out[head:] = (np.float64(scale) * (flat[head:].astype(np.int64) - zero)).astype(np.float32)
        return out.reshape(x.shape)

    def _conv_input(self, op, values, kh, kw, stride, dilation, padding):
        x = values[int(op.inputs[0])].astype(np.int64)
        _, zero = self._q(op.inputs[0])
        n, h, w, c = x.shape
        out_h, pad_h = _padding(padding, h, kh, stride[0], dilation[0])
        out_w, pad_w = _padding(padding, w, kw, stride[1], dilation[1])
        need_h = (out_h - 1) * stride[0] + (kh - 1) * dilation[0] + 1
        need_w = (out_w - 1) * stride[1] + (kw - 1) * dilation[1] + 1
        centered = np.zeros((n, max(need_h, h + pad_h), max(need_w, w + pad_w), c), np.int64)
        centered[:, pad_h:pad_h + h, pad_w:pad_w + w] = x - zero  # padding is real zero
        patches = np.empty((n, out_h, out_w, kh, kw, c), np.int64)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilation[0], i * dilation[0] + (out_h - 1) * stride[0] + 1,
                             stride[0])
                cols = slice(j * dilation[1], j * dilation[1] + (out_w - 1) * stride[1] + 1,
                             stride[1])
                patches[:, :, :, i, j, :] = centered[:, rows, cols, :]
        return patches

    def _op_CONV_2D(self, op, values):
        self._check_int8(op, "CONV_2D")
        o = self._options(op, "Conv2D")
        w = values[int(op.inputs[1])].astype(np.int64)   # [out, kh, kw, in]
        out_c, kh, kw, in_c = w.shape
        patches = self._conv_input(op, values, kh, kw, (o.strideH, o.strideW),
                                   (o.dilationHFactor, o.dilationWFactor), o.padding)
        if patches.shape[-1] != in_c:
            raise UnsupportedOpError("grouped CONV_2D")
        # float64 products of integers below 2^53 are exact.
        acc = np.tensordot(patches.astype(np.float64), w.astype(np.float64),
                           axes=([3, 4, 5], [1, 2, 3])).astype(np.int64)
        return self._requantize_weights(op, values, acc, op.outputs[0], out_c,
                                        o.fusedActivationFunction, "CONV_2D")

    def _op_DEPTHWISE_CONV_2D(self, op, values):
        self._check_int8(op, "DEPTHWISE_CONV_2D")
        o = self._options(op, "DepthwiseConv2D")
        w = values[int(op.inputs[1])].astype(np.int64)   # [1, kh, kw, in * multiplier]
        _, kh, kw, out_c = w.shape
        patches = self._conv_input(op, values, kh, kw, (o.strideH, o.strideW),
                                   (o.dilationHFactor, o.dilationWFactor), o.padding)
        multiplier = out_c // patches.shape[-1]
        patches = np.repeat(patches, multiplier, axis=-1)   # channel k·m + j reads input k
        acc = np.einsum("nhwijc,ijc->nhwc", patches, w[0])
        return self._requantize_weights(op, values, acc, op.outputs[0], out_c,
                                        o.fusedActivationFunction, "DEPTHWISE_CONV_2D")

    def _op_FULLY_CONNECTED(self, op, values):
        self._check_int8(op, "FULLY_CONNECTED")
        o = self._options(op, "FullyConnected")
        if o.weightsFormat != schema.FullyConnectedOptionsWeightsFormat.DEFAULT:
            raise UnsupportedOpError("FULLY_CONNECTED with shuffled weights")
        x = values[int(op.inputs[0])].astype(np.int64)
        _, zero = self._q(op.inputs[0])
        w = values[int(op.inputs[1])].astype(np.int64)   # [out, in]
        out_c, in_c = w.shape
        flat = (x - zero).reshape(-1, in_c)
        acc = (flat.astype(np.float64) @ w.T.astype(np.float64)).astype(np.int64)
        out = self._requantize_weights(op, values, acc, op.outputs[0], out_c,
                                       o.fusedActivationFunction, "FULLY_CONNECTED")
        return out.reshape(self.tensors[op.outputs[0]].shape if o.keepNumDims else
                           (-1, out_c))

    def _float_binary(self, op, values, function):
        """A float32 ADD/MUL (the model's float preprocessing before its QUANTIZE op)."""
        if self._options(op, "binary").fusedActivationFunction != _ACT.NONE:
            raise UnsupportedOpError(f"float op {op} with a fused activation")
        a, b = (values[int(i)] for i in op.inputs[:2])
        return function(np.asarray(a, np.float32), np.asarray(b, np.float32)).astype(np.float32)

    def _op_SUB(self, op, values):
        if self.tensors[op.inputs[0]].dtype is not np.float32:
            raise UnsupportedOpError("an int8 SUB (only the float preprocessing SUB is computed)")
        return self._float_binary(op, values, np.subtract)

    def _op_DIV(self, op, values):
        if self.tensors[op.inputs[0]].dtype is not np.float32:
            raise UnsupportedOpError("an int8 DIV (only the float preprocessing DIV is computed)")
        return self._float_binary(op, values, np.divide)

    def _op_ADD(self, op, values):
        if self.tensors[op.inputs[0]].dtype is np.float32:
            return self._float_binary(op, values, np.add)
        self._check_int8(op, "ADD")
        o = self._options(op, "Add")
        (s1, z1), (s2, z2), (so, zo) = (self._q(i) for i in (op.inputs[0], op.inputs[1],
                                                              op.outputs[0]))
        if self.kernels == "xnnpack":
            out = _xnnpack_add(values[int(op.inputs[0])], values[int(op.inputs[1])],
                               (s1, z1), (s2, z2), (so, zo))
            low, high = _activation_range(o.fusedActivationFunction, so, zo)
            return np.clip(out, low, high).astype(np.int8)
        left_shift = 20
        twice_max = 2.0 * float(max(np.float32(s1), np.float32(s2)))
        m1 = quantize_multiplier(float(s1) / twice_max)
        m2 = quantize_multiplier(float(s2) / twice_max)
        mo = quantize_multiplier(twice_max / ((1 << left_shift) * float(so)))
        q1 = values[int(op.inputs[0])].astype(np.int64) - z1
        q2 = values[int(op.inputs[1])].astype(np.int64) - z2
        low, high = _activation_range(o.fusedActivationFunction, so, zo)
        if self.kernels == "builtin" and q1.shape == q2.shape:
            return _optimized_add(q1, q2, m1, m2, mo, zo, low, high)
        out = _reference_add(q1, q2, m1, m2, mo, zo)
        return np.clip(out, low, high).astype(np.int8)

    def _op_MUL(self, op, values):
        if self.tensors[op.inputs[0]].dtype is np.float32:
            return self._float_binary(op, values, np.multiply)
        self._check_int8(op, "MUL")
        o = self._options(op, "Mul")
        (s1, z1), (s2, z2), (so, zo) = (self._q(i) for i in (op.inputs[0], op.inputs[1],
                                                              op.outputs[0]))
        product = ((values[int(op.inputs[0])].astype(np.int64) - z1)
                   * (values[int(op.inputs[1])].astype(np.int64) - z2))
        if self.kernels == "xnnpack":   # qs8-vmul fp32: s_1·s_2/s_y in float32, halves to even
            f32 = np.float32
            scale = f32(f32(f32(s1) * f32(s2)) / f32(so))
            return _xnnpack_fp32_output(product.astype(np.float32) * scale, zo,
                                        _activation_range(o.fusedActivationFunction, so, zo))
        multiplier = quantize_multiplier(float(s1) * float(s2) / float(so))
        out = multiply_by_quantized_multiplier(product, *multiplier) + zo
        low, high = _activation_range(o.fusedActivationFunction, so, zo)
        return np.clip(out, low, high).astype(np.int8)

    def _lookup_table(self, op, values, name, function):
        """An int8 op computed through a 256-entry table (``LUTPopulate``): each entry
        ``round(f(s_in·(q − z_in)) / s_out) + z_out`` in float32, halves away from zero."""
        self._check_int8(op, name)
        (si, zi), (so, zo) = self._q(op.inputs[0]), self._q(op.outputs[0])
        q = np.arange(-128, 128, dtype=np.int64)
        dequantized = np.float32(si) * (q - zi).astype(np.float32)
        with np.errstate(over="ignore"):
            transformed = function(dequantized).astype(np.float32)
        rescaled = round_half_away(transformed * (np.float32(1.0) / np.float32(so)))
        table = np.clip(rescaled.astype(np.int64) + zo, -128, 127)
        return table[values[int(op.inputs[0])].astype(np.int64) + 128].astype(np.int8)

    def _op_LOGISTIC(self, op, values):
        return self._lookup_table(
            op, values, "LOGISTIC", lambda v: np.float32(1.0) / (np.float32(1.0) + np.exp(-v)))

    def _op_TANH(self, op, values):
        return self._lookup_table(op, values, "TANH", np.tanh)

    def _op_LEAKY_RELU(self, op, values):
        """Int8 LEAKY_RELU (``QuantizeLeakyRelu``): ``q − z_in`` requantized with
        ``s_in/s_out`` where it is ≥ 0 and with ``s_in·α/s_out`` below (gemmlowp, float32
        multipliers as ``Prepare`` computes them)."""
        self._check_int8(op, "LEAKY_RELU")
        alpha = np.float32(self._options(op, "LeakyRelu").alpha)
        (si, zi), (so, zo) = self._q(op.inputs[0]), self._q(op.outputs[0])
        identity = quantize_multiplier(float(np.float32(si) / np.float32(so)))
        negative = quantize_multiplier(float(np.float32(si) * alpha / np.float32(so)))
        x = values[int(op.inputs[0])].astype(np.int64) - zi
        if self.kernels == "xnnpack":
            # qs8-vlrelu: multipliers lrintf(256 · s_in/s_out) and lrintf(256 · s_in/s_out · α),
            # then (z_out·256 + 128 + x·multiplier) >> 8
            f32 = np.float32
            positive = f32(f32(si) / f32(so))
            up, down = (int(np.rint(f32(256.0) * positive)),
                        int(np.rint(f32(256.0) * f32(positive * alpha))))
            out = ((zo << 8) + 0x80 + x * np.where(x >= 0, up, down)) >> 8
            return np.clip(out, -128, 127).astype(np.int8)
        out = np.where(x >= 0, multiply_by_quantized_multiplier(x, *identity),
                       multiply_by_quantized_multiplier(x, *negative)) + zo
        return np.clip(out, -128, 127).astype(np.int8)

    def _op_MEAN(self, op, values):
        self._check_int8(op, "MEAN")
        x = values[int(op.inputs[0])].astype(np.int64)
        axes = tuple(int(a) % x.ndim for a in np.atleast_1d(values[int(op.inputs[1])]))
        keep = bool(op.builtinOptions.keepDims) if op.builtinOptions is not None else False
        (si, zi), (so, zo) = self._q(op.inputs[0]), self._q(op.outputs[0])
        count = int(np.prod([x.shape[a] for a in axes]))
        if self.kernels == "xnnpack":
            # qs8 rsum of the raw int8 values, then the int32 -> qs8 convert of
            # src/operators/reduce-nd.c: y = nearbyint(Σx · i + z'), in float32, with
            # i = (s_x/s_y) · (1/N) and z' = z_y − (N·z_x) · i.
            f32 = np.float32
            inverse = f32(f32(f32(si) / f32(so)) * f32(1.0 / count))
            zero = f32(f32(zo) - f32(f32(count * zi) * inverse))
            total = x.sum(axis=axes, keepdims=keep).astype(np.float32)
            out = np.rint(f32(total * inverse) + zero)
            return np.clip(out, _INT8_MIN, _INT8_MAX).astype(np.int8)
        if self.kernels == "builtin" and keep and x.ndim == 4 and sorted(axes) == [1, 2]:
            return self._optimized_spatial_mean(x, si, zi, so, zo)
        # QuantizedMeanOrSum: fold 1/count into the multiplier of s_x / s_y.
        multiplier, shift = quantize_multiplier(float(si) / float(so))
        extra = min(count.bit_length() - 1, 32, 31 + shift)
        multiplier = (multiplier << extra) // count
        shift -= extra
        total = x.sum(axis=axes, keepdims=keep) - zi * count
        requantize = (multiply_by_quantized_multiplier_single if "MEAN" in self._single
                      else multiply_by_quantized_multiplier)
        out = requantize(total, multiplier, shift) + zo
        return np.clip(out, _INT8_MIN, _INT8_MAX).astype(np.int8)

    def _optimized_spatial_mean(self, x, si, zi, so, zo):
        """``optimized_integer_ops::Mean``, the builtin kernel of a keep_dims MEAN over height
        and width (SE blocks' ``GlobalAveragePooling2D(keepdims=True)``;
        ``optimized/integer_ops/mean.h``): the raw int8 values summed, requantized by
        ``s_x / (N · s_y)`` (float32), plus a bias ``z_y − trunc(z_x · s_x / s_y ± 0.5)``
        computed in float32 (not the exact ``−N·z_x`` correction of the generic kernel).

        The channels are split among ``min(C // 8, threads)`` tasks; each task requantizes
        blocks of 16 channels with the vector path (``vqrdmulh`` then a rounding shift, both
        halves up: ``multiply_by_quantized_multiplier_ruy``; x86 builds emulate it through
        NEON_2_SSE) and its remaining channels with the scalar ``MultiplyByQuantizedMultiplier``
        (gemmlowp's symmetric double rounding). The result therefore depends on the thread
        count (``test_squeeze_excite_mean_equals_each_kernel_set`` checks a 40-channel mean at 1
        and 2 threads; MobileNetV3Small's SE means at 1, 2 and 4 threads in a development run)."""
        f32 = np.float32
        count = x.shape[1] * x.shape[2]
        # trunc(t ± 0.5) in float32: the float32 t rounded half away from zero
        bias = int(zo) - int(round_half_away(f32(f32(f32(zi) * f32(si)) / f32(so))))
        multiplier, shift = quantize_multiplier(float(f32(f32(si) / f32(f32(count) * f32(so)))))
        total = x.sum(axis=(1, 2), keepdims=True)
        out = np.empty_like(total)
        depth = total.shape[-1]
        tasks = min(max(depth // 8, 1), self.num_threads)
        start = 0
        for task in range(tasks):
            end = start + (depth - start) // (tasks - task)
            vector_end = start + (end - start) // 16 * 16
            out[..., start:vector_end] = multiply_by_quantized_multiplier_ruy(
                total[..., start:vector_end], multiplier, shift)
            out[..., vector_end:end] = multiply_by_quantized_multiplier(
                total[..., vector_end:end], multiplier, shift)
            start = end
        return np.clip(out + bias, _INT8_MIN, _INT8_MAX).astype(np.int8)

    def _pool(self, op, values, reduce):
        self._check_int8(op, "pooling")
        o = self._options(op, "Pool2D")
        x = values[int(op.inputs[0])].astype(np.int64)
        n, h, w, c = x.shape
        out_h, pad_h = _padding(o.padding, h, o.filterHeight, o.strideH, 1)
        out_w, pad_w = _padding(o.padding, w, o.filterWidth, o.strideW, 1)
        out = np.empty((n, out_h, out_w, c), np.int64)
        for i in range(out_h):
            r0 = i * o.strideH - pad_h
            rows = slice(max(r0, 0), min(r0 + o.filterHeight, h))
            for j in range(out_w):
                c0 = j * o.strideW - pad_w
                window = x[:, rows, max(c0, 0):min(c0 + o.filterWidth, w), :]
                out[:, i, j, :] = reduce(window)
        so, zo = self._q(op.outputs[0])
        low, high = _activation_range(o.fusedActivationFunction, so, zo)
        return np.clip(out, low, high).astype(np.int8)

    def _op_MAX_POOL_2D(self, op, values):
        return self._pool(op, values, lambda window: window.max(axis=(1, 2)))

    def _op_AVERAGE_POOL_2D(self, op, values):
        def average(window):
            count = window.shape[1] * window.shape[2]
            total = window.sum(axis=(1, 2))
            # (acc ± count/2) / count with C++ division: rounds half away from zero.
            shifted = np.where(total > 0, total + count // 2, total - count // 2)
            quotient = np.abs(shifted) // count
            return np.where(shifted < 0, -quotient, quotient)
        return self._pool(op, values, average)

    def _op_RESHAPE(self, op, values):
        x = values[int(op.inputs[0])]
        if len(op.inputs) > 1 and op.inputs[1] >= 0:   # the new shape as a tensor
            return x.reshape(np.asarray(values[int(op.inputs[1])]).tolist())
        shape = list(self.tensors[op.outputs[0]].shape)
        return x.reshape([-1] + shape[1:] if shape else shape)

    def _op_SHAPE(self, op, values):   # shape arithmetic of a dynamic batch (Flatten, Reshape)
        return np.asarray(values[int(op.inputs[0])].shape, np.int32)

    def _op_PACK(self, op, values):
        axis = op.builtinOptions.axis if op.builtinOptions is not None else 0
        return np.stack([values[int(i)] for i in op.inputs], axis=axis)

    def _op_STRIDED_SLICE(self, op, values):
        x = values[int(op.inputs[0])]
        begin, end, strides = (np.asarray(values[int(i)]).tolist() for i in op.inputs[1:4])
        o = op.builtinOptions
        if x.ndim != 1 or o.ellipsisMask or o.newAxisMask:
            raise UnsupportedOpError("STRIDED_SLICE other than on a 1-D (shape) tensor")
        start = None if o.beginMask & 1 else begin[0]
        stop = None if o.endMask & 1 else end[0]
        if o.shrinkAxisMask & 1:
            return np.asarray(x[begin[0]], x.dtype)
        return x[start:stop:strides[0]]

    def _op_SQUEEZE(self, op, values):
        shape = list(self.tensors[op.outputs[0]].shape)
        return values[int(op.inputs[0])].reshape([-1] + shape[1:])

    def _op_PAD(self, op, values):
        x = values[int(op.inputs[0])]
        pads = np.asarray(values[int(op.inputs[1])], np.int64)
        _, zero = self._q(op.outputs[0])
        return np.pad(x, [tuple(p) for p in pads], constant_values=zero).astype(x.dtype)

    def _op_CONCATENATION(self, op, values):
        o = self._options(op, "Concatenation")
        out_q = self._q(op.outputs[0])
        parts = []
        for i in op.inputs:
            if self._q(i) != out_q:
                raise UnsupportedOpError("CONCATENATION of int8 inputs whose scale or zero point "
                                         "differs from the output's")
            parts.append(values[int(i)])
        if o.fusedActivationFunction != _ACT.NONE:
            raise UnsupportedOpError("CONCATENATION with a fused activation")
        return np.concatenate(parts, axis=o.axis)


# ----------------------------------------------------------------------------------------------


def _invoked(model_bytes, x, num_threads=1, **options):
    """A LiteRT interpreter (``num_threads``, ``options`` as ``Interpreter`` takes them) that has
    run the file on the batch ``x``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=bytes(model_bytes), num_threads=num_threads,
                              **options)
    inputs = interpreter.get_input_details()
    interpreter.resize_tensor_input(inputs[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inputs[0]["index"], np.asarray(x, inputs[0]["dtype"]))
    interpreter.invoke()
    return interpreter


def compare_with_interpreter(model_bytes, x, *, op_resolver="BUILTIN_WITHOUT_DEFAULT_DELEGATES",
                             num_threads=1):
    """Run ``x`` through the file in LiteRT and through ``IntegerReference``; compare every op output.

    The interpreter keeps every intermediate tensor
    (``experimental_preserve_all_tensors``), which is only possible without a
    delegate, so this checks the builtin kernels (``op_resolver``:
    ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` or ``BUILTIN_REF``) with ``num_threads``.
    Returns a ``TensorComparison``.
    """
    from ai_edge_litert.interpreter import OpResolverType

    reference = IntegerReference(model_bytes, kernels="reference" if op_resolver == "BUILTIN_REF"
                                 else "builtin", num_threads=num_threads)
    interpreter = _invoked(model_bytes, x, num_threads=num_threads,
                           experimental_op_resolver_type=getattr(OpResolverType, op_resolver),
                           experimental_preserve_all_tensors=True)
    constants = {t.index: t.data for t in reference.tensors if t.data is not None}
    mismatches, compared = [], 0
    for op_index, name, op in reference.ops:
        # Each op is computed from the interpreter's own inputs to it, so a difference is
        # that op's arithmetic, not one carried from an earlier op.
        values = dict(constants)
        for i in op.inputs:
            if i >= 0 and int(i) not in values:
                values[int(i)] = interpreter.get_tensor(int(i))
        want = getattr(reference, "_op_" + name)(op, values)
        index = int(op.outputs[0])
        got = interpreter.get_tensor(index)
        compared += 1
        if got.shape != want.shape:
            mismatches.append((op_index, name, reference.tensors[index].name, got.size, got.size,
                               None))
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if np.any(diff):
            step = 1.0
            if got.dtype == np.float32 and reference.tensors[op.inputs[0]].scale.size:
                step = float(reference.tensors[op.inputs[0]].scale[0])
            mismatches.append((op_index, name, reference.tensors[index].name,
                               int(np.count_nonzero(diff)), int(diff.size),
                               float(diff.max() / step)))
    return TensorComparison(compared, mismatches)


def _levels(values, tensor):
    """A float output as the int8 levels it dequantizes from (ulp-level differences of the
    float DEQUANTIZE arithmetic vanish), an integer tensor as it is."""
    if values.dtype != np.float32 or not tensor.scale.size:
        return np.asarray(values, np.int64)
    return np.rint(values / np.float32(tensor.scale[0])).astype(np.int64)


def compare_outputs_with_xnnpack(model_bytes, x):
    """Run ``x`` through the file under LiteRT's default XNNPACK delegate and through
    ``IntegerReference(kernels="xnnpack")``; compare the outputs in levels.

    The delegate keeps no intermediate tensors, so only the outputs are compared. Returns
    a ``TensorComparison`` with one entry per differing output.
    """
    reference = IntegerReference(model_bytes, kernels="xnnpack")
    interpreter = _invoked(model_bytes, x)
    # the reference in chunks (its convolutions unfold the input), keeping only the outputs
    outputs = [int(index) for index in reference.graph.outputs]
    chunks = []
    for start in range(0, len(x), 8):
        tensors = reference.run(x[start:start + 8], all_tensors=True)
        chunks.append([tensors[index] for index in outputs])
    want = {index: np.concatenate([chunk[k] for chunk in chunks])
            for k, index in enumerate(outputs)}
    mismatches = []
    producers = {int(op.outputs[0]): (i, name) for i, name, op in reference.ops}
    for index in outputs:
        # the output is dequantized from the int8 tensor that feeds the last op
        op_index, name = producers[index]
        tensor = reference.tensors[index]
        source = reference.tensors[int(reference.graph.operators[op_index].inputs[0])]
        scaled = tensor if not source.scale.size else source
        got = _levels(interpreter.get_tensor(index), scaled)
        expected = _levels(want[index], scaled)
        diff = np.abs(got - expected)
        if np.any(diff):
            mismatches.append((op_index, name, tensor.name, int(np.count_nonzero(diff)),
                               int(diff.size), float(diff.max())))
    return TensorComparison(len(reference.graph.outputs), mismatches)


def kernel_differences(model_bytes, x):
    """Where the file's two CPU kernel sets compute different values from the same inputs.

    Every op is computed twice by the integer reference, with the arithmetic of LiteRT's
    builtin kernels and with XNNPACK's, from the same input tensors (those the builtin
    kernels produce for ``x``): a difference is that op's arithmetic, not one carried from
    an earlier op. Returns ``[(op index, op name, values differing, values, max levels)]``
    for the ops that differ; float outputs are compared in the levels they dequantize from.
    """
    builtin = IntegerReference(model_bytes, kernels="builtin")
    xnnpack = IntegerReference(model_bytes, kernels="xnnpack")
    values = builtin.run(x, all_tensors=True)
    rows = []
    for op_index, name, op in builtin.ops:
        a = values[int(op.outputs[0])]   # the builtin arithmetic, from the run above
        b = getattr(xnnpack, "_op_" + name)(op, values)
        source = builtin.tensors[int(op.inputs[0])]
        if name == "DEQUANTIZE":
            a, b = _levels(a, source), _levels(b, source)
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        if np.any(diff):
            rows.append((op_index, name, int(np.count_nonzero(diff)), int(diff.size),
                         float(diff.max())))
    return rows
