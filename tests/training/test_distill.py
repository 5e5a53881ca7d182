"""Quantizing with images of other classes (the paper's heterogeneous-data experiment)."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

import qil_keras
from qil_keras import keras
from qil_keras.training.distill import quantize_with_distillation

L = keras.layers


@pytest.fixture(scope="module")
def split_digits():
    """Digits 0-4 (the float model's classes) and 5-9 (the quantization images)."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    own, other = y < 5, y >= 5
    x_own, y_own = x[own], y[own]
    return (x_own[:600], y_own[:600]), (x_own[600:], y_own[600:]), x[other]


@pytest.fixture(scope="module")
def float_model(split_digits):
    (x, y), _, _ = split_digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for filters in (16, 32):
        h = L.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = L.BatchNormalization(momentum=0.9)(h)
        h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, L.Dense(5)(h))
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    model.fit(x, y, batch_size=32, epochs=15, verbose=0)
    return model


def _accuracy(model, x, y):
    return float(np.mean(model.predict(x, verbose=0).argmax(1) == y))


def test_distillation_on_other_classes_recovers_accuracy(split_digits, float_model):
    """2/2 quantized with only digits 5-9 does better on digits 0-4 than no fine-tuning."""
    _, (x_test, y_test), x_other = split_digits
    float_accuracy = _accuracy(float_model, x_test, y_test)
    assert float_accuracy > 0.9
    keras.utils.set_random_seed(1)
    untuned = qil_keras.quantize(float_model, 2, 2, calibration_data=x_other[:256])
    keras.utils.set_random_seed(1)
    result = quantize_with_distillation(float_model, x_other, stages=[(2, 2)], epochs_per_stage=8,
                                        batch_size=32, verbose=0)
    tuned_accuracy = _accuracy(result.final_model, x_test, y_test)
    untuned_accuracy = _accuracy(untuned, x_test, y_test)
    losses = result.histories[0]["distillation_loss"]
    # Measured: the loss falls 0.138 -> 0.046; top-1 97.7 %, untuned 32.2 %. (With BatchNorm
    # frozen after 200 steps, the default until issue #16's re-estimation, it rose back to
    # 0.267 after the freeze and ended at 84.7 %.)
    assert losses[-1] < 0.5 * losses[0], losses
    # ~290 test digits: 3 points is ~9 images; 90 % leaves 22 images below the measured 97.7 %.
    assert tuned_accuracy >= max(untuned_accuracy + 0.03, 0.90), (untuned_accuracy, tuned_accuracy)


def test_quantizer_only_distillation_keeps_weights(split_digits, float_model):
    """quantizer_only=True trains the intervals and leaves kernels and BatchNorm unchanged."""
    _, _, x_other = split_digits
    result = quantize_with_distillation(float_model, x_other[:256], stages=[(3, 3)],
                                        batch_size=32, quantizer_only=True, verbose=0)
    model = result.final_model
    for layer in float_model.layers:
        if layer.weights:
            for before, after in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(before, after)
    moved = [float(np.max(np.abs(layer.kernel_quantizer_vars["d"].numpy()
                                 - qil_keras.quantize(float_model, 3, 3, calibration_data=x_other[:256])
                                 .get_layer(layer.name).kernel_quantizer_vars["d"].numpy())))
             for layer in model.layers if hasattr(layer, "kernel_quantizer_vars")]
    assert max(moved) > 0


def test_distillation_reports_the_float_models_metrics(split_digits, float_model):
    """Issue #16 item 6: the float model's compiled metrics, on labelled validation data."""
    _, (x_test, y_test), x_other = split_digits
    result = quantize_with_distillation(float_model, x_other[:128], stages=[(4, 4)],
                                        batch_size=32, validation_data=(x_test, y_test),
                                        verbose=0)
    history = result.histories[0]
    assert {"distillation_loss", "val_distillation_loss", "val_accuracy"} <= set(history)
    # Unlabelled training inputs: no training accuracy to report.
    assert "accuracy" not in history
    assert history["val_accuracy"][-1] == pytest.approx(
        _accuracy(result.final_model, x_test, y_test), abs=1e-6)
    # the returned student is compiled with the float model's loss and metrics
    evaluated = result.final_model.evaluate(x_test, y_test, verbose=0, return_dict=True)
    assert evaluated["accuracy"] == pytest.approx(history["val_accuracy"][-1], abs=1e-6)
    assert "loss" in evaluated
