"""Tests of the QIL layers, driven by one table of (QIL layer, Keras parent) pairs.

Conventions (see qil_keras.ops): a weight layer's quantized kernel is ``k · s``
with integer levels ``|k| ≤ q_W = 2^(b-1) - 1`` and step ``s = 2d'/q_W``; an
activation is ``k · s`` with ``0 ≤ k ≤ q_X = 2^b - 1`` and ``s = 2d'/q_X``.
Tolerances are float32 round-off (relative 1e-6 / 1e-5) or fractions of one
quantization step, never a generic loose ``atol``.
"""

import inspect
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

import qil_keras
from qil_keras import (
    FakeQuant8,
    QILActivation,
    QILActivationQuantizer,
    QILConv2D,
    QILDense,
    QILDepthwiseConv2D,
    QILWeightQuantizer,
    keras,
)
from qil_keras._keras import tf

EXTRA_KEYS = ("w_bits", "per_channel", "train_gamma")

# (QIL layer, Keras parent, minimal kwargs, input shape incl. batch,
#  name of the quantized kernel attribute, per-channel parameter shape).
LAYER_CASES = [
    (QILConv2D, keras.layers.Conv2D, dict(filters=4, kernel_size=3),
     (2, 6, 6, 3), "kernel", (4,)),
    (QILDepthwiseConv2D, keras.layers.DepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2),
     (2, 6, 6, 3), "depthwise_kernel", (3, 2)),
    (QILDense, keras.layers.Dense, dict(units=5),
     (2, 7), "kernel", (5,)),
]
LAYER_IDS = [case[0].__name__ for case in LAYER_CASES]

# A non-default value for every argument of each parent's __init__ (and the
# base-Layer keyword arguments), so parity covers the whole signature. A
# Keras release that adds an argument makes test_signature_parity fail until
# the argument is added here.
_COMMON_FULL = dict(
    activation="relu", use_bias=True, bias_initializer="ones",
    bias_regularizer="l1", activity_regularizer="l2", bias_constraint="non_neg",
    trainable=False, dtype="float64",
)
FULL_KWARGS = {
    QILConv2D: dict(
        filters=3, kernel_size=(3, 2), strides=(2, 1), padding="same",
        data_format="channels_last", dilation_rate=(1, 1), groups=1,
        kernel_initializer="he_normal", kernel_regularizer="l2",
        kernel_constraint="max_norm", **_COMMON_FULL,
    ),
    QILDepthwiseConv2D: dict(
        kernel_size=(2, 3), strides=(1, 2), padding="same", depth_multiplier=3,
        data_format="channels_last", dilation_rate=(1, 1),
        depthwise_initializer="he_normal", depthwise_regularizer="l2",
        depthwise_constraint="max_norm", **_COMMON_FULL,
    ),
    QILDense: dict(
        units=6, kernel_initializer="he_normal", kernel_regularizer="l2",
        kernel_constraint="max_norm", **_COMMON_FULL,
    ),
}
QIL_EXTRAS = dict(w_bits=3, per_channel=True, train_gamma=False)


def _short_name(variable):
    """``'qil_conv2d/kernel_c:0'`` -> ``'kernel_c'``."""
    return variable.name.split("/")[-1].split(":")[0]


def _built(qil_cls, kwargs, input_shape, **extras):
    layer = qil_cls(**kwargs, **extras)
    layer.build(input_shape)
    return layer


def _random_input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def digits():
    """sklearn digits as ``(X, y)``: X in [0, 1], shape (N, 8, 8, 1); y sparse labels."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    return x, data.target.astype(np.int32)


# 1. Signature and config parity ------------------------------------------------


@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_signature_parity(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape):
    """Every parent __init__ argument (by name and by position) plus the QIL extras binds."""
    qil_sig = inspect.signature(qil_cls.__init__)
    parent_params = [
        p for p in inspect.signature(parent_cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    for extra in EXTRA_KEYS:
        assert extra in qil_sig.parameters, f"{qil_cls.__name__} lacks {extra}"
        assert qil_sig.parameters[extra].kind == inspect.Parameter.KEYWORD_ONLY
    full = FULL_KWARGS[qil_cls]
    missing = [p.name for p in parent_params if p.name not in full]
    assert not missing, f"FULL_KWARGS lacks new {parent_cls.__name__} arguments {missing}"
    # By keyword: each parent argument binds to the QIL signature ...
    for p in parent_params:
        qil_sig.bind_partial(None, **{p.name: full[p.name]})
    qil_sig.bind(None, **full, **QIL_EXTRAS)
    # ... and by position, in the parent's order.
    positional = [full[p.name] for p in parent_params]
    base_kwargs = {k: v for k, v in full.items() if k not in {p.name for p in parent_params}}
    qil_sig.bind(None, *positional, **base_kwargs, **QIL_EXTRAS)
    layer = qil_cls(*positional, **base_kwargs, **QIL_EXTRAS)
    assert layer.get_config() == qil_cls(**full, **QIL_EXTRAS).get_config() | {
        "name": layer.name
    }


@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_config_parity(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape):
    """get_config minus w_bits/per_channel/train_gamma equals the parent's (apart from name)."""
    full = FULL_KWARGS[qil_cls]
    config = qil_cls(**full, **QIL_EXTRAS).get_config()
    parent_config = parent_cls(**full).get_config()
    assert {k: config[k] for k in EXTRA_KEYS} == QIL_EXTRAS
    stripped = {k: v for k, v in config.items() if k not in EXTRA_KEYS + ("name",)}
    parent_config.pop("name")
    assert stripped == parent_config


# 2. Forward pass -----------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("w_bits", [2, 3, 4, 8])
@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_forward(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape, w_bits, per_channel):
    """Quantized kernel = levels·scale on the b-bit grid; output = parent with that kernel."""
    keras.utils.set_random_seed(w_bits)
    layer = _built(qil_cls, kwargs, shape, w_bits=w_bits, per_channel=per_channel)
    layer.bias.assign(np.linspace(-0.5, 0.5, layer.bias.shape[0]).astype(np.float32))
    layer.initialize_interval()
    q_w = 2 ** (w_bits - 1) - 1

    kernel = layer.quantized_kernel().numpy()
    levels = layer.integer_levels()
    scale = np.asarray(layer.weight_scale(), np.float32)
    assert levels.dtype == np.int32 and levels.shape == kernel.shape
    assert scale.shape == (pc_shape if per_channel else ())
    np.testing.assert_allclose(kernel, levels * scale, rtol=1e-6, atol=0)
    assert np.abs(levels).max() <= q_w
    assert np.unique(levels).size <= 2 * q_w + 1
    # The MSE-optimal interval uses the grid: the top level is reached somewhere.
    assert np.abs(levels).max() == q_w

    x = _random_input(shape)
    parent = parent_cls(**kwargs)
    parent.build(shape)
    getattr(parent, kattr).assign(kernel)
    parent.bias.assign(layer.bias)
    expected = parent(x).numpy()
    actual = layer(x).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, layer(inputs))
    weights = qil_keras.quantized_weights(model)
    assert list(weights) == [layer.name]
    qw = weights[layer.name]
    assert qw.bits == w_bits
    np.testing.assert_array_equal(qw.levels, levels)
    np.testing.assert_array_equal(qw.scale, scale)
    np.testing.assert_allclose(qw.values, kernel, rtol=1e-6, atol=0)


# 3. Trainable state --------------------------------------------------------------


@pytest.mark.parametrize("train_gamma", [True, False], ids=["gamma_trained", "gamma_fixed"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_trainable_state(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape, per_channel,
                         train_gamma):
    """c, d (and γ unless train_gamma=False) train; bits does not; per-channel shapes."""
    layer = _built(qil_cls, kwargs, shape, per_channel=per_channel, train_gamma=train_gamma)
    trainable = {_short_name(v) for v in layer.trainable_weights}
    frozen = {_short_name(v) for v in layer.non_trainable_weights}
    gamma = f"{kattr}_gamma"
    expected = {kattr, "bias", f"{kattr}_c", f"{kattr}_d"} | ({gamma} if train_gamma else set())
    assert trainable == expected
    assert frozen == {f"{kattr}_bits"} | (set() if train_gamma else {gamma})
    by_name = {_short_name(v): v for v in layer.weights}
    assert by_name[f"{kattr}_bits"].dtype == tf.int32
    assert int(by_name[f"{kattr}_bits"].numpy()) == 4
    param_shape = pc_shape if per_channel else ()
    for suffix in ("c", "d", "gamma"):
        assert tuple(by_name[f"{kattr}_{suffix}"].shape) == param_shape
    # The training step sees gradients for exactly the trainable interval variables.
    x = _random_input(shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x)))
    grads = dict(zip(sorted(trainable), tape.gradient(
        loss, [by_name[n] for n in sorted(trainable)])))
    assert all(g is not None for g in grads.values())


# 4. set_bits -----------------------------------------------------------------------


@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_set_bits(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape):
    """4 -> 2 bits keeps c, d, γ, reaches a traced tf.function without retracing."""
    keras.utils.set_random_seed(1)
    layer = _built(qil_cls, kwargs, shape, w_bits=4)
    layer.initialize_interval()
    q = layer.kernel_quantizer_vars
    q["gamma"].assign(0.8 * np.ones(q["gamma"].shape, np.float32))  # not at its init value
    before = {key: q[key].numpy().copy() for key in ("c", "d", "gamma")}
    x = _random_input(shape)
    traces = []

    @tf.function
    def forward(inputs):
        traces.append(1)
        return layer(inputs), layer.quantized_kernel()

    _, kernel4 = forward(x)
    assert 3 < np.unique(kernel4.numpy()).size <= 15
    layer.set_bits(2)
    out2, kernel2 = forward(x)
    assert len(traces) == 1, "set_bits retraced the tf.function"
    assert np.unique(kernel2.numpy()).size <= 3
    assert set(np.unique(layer.integer_levels())) <= {-1, 0, 1}
    np.testing.assert_array_equal(kernel2.numpy(), layer.quantized_kernel().numpy())
    np.testing.assert_allclose(out2.numpy(), layer(x).numpy(), rtol=1e-6, atol=1e-6)
    for key, value in before.items():
        np.testing.assert_array_equal(q[key].numpy(), value)
    assert layer.w_bits == 2
    assert layer.get_config()["w_bits"] == 2


@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_set_bits_before_build(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape):
    """set_bits on a layer not yet built takes effect when it is built."""
    layer = qil_cls(**kwargs, w_bits=4)
    layer.set_bits(2)
    assert layer.get_config()["w_bits"] == 2
    layer.build(shape)
    assert layer.w_bits == 2


@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_fresh_layer_not_dead(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape):
    """A freshly built 2-bit layer (no initialize_interval) has a non-zero kernel."""
    # Default c = d = 0.5 gives u = |w| and, at 2 bits (q_W = 1), k = round(|w|): every weight
    # below 0.5 becomes 0. Glorot-uniform weights here are all below 0.5 (limit
    # sqrt(6 / (fan_in + fan_out)) = 0.31 for the conv, 0.37 for the depthwise), so the kernel is
    # all zeros and the layer and everything before it get no gradient: the small model of
    # test_save_load_round_trip, built without initialize_interval(), does not train at all.
    keras.utils.set_random_seed(0)
    layer = _built(qil_cls, kwargs, shape, w_bits=2)
    assert np.any(layer.integer_levels() != 0)


def test_activation_set_bits_before_build():
    """QILActivation.set_bits on a layer not yet built takes effect when it is built."""
    layer = QILActivation(4)
    layer.set_bits(2)
    layer.build((None, 3))
    assert layer.a_bits == 2 and layer.get_config()["a_bits"] == 2


# 5. QILActivation ------------------------------------------------------------------


@pytest.mark.parametrize("a_bits", [2, 3, 4, 8])
def test_activation_levels(digits, a_bits):
    """At most 2^b outputs, all multiples of step(); 0 -> 0; negatives -> 0; c == d after init."""
    x = np.concatenate([digits[0][:200], np.linspace(0.0, 1.5, 64, dtype=np.float32)
                        .reshape(1, 8, 8, 1)])
    layer = QILActivation(a_bits)
    layer.build(x.shape)
    layer.initialize_interval(x)
    c, d = layer.quantizer_vars["c"].numpy(), layer.quantizer_vars["d"].numpy()
    assert c == d and d > 0
    assert layer.interval() == (float(c), float(d))

    out = layer(x).numpy()
    step = float(layer.step())
    np.testing.assert_allclose(step, 2 * d / (2**a_bits - 1), rtol=1e-6)
    assert np.unique(out).size <= 2**a_bits
    k = out / step
    np.testing.assert_allclose(k, np.round(k), rtol=0, atol=1e-3)
    assert 0 <= np.round(k).min() and np.round(k).max() <= 2**a_bits - 1
    assert np.all(out[x == 0.0] == 0.0)  # exact zero, not merely small
    assert (x == 0.0).any()
    np.testing.assert_array_equal(layer(-np.abs(x) - 0.01).numpy(), 0.0)
    # Error bounded by half a step inside the interval [0, 2d].
    inside = x <= 2 * d
    assert np.abs(out - x)[inside].max() <= step / 2 + 1e-6


def test_activation_set_bits(digits):
    """QILActivation.set_bits keeps the interval, lowers the level count, updates config; a
    function traced before it holds the old FakeQuant width and refuses to run (the model-level
    qil_keras.set_bits drops a model's traced steps: test_quantize)."""
    x = digits[0][:100]
    layer = QILActivation(4)
    layer.build(x.shape)
    layer.initialize_interval(x)
    c, d = layer.interval()
    forward = tf.function(lambda inputs: layer(inputs))
    assert np.unique(forward(x).numpy()).size > 4
    layer.set_bits(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="traced with 4 bits"):
        forward(x)
    out = tf.function(lambda inputs: layer(inputs))(x).numpy()
    assert np.unique(out).size <= 4
    np.testing.assert_array_equal(out, layer(x).numpy())
    assert layer.interval() == (c, d)
    assert layer.a_bits == 2 and layer.get_config()["a_bits"] == 2
    np.testing.assert_allclose(layer.step(), 2 * d / 3, rtol=1e-6)


# 6. FakeQuant8 ------------------------------------------------------------------------


def _batch_stats(x):
    """Range FakeQuant8 derives from a batch: its min and max, widened to include 0."""
    return min(float(x.min()), 0.0), max(float(x.max()), 0.0)


@pytest.mark.parametrize("shift", [-0.3, 0.2, -1.5], ids=["mixed", "positive", "negative"])
def test_fakequant8_training_tracks_batch(digits, shift):
    """First training call sets the range to the batch range; later calls follow the EMA."""
    x1 = digits[0][:32] + shift
    x2 = 2.0 * digits[0][32:64] + shift
    layer = FakeQuant8(ema_decay=0.9)
    out = layer(x1, training=True).numpy()
    lo1, hi1 = _batch_stats(x1)
    np.testing.assert_allclose(layer.range_min.numpy(), lo1, rtol=1e-6, atol=0)
    np.testing.assert_allclose(layer.range_max.numpy(), hi1, rtol=1e-6, atol=0)
    assert (layer.range_min.numpy() == 0.0) == (shift > 0)  # widened to include 0
    assert (layer.range_max.numpy() == 0.0) == (shift < -1)
    assert int(layer.num_updates.numpy()) == 1
    assert np.unique(out).size <= 256
    step = (hi1 - lo1) / 255  # nudging moves each end by at most one step
    assert out.min() >= lo1 - step and out.max() <= hi1 + step

    layer(x2, training=True)
    lo2, hi2 = _batch_stats(x2)
    np.testing.assert_allclose(layer.range_min.numpy(), 0.9 * lo1 + 0.1 * lo2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.range_max.numpy(), 0.9 * hi1 + 0.1 * hi2, rtol=1e-5, atol=1e-7)
    # Inference now uses the tracked range and leaves it alone.
    frozen = layer.range_min.numpy(), layer.range_max.numpy()
    expected = tf.quantization.fake_quant_with_min_max_vars(x2, *frozen, num_bits=8)
    np.testing.assert_array_equal(layer(x2, training=False).numpy(), expected.numpy())
    assert (layer.range_min.numpy(), layer.range_max.numpy()) == frozen


def test_fakequant8_inference_before_training(digits):
    """Before any training call, inference quantizes with the batch's own range."""
    x = digits[0][:16] - 0.25
    layer = FakeQuant8()
    out = layer(x, training=False).numpy()
    lo, hi = _batch_stats(x)
    expected = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8).numpy()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert np.unique(out).size <= 256
    assert int(layer.num_updates.numpy()) == 0
    assert layer.range_min.numpy() == 0.0 and layer.range_max.numpy() == 0.0


def test_fakequant8_quantization_params(digits):
    """(scale, zero_point) reproduce the range the fake quantizer nudges to."""
    x = digits[0][:32] - 0.3
    layer = FakeQuant8()
    layer(x, training=True)
    lo, hi = float(layer.range_min.numpy()), float(layer.range_max.numpy())
    scale, zero_point = layer.quantization_params()
    assert isinstance(zero_point, int) and -128 <= zero_point <= 127
    np.testing.assert_allclose(scale, (hi - lo) / 255, rtol=1e-6)
    # int8 q in [-128, 127] represents (q - zero_point) * scale; the fake quantizer's
    # nudged range ends are exactly those of q = -128 and q = 127, and 0 is exact.
    ends = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant([lo - 1.0, hi + 1.0, 0.0]), lo, hi, num_bits=8).numpy()
    np.testing.assert_allclose(
        ends, [(-128 - zero_point) * scale, (127 - zero_point) * scale, 0.0],
        rtol=0, atol=1e-3 * scale)
    assert abs(lo - (-128 - zero_point) * scale) <= scale / 2 + 1e-7


def test_fakequant8_zero_point_rounds_ties_as_fakequant_does():
    """Issue #15 item 1: range [-2.5, 252.5] has scale 1 and an unsigned zero point of exactly
    2.5, which FakeQuant rounds to 3 (half away from zero): nudged minimum -3, int8 zero
    point -125. Half-to-even rounding would give -126, one step off."""
    layer = FakeQuant8()
    layer.build((None, 1))
    layer.range_min.assign(-2.5)
    layer.range_max.assign(252.5)
    layer.num_updates.assign(1)
    scale, zero_point = layer.quantization_params()
    assert scale == 1.0 and zero_point == -125
    nudged_min = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant([-10.0]), -2.5, 252.5, num_bits=8).numpy()[0]
    assert nudged_min == (-128 - zero_point) * scale == -3.0


def test_fakequant8_quantization_params_constant_zero():
    """A tensor that is always 0 (e.g. a dead ReLU) still gets a finite, positive scale."""
    layer = FakeQuant8()
    out = layer(np.zeros((4, 3), np.float32), training=True)
    np.testing.assert_array_equal(out.numpy(), 0.0)
    scale, zero_point = layer.quantization_params()
    assert np.isfinite(scale) and scale > 0
    assert -128 <= zero_point <= 127


# 7. Config / JSON / registered-name round trips ---------------------------------------


PUBLIC_OBJECTS = [
    lambda: QILConv2D(4, 3, w_bits=3, per_channel=True, train_gamma=False, name="conv"),
    lambda: QILDepthwiseConv2D(3, depth_multiplier=2, w_bits=2, per_channel=True),
    lambda: QILDense(5, w_bits=8, activation="relu"),
    lambda: QILActivation(3, name="act"),
    lambda: FakeQuant8(ema_decay=0.95),
    lambda: QILWeightQuantizer(3, per_channel=True, train_gamma=False, channel_axes=(-2, -1)),
    lambda: QILActivationQuantizer(5),
]
PUBLIC_IDS = ["QILConv2D", "QILDepthwiseConv2D", "QILDense", "QILActivation", "FakeQuant8",
              "QILWeightQuantizer", "QILActivationQuantizer"]


@pytest.mark.parametrize("make", PUBLIC_OBJECTS, ids=PUBLIC_IDS)
def test_config_json_round_trip(make):
    """get_config -> JSON -> from_config -> get_config is the identity."""
    obj = make()
    cfg = obj.get_config()
    restored = type(obj).from_config(json.loads(json.dumps(cfg)))
    assert type(restored) is type(obj)
    assert restored.get_config() == cfg


@pytest.mark.parametrize("make", PUBLIC_OBJECTS, ids=PUBLIC_IDS)
def test_registered_name_round_trip(make):
    """serialize/deserialize_keras_object resolves 'qil_keras>Class' without custom_objects."""
    obj = make()
    name = type(obj).__name__
    assert keras.utils.get_registered_name(type(obj)) == f"qil_keras>{name}"
    assert keras.utils.get_registered_object(f"qil_keras>{name}") is type(obj)
    serialized = json.loads(json.dumps(keras.utils.serialize_keras_object(obj)))
    assert serialized["registered_name"] == f"qil_keras>{name}"
    restored = keras.utils.deserialize_keras_object(serialized)
    assert type(restored) is type(obj)
    assert restored.get_config() == obj.get_config()


# 8. Save / load in .keras, .h5 and SavedModel -------------------------------------------


def _small_model():
    inputs = keras.Input((8, 8, 1))
    x = QILConv2D(4, 3, padding="same", w_bits=3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = QILActivation(3, name="act3")(x)
    x = QILDepthwiseConv2D(3, w_bits=2, per_channel=True, name="dw")(x)
    x = keras.layers.ReLU()(x)
    x = QILActivation(2, name="act2")(x)
    x = keras.layers.Flatten()(x)
    x = FakeQuant8(name="fq")(x)
    outputs = QILDense(10, w_bits=8, name="dense")(x)
    return keras.Model(inputs, outputs)


def _compile(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


@pytest.fixture(scope="module")
def trained(digits):
    """The small model after 2 epochs on digits, with its initial interval values."""
    keras.utils.set_random_seed(0)
    x, y = digits
    model = _small_model()
    for name in ("conv", "dw", "dense"):  # what quantize() does; see test_fresh_layer_not_dead
        model.get_layer(name).initialize_interval()
    _compile(model)
    init = {v.name: v.numpy().copy() for v in model.weights}
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    return model, init


SAVE_FORMATS = [("model.keras", {}), ("model.h5", {}), ("saved_model", {"save_format": "tf"})]


@pytest.mark.slow
@pytest.mark.parametrize("filename, save_kwargs", SAVE_FORMATS, ids=["keras", "h5", "savedmodel"])
def test_save_load_round_trip(trained, digits, tmp_path, filename, save_kwargs):
    """Reloaded model (no custom_objects) has our classes, same bits, same predictions, trains."""
    model, init = trained
    x, y = digits
    # Training moved every interval away from its initial value.
    for layer_name in ("conv", "dw", "dense", "act3", "act2"):
        for v in model.get_layer(layer_name).trainable_weights:
            if _short_name(v).endswith(("_c", "_d")) or _short_name(v) in ("c", "d"):
                assert not np.array_equal(v.numpy(), init[v.name]), v.name
    assert int(model.get_layer("fq").num_updates.numpy()) > 0

    path = str(tmp_path / filename)
    model.save(path, **save_kwargs)
    loaded = keras.models.load_model(path)

    expected_types = {"conv": (QILConv2D, "w_bits", 3), "dw": (QILDepthwiseConv2D, "w_bits", 2),
                      "dense": (QILDense, "w_bits", 8), "act3": (QILActivation, "a_bits", 3),
                      "act2": (QILActivation, "a_bits", 2), "fq": (FakeQuant8, None, None)}
    for layer_name, (cls, attr, bits) in expected_types.items():
        layer = loaded.get_layer(layer_name)
        assert type(layer) is cls, f"{layer_name}: {type(layer)}"
        if attr:
            assert getattr(layer, attr) == bits
            assert layer.get_config()[attr] == bits
    assert loaded.get_layer("dw").kernel_quantizer.per_channel
    for original, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(restored.numpy(), original.numpy())

    np.testing.assert_array_equal(loaded.predict(x[:256], verbose=0),
                                  model.predict(x[:256], verbose=0))

    conv = loaded.get_layer("conv")
    c_var, d_var = conv.kernel_quantizer_vars["c"], conv.kernel_quantizer_vars["d"]
    trainable_ids = {id(v) for v in loaded.trainable_weights}
    assert id(c_var) in trainable_ids and id(d_var) in trainable_ids
    # A clear distance from c = d' (where the lower threshold reflects) so that "c changes"
    # tests the reloaded variable's link to the training step on one side of the reflection.
    c_var.assign(1.25 * d_var)
    c0, d0 = c_var.numpy().copy(), d_var.numpy().copy()
    _compile(loaded)
    loaded.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert c_var.numpy() != c0
    assert d_var.numpy() != d0


# 9. Bad bit widths ---------------------------------------------------------------------


@pytest.mark.parametrize("bits, error", [(1, ValueError), (9, ValueError), (2.5, TypeError),
                                         (True, TypeError)], ids=["1", "9", "2.5", "True"])
@pytest.mark.parametrize("qil_cls, parent_cls, kwargs, shape, kattr, pc_shape", LAYER_CASES,
                         ids=LAYER_IDS)
def test_bad_bits(qil_cls, parent_cls, kwargs, shape, kattr, pc_shape, bits, error):
    """Bit widths outside the integers 2..8 raise an error naming the range 2 to 8."""
    with pytest.raises(error, match="2 to 8"):
        qil_cls(**kwargs, w_bits=bits)
    layer = _built(qil_cls, kwargs, shape, w_bits=4)
    with pytest.raises(error, match="2 to 8"):
        layer.set_bits(bits)
    assert layer.w_bits == 4


@pytest.mark.parametrize("bits, error", [(1, ValueError), (9, ValueError), (2.5, TypeError),
                                         (True, TypeError)], ids=["1", "9", "2.5", "True"])
def test_bad_bits_activation(bits, error):
    """QILActivation rejects the same bit widths with the same message."""
    with pytest.raises(error, match="2 to 8"):
        QILActivation(bits)


def test_bad_bits_conv_positional():
    """The brief's case: QILConv2D(4, 3, w_bits=...) names the range 2 to 8."""
    for bits in (1, 9, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="2 to 8"):
            QILConv2D(4, 3, w_bits=bits)


def test_numpy_integer_bits_accepted():
    """numpy integers are valid bit widths (e.g. from a config loaded by numpy)."""
    layer = QILConv2D(4, 3, w_bits=np.int64(3))
    assert layer.get_config()["w_bits"] == 3
    assert type(layer.get_config()["w_bits"]) is int


def test_leaky_relu_int8_computes_xnnpacks_leaky_relu_on_every_level():
    """XNNPACK's qs8-vlrelu with output grid = input grid: ``(z·256 + 128 + x·M) >> 8`` for the
    input level ``x = q − z``, ``M = 256`` for ``x ≥ 0`` and ``lrintf(256·α)`` below. Every one
    of the 256 input levels, the tie included (α = 26/256: x = −64 gives −6.5, which the shift
    rounds up to −6)."""
    from qil_keras.quantization.layers import LeakyReLUInt8

    layer = LeakyReLUInt8(0.1)
    assert layer.alpha == 26 / 256
    layer.build((None, 256))
    layer.range_min.assign(-2.0)
    layer.range_max.assign(2.0)
    layer.num_updates.assign(1)
    scale, zero = layer.quantization_params()
    levels = np.arange(-128, 128) - zero                       # x = q − z, every int8 value
    out = np.asarray(layer(((levels * scale)[None]).astype(np.float32)))[0]
    got = np.rint(out / scale).astype(int)
    m = np.where(levels >= 0, 256, 26)
    want = ((zero * 256 + 128 + levels * m) >> 8) - zero       # arithmetic shift: floor
    np.testing.assert_array_equal(got, want)
    assert got[levels == -64][0] == -6   # the tie
    assert LeakyReLUInt8.from_config(layer.get_config()).alpha == 26 / 256
