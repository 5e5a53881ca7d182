"""Nested models (a transfer-learning base model called as one layer) are inlined by
``quantize`` (``qil_keras.quantization.flatten``)."""

import numpy as np
import pytest
from conftest import digits_cnn

import qil_keras
from qil_keras import keras
from qil_keras.quantization.flatten import flatten_nested

L = keras.layers


def _base(name="base", prefix="b"):
    inputs = keras.Input((8, 8, 1))
    h = L.ReLU()(L.BatchNormalization(momentum=0.9, name=f"{prefix}_bn")(
        L.Conv2D(8, 3, padding="same", use_bias=False, name=f"{prefix}_conv")(inputs)))
    h = L.ReLU()(L.BatchNormalization(momentum=0.9, name=f"{prefix}_bn2")(
        L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{prefix}_dw")(h)))
    return keras.Model(inputs, h, name=name)


@pytest.fixture(scope="module")
def data():
    _, x, y = digits_cnn()
    return x, y


def _trained(model, x, y):
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    return model


def test_a_functional_model_calling_a_base_model_quantizes_and_exports(data):
    x, y = data
    keras.utils.set_random_seed(0)
    base = _base()
    inputs = keras.Input((8, 8, 1), name="image")
    h = L.GlobalAveragePooling2D()(base(inputs, training=False))
    model = _trained(keras.Model(inputs, L.Dense(10, name="head")(h)), x, y)
    nodes = {layer.name: len(layer._inbound_nodes) for layer in base.layers + model.layers}
    weights = [w.copy() for w in model.get_weights()]

    flat = flatten_nested(model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    assert flat.input_names == ["image"]
    # the base was called with training=False: its BatchNorms stay in inference mode even
    # when the flat model runs in training mode, as in the nested original
    for training in (False, True):
        np.testing.assert_array_equal(flat(x[:64], training=training).numpy(),
                                      model(x[:64], training=training).numpy())

    q = qil_keras.quantize(model, 4, 4, calibration_data=x[:256])
    [row] = [row for row in q.qil_report.rows if row.layer == "base"]
    assert row.action == "inlined"
    assert {"b_conv", "b_dw", "head"} <= {row.layer for row in q.qil_report.rows
                                          if row.action == "quantized"}
    report = qil_keras.export_tflite(q, validation_data=(x[:500], y[:500]))
    assert report.agreement >= 0.995
    # the caller's model and its layers are as they were
    assert nodes == {layer.name: len(layer._inbound_nodes)
                     for layer in base.layers + model.layers}
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_a_sequential_of_a_base_model_and_a_head_is_inlined(data):
    x, y = data
    keras.utils.set_random_seed(1)
    model = _trained(keras.Sequential([keras.Input((8, 8, 1)), _base(),
                                       L.GlobalAveragePooling2D(), L.Dense(10)]), x, y)
    flat = flatten_nested(model)
    np.testing.assert_array_equal(flat.predict(x[:64], verbose=0),
                                  model.predict(x[:64], verbose=0))
    q = qil_keras.quantize(model, 4, 4, calibration_data=x[:256])
    assert "base" not in [layer.name for layer in q.layers]
    assert isinstance(q.get_layer("b_conv"), qil_keras.QILConv2D)


def test_a_base_model_called_twice_stays_shared(data):
    x, _ = data
    keras.utils.set_random_seed(2)
    base = _base()
    left, right = keras.Input((8, 8, 1)), keras.Input((8, 8, 1))
    merged = L.Concatenate()([L.GlobalAveragePooling2D()(base(left)),
                              L.GlobalAveragePooling2D()(base(right))])
    model = keras.Model([left, right], L.Dense(2)(merged))
    flat = flatten_nested(model)
    assert len(flat.weights) == len(model.weights)   # one copy of the base's weights
    np.testing.assert_array_equal(flat.predict([x[:32], x[32:64]], verbose=0),
                                  model.predict([x[:32], x[32:64]], verbose=0))


def test_clashing_layer_names_across_nesting_levels_are_refused_with_the_fix():
    base = _base()
    inputs = keras.Input((8, 8, 1))
    h = L.BatchNormalization(name="b_bn")(base(inputs))   # the base has a 'b_bn' too
    model = keras.Model(inputs, L.Dense(10)(L.Flatten()(h)))
    with pytest.raises(ValueError, match="share names.*give the layers unique names"):
        qil_keras.quantize(model, 4, 4)


def test_a_base_called_in_inference_mode_keeps_its_batchnorm_statistics(data):
    """``base(x, training=False)`` with its BatchNorms trainable (Keras' fine-tuning recipe):
    the inlined BatchNorms normalize with their moving statistics in training too, so the
    calibration reads those activations and the end of ``fit`` does not re-estimate them."""
    x, y = data
    keras.utils.set_random_seed(3)
    base = _base()
    base.get_layer("b_bn").moving_mean.assign(np.full(8, 2.0, np.float32))
    base.get_layer("b_bn").moving_variance.assign(np.full(8, 4.0, np.float32))
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(base(inputs,
                                                                           training=False))))
    q = qil_keras.quantize(model, 8, 8, calibration_data=x[:256])
    [row] = [row for row in q.qil_report.rows if row.layer == "b_bn"]
    assert "training=False" in row.reason and "not re-estimated" in row.reason
    # 8/8 straight after quantize: the calibrated ranges fit the inference activations
    float_top1 = model.predict(x[:256], verbose=0).argmax(1)
    assert np.mean(q.predict(x[:256], verbose=0).argmax(1) == float_top1) > 0.9
    q.compile(keras.optimizers.SGD(0.0),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0)
    np.testing.assert_array_equal(q.get_layer("b_bn").moving_mean.numpy(), np.full(8, 2.0))


def test_a_list_input_base_called_with_a_dict_maps_its_inputs_by_name():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    inner = keras.Model([a, b], L.Subtract()([L.Dense(3, name="da")(a), L.Dense(3, name="db")(b)]))
    p, q = keras.Input((4,), name="p"), keras.Input((4,), name="q")
    model = keras.Model([p, q], inner({"b": q, "a": p}))
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2)]
    np.testing.assert_array_equal(flatten_nested(model).predict(xs, verbose=0),
                                  model.predict(xs, verbose=0))
