"""QILQuantizeConfig inside tfmot's quantize_annotate_layer / quantize_apply pipeline.

Real data: scikit-learn's 8x8 digits (1797 images, pixel values 0..16 scaled to
[0, 1]). The reference network is Conv(3x3, 8)-BN-ReLU-MaxPool-Flatten-Dense(10)
with the conv, the ReLU and the Dense annotated with QILQuantizeConfig(3, 3).
"""

import inspect
import json
import re

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
from sklearn.datasets import load_digits
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_layout_transform,
)

from qil_keras._keras import keras, tf
from qil_keras.quantization.init import interval_from_values
from qil_keras.quantization.layers import FakeQuant8, QILActivation, QILConv2D, QILDense
from qil_keras.quantization.quantizers import QILActivationQuantizer, QILWeightQuantizer
from qil_keras.quantization.tfmot_config import (
    _DEFAULT_TRANSFORMS,
    QILQuantizeConfig,
    initialize_intervals,
    quantize_apply,
    quantize_scope,
)

qk = tfmot.quantization.keras
annotate = qk.quantize_annotate_layer
BITS = 3


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    return x, data.target.astype(np.int32)


def build_annotated(bits=BITS):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = annotate(keras.layers.Conv2D(8, 3, padding="same", name="conv"),
                 QILQuantizeConfig(bits, bits))(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = annotate(keras.layers.ReLU(name="relu"), QILQuantizeConfig(bits, bits))(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = annotate(keras.layers.Dense(10, name="dense"), QILQuantizeConfig(bits, bits))(h)
    return keras.Model(inputs, outputs)


def tfmot_apply(model):
    """tfmot's own quantize_apply with its default scheme, as a tfmot user calls it."""
    with quantize_scope():
        return qk.quantize_apply(model)


def quantize_layer(model):
    """tfmot's input QuantizeLayer (its name is numbered per session)."""
    layers = [lyr for lyr in model.layers if type(lyr).__name__ == "QuantizeLayer"]
    assert len(layers) == 1
    return layers[0]


def var(layer, short_name):
    """The variable of ``layer`` whose name ends in ``/short_name:0``."""
    matches = [w for w in layer.weights if w.name.endswith(f"/{short_name}:0")]
    assert len(matches) == 1, (short_name, [w.name for w in layer.weights])
    return matches[0]


INTERVALS = [("quant_conv", "kernel_c"), ("quant_conv", "kernel_d"),
             ("quant_conv", "kernel_gamma"), ("quant_relu", "output_c"),
             ("quant_relu", "output_d"), ("quant_dense", "kernel_c"),
             ("quant_dense", "kernel_d")]


def interval_values(model):
    return {(lyr, n): var(model.get_layer(lyr), n).numpy().copy() for lyr, n in INTERVALS}


@pytest.fixture(scope="module")
def trained(digits):
    """The reference network, quantized by tfmot, initialized, trained 3 epochs."""
    x, y = digits
    model = tfmot_apply(build_annotated())
    sources = initialize_intervals(model, calibration_data=x[:256])
    initial = interval_values(model)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, epochs=3, batch_size=64, verbose=0)
    return model, sources, initial, history


# -- (a) tfmot pipeline: structure, initialization, training, saving -------------------


def test_quantize_apply_keeps_batchnorm_and_wraps_annotated_layers():
    model = tfmot_apply(build_annotated())
    kinds = {layer.name: type(layer).__name__ for layer in model.layers}
    # The default scheme adds an 8-bit QuantizeLayer after the input; nothing is
    # folded: the BatchNormalization stays a float layer between conv and ReLU.
    assert kinds[quantize_layer(model).name] == "QuantizeLayer"
    assert kinds["bn"] == "BatchNormalization"
    for name in ("quant_conv", "quant_relu", "quant_dense"):
        assert kinds[name] == "QuantizeWrapperV2"
        assert model.get_layer(name).quantize_config == QILQuantizeConfig(BITS, BITS)
    trainable = {w.name for w in model.trainable_weights}
    for layer in ("quant_conv", "quant_dense"):
        for key in ("kernel_c", "kernel_d", "kernel_gamma"):
            assert f"{layer}/{key}:0" in trainable
        assert f"{layer}/kernel_bits:0" not in trainable
    assert {"quant_relu/output_c:0", "quant_relu/output_d:0"} <= trainable
    assert "quant_relu/output_bits:0" not in trainable


def test_initialize_intervals(trained):
    model, sources, initial, _ = trained
    assert sources == {
        "quant_conv/kernel": "MSE-optimal range of the float kernel",
        "quant_dense/kernel": "MSE-optimal range of the float kernel",
        f"{quantize_layer(model).name}/input": "calibration batch (tfmot min/max range)",
        "quant_relu/output": "calibration batch",
    }
    # Weight intervals: c = d = h/2 for the MSE-optimal range h of the kernel
    # that quantize_apply copied (checked on a fresh copy: `trained` has moved on).
    fresh = tfmot_apply(build_annotated())
    initialize_intervals(fresh)
    kernel = var(fresh.get_layer("quant_conv"), "kernel").numpy()
    c, d = interval_from_values(kernel, 2 ** (BITS - 1) - 1)
    np.testing.assert_allclose(var(fresh.get_layer("quant_conv"), "kernel_c").numpy(), c)
    np.testing.assert_allclose(var(fresh.get_layer("quant_conv"), "kernel_d").numpy(), d)
    # Without calibration data, activation intervals default to [0, 6].
    assert var(fresh.get_layer("quant_relu"), "output_c").numpy() == pytest.approx(3.0)
    assert var(fresh.get_layer("quant_relu"), "output_d").numpy() == pytest.approx(3.0)
    # With it, the input range is the data's [0, 1] and the ReLU interval comes
    # from the calibration batch (c = d, well inside (0, 6)).
    assert initial[("quant_relu", "output_c")] == initial[("quant_relu", "output_d")]
    assert 0.05 < initial[("quant_relu", "output_c")] < 3.0


def test_fit_trains_intervals(trained, digits):
    model, _, initial, history = trained
    x, y = digits
    moved = interval_values(model)
    for key in INTERVALS:
        assert not np.allclose(moved[key], initial[key]), key
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    _, accuracy = model.evaluate(x, y, verbose=0)
    assert accuracy > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_save_load_full_model(trained, digits, tmp_path, fmt):
    model, *_ = trained
    x, _ = digits
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "model_tf"))
    model.save(path, **({"save_format": "tf"} if fmt == "savedmodel" else {}))
    with quantize_scope():
        restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(x[:128], verbose=0),
                                  model.predict(x[:128], verbose=0))
    assert isinstance(restored.get_layer("quant_conv").quantize_config, QILQuantizeConfig)


@pytest.mark.parametrize("filename", ["model.weights.h5", "ckpt"])
def test_save_load_weights(trained, digits, tmp_path, filename):
    model, *_ = trained
    x, _ = digits
    path = str(tmp_path / filename)
    model.save_weights(path)
    fresh = tfmot_apply(build_annotated())
    status = fresh.load_weights(path)
    if status is not None:  # TF checkpoint: the optimizer slots are not restored
        status.expect_partial()
    np.testing.assert_array_equal(fresh.predict(x[:128], verbose=0),
                                  model.predict(x[:128], verbose=0))


def test_keras_format_fails_on_tfmot_quantize_layer(trained, tmp_path):
    """Known tfmot 0.8.1 bug (tfmot PR #1123): its QuantizeLayer is built twice on load."""
    model, *_ = trained
    path = str(tmp_path / "model.keras")
    model.save(path)
    with quantize_scope(), pytest.raises(
            ValueError, match=rf"Layer '{quantize_layer(model).name}' expected 5 variables, "
                              "but received 3"):
        keras.models.load_model(path)


def test_keras_format_works_without_tfmot_quantize_layers(digits, tmp_path):
    """Only QIL-configured wrappers (no input QuantizeLayer): .keras round-trips."""
    x, _ = digits
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.ZeroPadding2D(name="pad")(inputs)  # not annotated: no QuantizeLayer
    h = annotate(keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                 QILQuantizeConfig(BITS, BITS))(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = annotate(keras.layers.Dense(10, name="dense"), QILQuantizeConfig(BITS, BITS))(h)
    model = quantize_apply(keras.Model(inputs, h))
    initialize_intervals(model, x[:64])
    path = str(tmp_path / "model.keras")
    model.save(path)
    with quantize_scope():
        restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(x[:64], verbose=0),
                                  model.predict(x[:64], verbose=0))


# -- (b) the quantized values lie on the QIL grid ---------------------------------------


def test_weight_and_activation_grids(trained, digits):
    model, *_ = trained
    x, _ = digits
    wrapper = model.get_layer("quant_conv")
    (kernel, quantizer, variables), = wrapper._weight_vars
    assert isinstance(quantizer, QILWeightQuantizer)
    q_kernel = quantizer(kernel, False, variables).numpy()
    step = float(quantizer.step(variables))
    levels = q_kernel / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # integer multiples
    assert len(np.unique(np.round(levels))) <= 2 * (2 ** (BITS - 1) - 1) + 1  # 7 at 3 bits
    assert np.abs(np.round(levels)).max() <= 2 ** (BITS - 1) - 1

    relu = model.get_layer("quant_relu")
    out = keras.Model(model.inputs, relu.output).predict(x[:256], verbose=0)
    a_step = float(relu._output_quantizers[0].step(relu._output_quantizer_vars))
    a_levels = out / a_step
    np.testing.assert_allclose(a_levels, np.round(a_levels), atol=1e-4)
    distinct = np.unique(np.round(a_levels))
    assert len(distinct) <= 2 ** BITS and distinct.min() >= 0 and distinct.max() <= 2 ** BITS - 1


# -- (c) the tfmot path computes the same function as the native qil_keras layers ------


def build_native(bits=BITS):
    inputs = keras.Input((8, 8, 1))
    h = FakeQuant8(name="input_q")(inputs)  # tfmot's 8-bit input QuantizeLayer
    h = QILConv2D(8, 3, padding="same", w_bits=bits, name="conv")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = QILActivation(bits, name="relu_q")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = QILDense(10, w_bits=bits, name="dense")(h)
    return keras.Model(inputs, outputs)


def test_same_outputs_as_native_layers(trained, digits):
    """Both paths compute the same function: agreement within 1e-5 relative.

    Copied: the input range, kernels, biases, BN weights and statistics, and the
    trained c, d, γ of every quantizer (γ ≠ 1 after training, so the γ path is
    exercised).
    """
    model, *_ = trained
    x, _ = digits
    native = build_native()
    input_q = quantize_layer(model).quantizer_vars
    native.get_layer("input_q").range_min.assign(input_q["min_var"])
    native.get_layer("input_q").range_max.assign(input_q["max_var"])
    native.get_layer("input_q").num_updates.assign(1)
    for name in ("conv", "dense"):
        src, dst = model.get_layer(f"quant_{name}"), native.get_layer(name)
        dst.kernel.assign(var(src, "kernel"))
        dst.bias.assign(var(src, "bias"))
        for key in ("c", "d", "gamma"):
            dst.kernel_quantizer_vars[key].assign(var(src, f"kernel_{key}"))
        assert dst.w_bits == int(var(src, "kernel_bits").numpy()) == BITS
    native.get_layer("bn").set_weights(model.get_layer("bn").get_weights())
    relu_q = native.get_layer("relu_q")
    relu_q.quantizer_vars["c"].assign(var(model.get_layer("quant_relu"), "output_c"))
    relu_q.quantizer_vars["d"].assign(var(model.get_layer("quant_relu"), "output_d"))
    assert abs(float(var(model.get_layer("quant_conv"), "kernel_gamma").numpy()) - 1.0) > 1e-4

    expected = model.predict(x, verbose=0)
    got = native.predict(x, verbose=0)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


# -- (d) serialization of the config -------------------------------------------------------


@pytest.mark.parametrize("config", [QILQuantizeConfig(),
                                    QILQuantizeConfig(3, 2, per_channel=True, train_gamma=False)])
def test_config_round_trip(config):
    as_json = json.dumps(config.get_config())
    restored = QILQuantizeConfig.from_config(json.loads(as_json))
    assert restored.get_config() == config.get_config()
    assert restored == config

    serialized = keras.utils.serialize_keras_object(config)
    assert serialized["registered_name"] == "qil_keras>QILQuantizeConfig"
    again = keras.utils.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert isinstance(again, QILQuantizeConfig) and again == config


def test_scope_contains_qil_objects():
    classes = (QILQuantizeConfig, QILWeightQuantizer, QILActivationQuantizer)
    with quantize_scope():
        for cls in classes:
            assert keras.utils.get_registered_object(cls.__name__) is cls
        # tfmot's own objects are there too
        assert keras.utils.get_registered_object("QuantizeWrapperV2") is not None
    for cls in classes:  # outside the scope only the "qil_keras>" names are registered
        assert keras.utils.get_registered_object(cls.__name__) is None
        assert keras.utils.get_registered_object(f"qil_keras>{cls.__name__}") is cls


# -- (e) what each layer gets, and errors for the rest ---------------------------------------


def built(layer, shape):
    layer.build(shape)
    return layer


def test_layer_table():
    config = QILQuantizeConfig(3, 3, per_channel=True)
    conv = built(keras.layers.Conv2D(4, 3, activation="relu"), (None, 8, 8, 2))
    (weight, quantizer), = config.get_weights_and_quantizers(conv)
    assert weight is conv.kernel and quantizer.channel_axes == (-1,) and quantizer.per_channel
    (activation, a_quantizer), = config.get_activations_and_quantizers(conv)
    assert activation is conv.activation and isinstance(a_quantizer, QILActivationQuantizer)
    assert config.get_output_quantizers(conv) == []

    depthwise = built(keras.layers.DepthwiseConv2D(3, activation="relu6"), (None, 8, 8, 2))
    (weight, quantizer), = config.get_weights_and_quantizers(depthwise)
    assert weight is depthwise.depthwise_kernel and quantizer.channel_axes == (-2, -1)
    # relu6 goes to the output quantizer: tfmot's QuantizeAwareActivation refuses it.
    assert config.get_activations_and_quantizers(depthwise) == []
    assert len(config.get_output_quantizers(depthwise)) == 1

    dense = built(keras.layers.Dense(3, activation="softmax"), (None, 5))
    assert len(config.get_weights_and_quantizers(dense)) == 1
    assert config.get_activations_and_quantizers(dense) == []  # softmax stays float
    assert config.get_output_quantizers(dense) == []

    for relu_layer in (keras.layers.ReLU(), keras.layers.ReLU(max_value=6.0)):
        assert config.get_weights_and_quantizers(relu_layer) == []
        assert len(config.get_output_quantizers(relu_layer)) == 1
    activation_layer = keras.layers.Activation("relu")
    assert len(config.get_activations_and_quantizers(activation_layer)) == 1


@pytest.mark.parametrize("layer, shape, message", [
    (keras.layers.BatchNormalization(name="bn"), (None, 4), r"nothing to quantize in layer 'bn'"),
    (keras.layers.Activation("softmax", name="sm"), None, r"nothing to quantize in layer 'sm'"),
    (keras.layers.Conv1D(2, 3, name="c1"), (None, 8, 2), r"kernel of layer 'c1'.*Conv2D, "),
    (keras.layers.Conv2DTranspose(2, 3, name="ct"), (None, 8, 8, 2), r"'ct'.*laid out"),
    (keras.layers.ReLU(negative_slope=0.1, name="leaky"), None, r"'leaky'.*negative_slope"),
    (QILConv2D(2, 3, name="qil"), (None, 8, 8, 2), r"'qil'.*already a qil_keras QIL layer"),
])
def test_unsupported_layers(layer, shape, message):
    if shape is not None:
        layer.build(shape)
    with pytest.raises(ValueError, match=message):
        QILQuantizeConfig().get_weights_and_quantizers(layer)


def test_initialize_intervals_needs_a_tfmot_model():
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain")
    with pytest.raises(ValueError, match="'plain' has no tfmot QuantizeWrapper"):
        initialize_intervals(plain)


def test_unsupported_layer_through_quantize_apply():
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = annotate(keras.layers.BatchNormalization(name="bn"), QILQuantizeConfig())(h)
    with pytest.raises(ValueError, match=r"nothing to quantize in layer 'bn'.*Remove"):
        quantize_apply(keras.Model(inputs, h))


@pytest.mark.parametrize("kwargs, error", [({"w_bits": 9}, ValueError), ({"a_bits": 1}, ValueError),
                                           ({"w_bits": 2.5}, TypeError)])
def test_bad_bits(kwargs, error):
    with pytest.raises(error, match="bits"):
        QILQuantizeConfig(**kwargs)


# -- tfmot's layout transforms and QILQuantizeScheme --------------------------------------------


def build_conv_relu():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1))
    h = annotate(keras.layers.Conv2D(4, 3, name="conv"), QILQuantizeConfig(BITS, BITS))(inputs)
    h = annotate(keras.layers.ReLU(name="relu"), QILQuantizeConfig(BITS, BITS))(h)
    return keras.Model(inputs, keras.layers.Flatten(name="flat")(h))


def test_default_scheme_drops_qil_config_before_relu():
    """tfmot's LayerReLUQuantize replaces the conv's config with NoOpQuantizeConfig."""
    model = tfmot_apply(build_conv_relu())
    assert type(model.get_layer("quant_conv").quantize_config).__name__ == "NoOpQuantizeConfig"
    with pytest.raises(RuntimeError, match=r"replaced the QILQuantizeConfig of layer\(s\) 'conv'"):
        quantize_apply(build_conv_relu(), scheme=qk.default_8bit.Default8BitQuantizeScheme())


def test_qil_scheme_keeps_qil_config_before_relu(digits):
    x, _ = digits
    model = quantize_apply(build_conv_relu())
    assert model.get_layer("quant_conv").quantize_config == QILQuantizeConfig(BITS, BITS)
    quantize_layer(model)
    initialize_intervals(model, x[:64])
    wrapper = model.get_layer("quant_conv")
    (kernel, quantizer, variables), = wrapper._weight_vars
    levels = quantizer.integer_levels(kernel, variables)
    assert np.abs(levels).max() <= 2 ** (BITS - 1) - 1


def test_transform_list_matches_tfmot():
    """QILQuantizeScheme repeats tfmot 0.8.1's transform list; fail if tfmot changes it."""
    source = inspect.getsource(
        default_8bit_quantize_layout_transform.Default8BitQuantizeLayoutTransform.apply)
    assert tuple(re.findall(r"default_8bit_transforms\.(\w+)\(\)", source)) == _DEFAULT_TRANSFORMS


def test_sequential_relu6_per_channel(digits):
    x, y = digits
    keras.utils.set_random_seed(3)
    config = QILQuantizeConfig(4, 4, per_channel=True)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        annotate(keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu6",
                                              name="dw"), config),
        keras.layers.Flatten(name="flat"),
        annotate(keras.layers.Dense(10, name="dense"), config),
    ])
    model = quantize_apply(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)  # first batch is used
    sources = initialize_intervals(model, dataset)
    assert sources["quant_dw/output"] == "calibration batch"
    dw = model.get_layer("quant_dw")
    assert var(dw, "depthwise_kernel_c").shape == (1, 2)
    assert var(model.get_layer("quant_dense"), "kernel_c").shape == (10,)
    out = keras.Model(model.inputs, dw.output).predict(x[:64], verbose=0)
    step = float(dw._output_quantizers[0].step(dw._output_quantizer_vars))
    assert len(np.unique(np.round(out / step))) <= 2 ** 4
    assert out.max() <= 6.0 + 1e-6


# -- (e) tfmot-path models to the integer export (qil_keras.from_tfmot) ---------------------


def test_from_tfmot_copies_every_quantizer(trained, digits):
    """The native copy holds the tfmot model's weights, intervals, bits and 8-bit input
    range; its logits before the added int8 output quantizer equal the tfmot outputs."""
    from qil_keras.quantization.from_tfmot import from_tfmot

    model, *_ = trained
    x, _ = digits
    native = from_tfmot(model, calibration_data=x[:512])
    for name in ("conv", "dense"):
        src, dst = model.get_layer(f"quant_{name}"), native.get_layer(name)
        assert isinstance(dst, (QILConv2D, QILDense)) and dst.w_bits == BITS
        np.testing.assert_array_equal(dst.float_kernel.numpy(), var(src, "kernel").numpy())
        for key in ("c", "d", "gamma"):
            np.testing.assert_array_equal(dst.kernel_quantizer_vars[key].numpy(),
                                          var(src, f"kernel_{key}").numpy())
    act = native.get_layer("relu_qil_act")
    assert act.a_bits == BITS
    for key in ("c", "d"):
        assert act.quantizer_vars[key].numpy() == var(model.get_layer("quant_relu"),
                                                       f"output_{key}").numpy()
    input_q = quantize_layer(model).quantizer_vars
    fq = [lyr for lyr in native.layers if isinstance(lyr, FakeQuant8)]
    assert [lyr.name for lyr in fq][-1] == "dense_fq8"  # the logits: calibrated on the data
    assert fq[0].range_min.numpy() == input_q["min_var"].numpy()
    assert fq[0].range_max.numpy() == input_q["max_var"].numpy()
    expected = model.predict(x, verbose=0)
    logits = keras.Model(native.inputs, native.get_layer("dense").output).predict(x, verbose=0)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # On the calibration images (inside the calibrated logit range): within half a step.
    step = fq[-1].quantization_params()[0]
    assert np.abs(native.predict(x[:512], verbose=0) - expected[:512]).max() <= 0.5 * step + 1e-5


def test_export_of_a_tfmot_model(trained, digits):
    """export_tflite takes the tfmot model itself (through the native copy), exactly, and
    leaves the tfmot model untouched (the snap moves the copy's biases)."""
    from qil_keras.integer.export import export_tflite, run_tflite

    model, *_ = trained
    x, y = digits
    before = [w.numpy().copy() for w in model.weights]
    report = export_tflite(model, representative_data=x[:512], validation_data=(x, y),
                           weight_storage="auto")  # raises below 99.5 % agreement
    assert report.options["converted_from_tfmot"]
    assert report.agreement >= 0.995 and report.max_abs_diff_steps <= 1.0 + 1e-3
    assert {row.storage for row in report.weight_layers} == {"INT4"}  # 3-bit layers
    assert all(row.distinct_values <= 2 ** BITS - 1 for row in report.weight_layers)
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())
    # Against the tfmot model itself, the file differs only by its int8 logits and the
    # snapped biases: top-1 agreement measured 98.9-100 % on this weakly trained model.
    file_top1 = run_tflite(report.model_bytes, x).argmax(1)
    assert np.mean(file_top1 == model.predict(x, verbose=0).argmax(1)) >= 0.97


def test_from_tfmot_refuses_a_relu_without_a_qil_quantizer(digits):
    from qil_keras.integer.export import ExportError, export_tflite
    from qil_keras.quantization.from_tfmot import TfmotConversionError, from_tfmot

    x, _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = annotate(keras.layers.Conv2D(8, 3, name="conv"), QILQuantizeConfig(3, 3))(inputs)
    h = keras.layers.ReLU(name="relu")(h)  # not annotated: float in the tfmot model
    h = keras.layers.Flatten(name="flat")(h)
    outputs = annotate(keras.layers.Dense(10, name="dense"), QILQuantizeConfig(3, 3))(h)
    model = quantize_apply(keras.Model(inputs, outputs))
    initialize_intervals(model, calibration_data=x[:64])
    with pytest.raises(TfmotConversionError, match=r"relu_qil_act.*Annotate the ReLUs"):
        from_tfmot(model, calibration_data=x[:64])
    with pytest.raises(ExportError, match="tfmot-path model: .*relu_qil_act"):
        export_tflite(model, representative_data=x[:64])
    with pytest.raises(TfmotConversionError, match="no tfmot wrappers"):
        from_tfmot(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
