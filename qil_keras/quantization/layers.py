"""tf-keras layers with QIL quantizers.

``QILConv2D``, ``QILDepthwiseConv2D`` and ``QILDense`` subclass the Keras layer
of the same name and reuse its ``call``: the float kernel is swapped for its
quantized value ``k · s`` (see ``qil_keras.ops``) for the duration of the
parent's call. Each accepts its parent's arguments plus ``w_bits``,
``per_channel`` and ``train_gamma``. ``QILActivation`` quantizes a non-negative
activation tensor (after ReLU) with a QIL interval; ``FakeQuant8`` is the 8-bit
fake quantizer for tensors that the integer export stores as int8 without a
QIL interval (model input, residual sums, signed tensors).
"""

import numpy as np

from . import ops
from .._keras import keras, tf
from .quantizers import QILActivationQuantizer, QILWeightQuantizer

__all__ = ["QILConv2D", "QILDepthwiseConv2D", "QILDense", "QILActivation", "QILReLU", "FakeQuant8",
           "SwishInt8", "AveragePooling2DInt8", "LeakyReLUInt8", "SIGMOID_RANGE", "TANH_RANGE"]

# TFLite's int8 LOGISTIC and TANH have fixed output parameters (scale 1/256, zero point -128;
# scale 1/128, zero point 0): the ranges a FakeQuant8 after them must have for the file to
# keep the op's own output grid (the converter would otherwise requantize once more).
SIGMOID_RANGE = (0.0, 255.0 / 256.0)
TANH_RANGE = (-1.0, 127.0 / 128.0)


class _QILKernelMixin:
    """Quantizes ``self.<_kernel_attr>`` with a ``QILWeightQuantizer``."""

    _kernel_attr = "kernel"
    _channel_axes = (-1,)

    def __init__(self, *args, w_bits=4, per_channel=False, train_gamma=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernel_quantizer = QILWeightQuantizer(
            w_bits, per_channel=per_channel, train_gamma=train_gamma,
            channel_axes=self._channel_axes,
        )

    def build(self, input_shape):
        super().build(input_shape)
        kernel = getattr(self, self._kernel_attr)
        self.kernel_quantizer_vars = self.kernel_quantizer.build(
            kernel.shape, self._kernel_attr, self
        )
        with tf.init_scope():  # start from the initial kernel's MSE-optimal range
            if tf.executing_eagerly():
                self.initialize_interval()

    @property
    def float_kernel(self):
        """The trainable float kernel (the quantizer's input)."""
        swapped = self.__dict__.get("_qil_float_kernel")
        return swapped if swapped is not None else getattr(self, self._kernel_attr)

    def quantized_kernel(self):
        """The kernel the forward pass uses: ``k · s`` (a tensor)."""
        return self.kernel_quantizer(self.float_kernel, None, self.kernel_quantizer_vars)

    def call(self, inputs):
        float_kernel = getattr(self, self._kernel_attr)
        # object.__setattr__ bypasses Keras attribute tracking, so the weight
        # lists (and their order, which .h5 files rely on) never change.
        object.__setattr__(self, "_qil_float_kernel", float_kernel)
        object.__setattr__(self, self._kernel_attr, self.quantized_kernel())
        try:
            return super().call(inputs)
        finally:
            object.__setattr__(self, self._kernel_attr, float_kernel)
            object.__setattr__(self, "_qil_float_kernel", None)

    @property
    def w_bits(self):
        if self.built:
            return self.kernel_quantizer.current_bits(self.kernel_quantizer_vars)
        return self.kernel_quantizer.bits

    def set_bits(self, w_bits):
        """Change the weight bit width, keeping the learned interval."""
        self.kernel_quantizer.set_bits(getattr(self, "kernel_quantizer_vars", None), w_bits)

    def integer_levels(self):
        """Integer weight levels ``k`` (numpy int32, kernel shape), ``|k| ≤ q_W``."""
        return self.kernel_quantizer.integer_levels(self.float_kernel, self.kernel_quantizer_vars)

    def weight_scale(self):
        """Step ``s`` (scalar, or per channel): quantized kernel ``= k · s``."""
        return self.kernel_quantizer.step(self.kernel_quantizer_vars)

    def initialize_interval(self):
        """Set the interval to the MSE-optimal range of the current kernel."""
        self.kernel_quantizer.initialize(self.kernel_quantizer_vars, self.float_kernel.numpy())

    def get_config(self):
        config = super().get_config()
        config.update(
            w_bits=self.w_bits,
            per_channel=self.kernel_quantizer.per_channel,
            train_gamma=self.kernel_quantizer.train_gamma,
        )
        return config


@keras.utils.register_keras_serializable(package="qil_keras")
class QILConv2D(_QILKernelMixin, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose kernel passes through a QIL weight quantizer."""


@keras.utils.register_keras_serializable(package="qil_keras")
class QILDepthwiseConv2D(_QILKernelMixin, keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with a QIL-quantized depthwise kernel.

    Per-channel intervals are per (input channel, multiplier) pair.
    """

    _kernel_attr = "depthwise_kernel"
    _channel_axes = (-2, -1)


@keras.utils.register_keras_serializable(package="qil_keras")
class QILDense(_QILKernelMixin, keras.layers.Dense):
    """``keras.layers.Dense`` whose kernel passes through a QIL weight quantizer."""


@keras.utils.register_keras_serializable(package="qil_keras")
class QILActivation(keras.layers.Layer):
    """QIL activation quantizer as a layer: ``y = k · s``, ``0 ≤ k ≤ 2^a_bits - 1``.

    Put it after a ReLU (inputs must be non-negative; negative values map to
    0). Trainable ``c`` and ``d``; ``s = 2d/q_X``.
    """

    def __init__(self, a_bits=4, **kwargs):
        super().__init__(**kwargs)
        self.quantizer = QILActivationQuantizer(a_bits)
        self._calibrating = False

    def build(self, input_shape):
        self.quantizer_vars = self.quantizer.build(input_shape, "", self)
        super().build(input_shape)

    def call(self, inputs):
        if self._calibrating and tf.executing_eagerly():
            self.quantizer.initialize(self.quantizer_vars, inputs.numpy())
        return self.quantizer(inputs, None, self.quantizer_vars)

    @property
    def a_bits(self):
        if self.built:
            return self.quantizer.current_bits(self.quantizer_vars)
        return self.quantizer.bits

    def set_bits(self, a_bits):
        """Change the activation bit width, keeping the learned interval."""
        self.quantizer.set_bits(getattr(self, "quantizer_vars", None), a_bits)

    def step(self):
        """Step ``s``: outputs are ``k · s``."""
        return self.quantizer.step(self.quantizer_vars)

    def interval(self):
        """Effective ``(c, d)`` (numpy): pruned below ``c - d``, clipped above ``c + d``."""
        c, d = ops.effective_interval(self.quantizer_vars["c"], self.quantizer_vars["d"])
        return float(c.numpy()), float(d.numpy())

    def initialize_interval(self, values):
        """Set ``c = d`` to the MSE-optimal range ``[0, h]`` of ``values``."""
        self.quantizer.initialize(self.quantizer_vars, values)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["a_bits"] = self.a_bits
        return config


@keras.utils.register_keras_serializable(package="qil_keras")
class QILReLU(keras.layers.ReLU):
    """``keras.layers.ReLU`` that, in training, passes its input through when its only readers
    are QIL activation quantizers (``pass_through_in_training``, set by ``quantize``).

    ``ops.quantize_activation`` computes ``QIL(ReLU(x))`` from ``x`` itself, values and the
    gradients of ``c`` and ``d`` alike, so the ReLU's own forward and backward kernels are
    redundant in the training step; ``bench/results/train_cost.md`` has what they cost. In
    inference (``training`` false or unset) it is a ReLU, so every other use of the model, the
    integer export included, sees ReLU's output.
    """

    def __init__(self, *args, pass_through_in_training=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pass_through_in_training = bool(pass_through_in_training)

    def call(self, inputs, training=None):
        if not self.pass_through_in_training or training is None or training is False:
            return super().call(inputs)
        if training is True:
            return tf.identity(inputs)
        return tf.cond(tf.cast(training, tf.bool), lambda: tf.identity(inputs),
                       lambda: super(QILReLU, self).call(inputs))

    def get_config(self):
        config = super().get_config()
        config["pass_through_in_training"] = self.pass_through_in_training
        return config


@keras.utils.register_keras_serializable(package="qil_keras")
class FakeQuant8(keras.layers.Layer):
    """8-bit fake quantization with a tracked range (an int8 tensor at export).

    The range is an exponential moving average (``ema_decay``) of the batch
    minimum and maximum (widened to include 0), as in tfmot's 8-bit QAT.
    Under ``tf.distribute`` the batch extremes are gathered across replicas,
    so every replica tracks the range of the global batch (a single-device run
    on the same global batch computes the same numbers). Before the first
    training step (or calibration) the current batch's range is used.

    ``quantize_op_rounding=True`` (what ``qil_keras.quantize`` uses for the
    model input) rounds as the file's QUANTIZE op does under XNNPACK (the default
    delegate) and LiteRT's optimized kernels on x86-64, instead of as
    ``fake_quant_with_min_max_vars``: ``q = clip(round(x · (1/s)) + z, −128, 127)``
    with ``1/s`` and the product in float32 and halves rounded to even, ``s`` the
    float32 scale the converter stores. They differ on exact ties: with inputs
    ``x/127.5 − 1`` every pixel is one (issue #15; ``tests/integer/test_ties.py``
    puts all 256 pixel values on ties). LiteRT's reference kernel (and its
    ARM NEON path) rounds ties away from zero; ``untie_inputs`` moves the grid off the
    ties of the calibration data so that no kernel set has to decide.

    ``fixed_range=(lo, hi)`` fixes the range instead of tracking it: after a
    sigmoid or tanh, whose int8 kernels have a fixed output grid
    (``SIGMOID_RANGE``, ``TANH_RANGE``). ``extra_steps`` widens the
    tracked range by that many steps at the top: for the model input, where
    ``qil_keras.quantize.untie_inputs`` sets it so that no calibration
    value sits on a rounding tie (``x/127.5 − 1`` on ``[-1, 1]``: one step).
    """

    def __init__(self, ema_decay=0.99, quantize_op_rounding=False, fixed_range=None,
                 extra_steps=0, **kwargs):
        super().__init__(**kwargs)
        self.ema_decay = float(ema_decay)
        self.quantize_op_rounding = bool(quantize_op_rounding)
        self.extra_steps = int(extra_steps)
        self.fixed_range = None if fixed_range is None else tuple(float(v) for v in fixed_range)
        if self.fixed_range is not None and not self.fixed_range[0] <= 0.0 < self.fixed_range[1]:
            raise ValueError(f"fixed_range must be (lo, hi) with lo <= 0 < hi, got {fixed_range!r}.")
        self._calibrating = False

    def build(self, input_shape):
        mean = tf.VariableAggregation.MEAN
        self.range_min = self.add_weight("range_min", (), initializer="zeros",
                                         trainable=False, aggregation=mean)
        self.range_max = self.add_weight("range_max", (), initializer="zeros",
                                         trainable=False, aggregation=mean)
        self.num_updates = self.add_weight("num_updates", (), dtype=tf.int32, initializer="zeros",
                                       trainable=False,
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        if self.fixed_range is not None:
            self.range_min.assign(self.fixed_range[0])
            self.range_max.assign(self.fixed_range[1])
            self.num_updates.assign(1)
        super().build(input_shape)

    @staticmethod
    def batch_range(inputs):
        """``(min(x, 0), max(x, 0))`` over the (global) batch, as constants for autodiff.

        The range is tracked, not learned (as in tfmot's moving-average quantizer): without
        ``stop_gradient`` the backward pass would run ReduceMin/ReduceMax's gradients, several
        full-tensor kernels per quantizer, for a contribution that is zero whenever the range
        comes from the moving average.
        """
        inputs = tf.stop_gradient(inputs)
        extremes = tf.stack([tf.reduce_min(inputs), tf.reduce_max(inputs)])[None]
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            extremes = context.all_gather(extremes, axis=0)
        lo = tf.minimum(tf.reduce_min(extremes[:, 0]), 0.0)
        hi = tf.maximum(tf.reduce_max(extremes[:, 1]), 0.0)
        return lo, hi

    def call(self, inputs, training=None):
        if self.fixed_range is not None:
            return tf.quantization.fake_quant_with_min_max_args(
                inputs, *self.fixed_range, num_bits=8, narrow_range=False)
        range_min, range_max = self.current_range(inputs, training)
        if self.quantize_op_rounding:
            return self._quantize_op(inputs, range_min, range_max)
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, range_min, range_max, num_bits=8, narrow_range=False
        )

    def current_range(self, inputs, training=None):
        """The range this call quantizes with, after updating the tracked one (training or
        calibration): the batch's own range before the first update."""
        lo, hi = self.batch_range(inputs)
        fresh = tf.equal(self.num_updates, 0)
        if self._calibrating and tf.executing_eagerly():
            self.range_min.assign(lo)
            self.range_max.assign(hi)
            self.num_updates.assign(1)
        elif training:
            decay = self.ema_decay
            new_lo = tf.where(fresh, lo, decay * self.range_min + (1 - decay) * lo)
            new_hi = tf.where(fresh, hi, decay * self.range_max + (1 - decay) * hi)
            self.range_min.assign(new_lo)
            self.range_max.assign(new_hi)
            self.num_updates.assign_add(1)
        range_min = tf.where(tf.equal(self.num_updates, 0), lo, self.range_min)
        range_max = tf.where(tf.equal(self.num_updates, 0), hi, self.range_max)
        range_max = tf.maximum(range_max, range_min + 1e-6)
        if self.extra_steps:
            range_max = range_max + self.extra_steps * (range_max - range_min) / 255.0
        return range_min, range_max

    @staticmethod
    def _quantize_op(inputs, range_min, range_max):
        """TFLite's QUANTIZE then DEQUANTIZE, with a straight-through gradient inside the range.

        Scale and zero point as the converter derives them from the range (in double,
        the scale stored as float32); the rounding is XNNPACK's (below).
        """
        lo, hi = tf.cast(range_min, tf.float64), tf.cast(range_max, tf.float64)
        scale64 = (hi - lo) / 255.0
        zero = tf.cast(tf.clip_by_value(-128.0 + tf.floor(-lo / scale64 + 0.5), -128.0, 127.0),
                       tf.float32)
        scale = tf.cast(scale64, tf.float32)
        # x · (1/s) in float32, halves to even (tf.round): XNNPACK's f32-qs8-vcvt, and LiteRT's
        # optimized QUANTIZE on x86-64 (measured: integer_reference, QUANTIZE)
        v = tf.stop_gradient(inputs) * (tf.constant(1.0, tf.float32) / scale)
        q = tf.clip_by_value(tf.round(v) + zero, -128.0, 127.0)
        values = (q - zero) * scale
        inside = tf.clip_by_value(inputs, (-128.0 - zero) * scale, (127.0 - zero) * scale)
        return inside + tf.stop_gradient(values - inside)

    def quantization_params(self, extra_steps=None):
        """``(scale, zero_point)`` of the int8 tensor, as the converter nudges them; with
        ``extra_steps``, those the quantizer would have with that ``extra_steps`` instead."""
        extra_steps = self.extra_steps if extra_steps is None else int(extra_steps)
        lo, hi = float(self.range_min.numpy()), float(self.range_max.numpy())
        hi = max(hi, lo + 1e-6)  # as in call(): an all-zero tensor still gets a scale
        if extra_steps and self.fixed_range is None:
            hi = float(np.float32(hi) + np.float32(extra_steps)
                       * (np.float32(hi) - np.float32(lo)) / np.float32(255.0))
        scale = (hi - lo) / 255.0
        # As FakeQuant nudges: the unsigned zero point -lo/scale rounded half away from zero
        # (std::round; np.round would round half to even), then shifted to int8.
        zero_point = int(np.clip(-128 + np.floor(-lo / scale + 0.5), -128, 127))
        return scale, zero_point

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["ema_decay"] = self.ema_decay
        if self.quantize_op_rounding:
            config["quantize_op_rounding"] = True
        if self.fixed_range is not None:
            config["fixed_range"] = list(self.fixed_range)
        if self.extra_steps:
            config["extra_steps"] = self.extra_steps
        return config


@keras.utils.register_keras_serializable(package="qil_keras")
class SwishInt8(keras.layers.Layer):
    """Swish ``x · σ(x)`` as the integer file computes it: ``x · Q(σ(x))``.

    TFLite has no int8 swish; the file runs LOGISTIC (output on the fixed grid
    ``k/256``, ``SIGMOID_RANGE``) and then MUL. ``Q`` rounds ``σ(x)`` to that
    grid in training too (straight-through gradient), so the model trains on
    what the file computes; the product gets the FakeQuant8 that follows.
    Reference: Ramachandran et al., "Searching for Activation Functions", 2017.
    """

    def call(self, inputs):
        gate = tf.quantization.fake_quant_with_min_max_args(
            tf.sigmoid(inputs), *SIGMOID_RANGE, num_bits=8, narrow_range=False)
        return inputs * gate

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.utils.register_keras_serializable(package="qil_keras")
class LeakyReLUInt8(FakeQuant8):
    """LeakyReLU as XNNPACK's int8 LEAKY_RELU computes it, on its input's own grid.

    The layer quantizes its input to an 8-bit grid (tracked as ``FakeQuant8`` tracks it) and
    keeps that grid for its output. XNNPACK (``qs8-vlrelu``) computes
    ``(z·256 + 128 + x·M) >> 8`` from the input level ``x = q − z``, with ``M = 256`` for
    ``x ≥ 0`` (output scale = input scale) and ``M = lrintf(256·α)`` below: ``alpha`` is
    rounded to a multiple of 1/256 here, so that the file stores that ``α`` and the kernel's
    ``M/256`` is it exactly; then the output level is ``x`` or ``floor(α·x + 1/2)``, which this
    layer computes in float32 exactly (straight-through gradient of the LeakyReLU). LiteRT's
    builtin kernel rounds twice, halves away from zero: it differs at the negative ties
    ``α·x = −k − 1/2``.
    """

    def __init__(self, alpha=0.3, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(np.rint(256.0 * float(alpha)) / 256.0)

    def call(self, inputs, training=None):
        range_min, range_max = self.current_range(inputs, training)
        y = tf.quantization.fake_quant_with_min_max_vars(inputs, range_min, range_max,
                                                         num_bits=8, narrow_range=False)
        scale = (range_max - range_min) / 255.0
        level = tf.stop_gradient(tf.round(y / scale))   # q − z, an integer
        out = tf.where(level >= 0.0, level, tf.floor(level * self.alpha + 0.5))
        leaky = tf.nn.leaky_relu(y, self.alpha)
        return leaky + tf.stop_gradient(out * scale - leaky)

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config


@keras.utils.register_keras_serializable(package="qil_keras")
class AveragePooling2DInt8(FakeQuant8):
    """AveragePooling2D as TFLite's int8 AVERAGE_POOL_2D computes it.

    The kernel keeps its input's grid and averages the raw int8 values of the
    window's valid positions, ``q = (Σ q_i ± n/2) / n`` in C integer division
    (halves away from zero), ``n`` the count of valid positions (fewer than the
    pool at a ``"same"`` border). This layer quantizes its input to an 8-bit
    grid (tracked as ``FakeQuant8`` tracks it), then computes exactly that
    on the grid's integers, with a straight-through gradient of the plain
    average. Used where windows cross the border; whole windows export as a
    depthwise conv instead.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = tuple(int(v) for v in np.broadcast_to(pool_size, (2,)))
        self.strides = tuple(int(v) for v in np.broadcast_to(
            self.pool_size if strides is None else strides, (2,)))
        self.padding = str(padding).lower()

    def call(self, inputs, training=None):
        range_min, range_max = self.current_range(inputs, training)
        y = tf.quantization.fake_quant_with_min_max_vars(inputs, range_min, range_max,
                                                         num_bits=8, narrow_range=False)
        # The nudged grid of fake_quant: scale, integer zero point, raw int8 levels.
        scale = (range_max - range_min) / 255.0
        zero = tf.clip_by_value(-128.0 + tf.floor(-range_min / scale + 0.5), -128.0, 127.0)
        q = tf.stop_gradient(tf.round(y / scale) + zero)
        pool = dict(ksize=self.pool_size, strides=self.strides, padding=self.padding.upper())
        ones = tf.ones_like(q[..., :1])
        count = tf.round(tf.nn.conv2d(ones, tf.ones(self.pool_size + (1, 1)), self.strides,
                                      self.padding.upper()))
        total = tf.round(tf.nn.avg_pool2d(q, **pool) * count)
        level = tf.sign(total) * tf.floor((tf.abs(total) + tf.floor(count / 2.0)) / count)
        mean = tf.nn.avg_pool2d(y, **pool)
        return mean + tf.stop_gradient((level - zero) * scale - mean)

    def compute_output_shape(self, input_shape):
        return keras.layers.AveragePooling2D(self.pool_size, self.strides,
                                             self.padding).compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=list(self.pool_size), strides=list(self.strides),
                      padding=self.padding)
        return config

