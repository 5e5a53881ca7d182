"""progressive_fit: stages chain, bits change, and an interrupted run resumes."""

import json

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.config import disable_op_determinism  # no public API
from sklearn.datasets import load_digits

import qil_keras
import qil_keras.quantization.init
from qil_keras import keras
from qil_keras.training.progressive import progressive_fit

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    return x[:1400], data.target[:1400].astype(np.int32), x[1400:], data.target[1400:]


@pytest.fixture(scope="module")
def float_model(digits):
    x, y, _, _ = digits
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = L.Conv2D(8, 3, padding="same", use_bias=False, name="first_conv")(inputs)
    h = L.BatchNormalization(momentum=0.9)(h)
    h = L.ReLU()(h)
    h = L.Conv2D(16, 3, padding="same", use_bias=False, name="inner_conv")(h)
    h = L.BatchNormalization(momentum=0.9)(h)
    h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, L.Dense(10, name="head")(h))
    model.compile(keras.optimizers.Adam(3e-3), LOSS, metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


def _bits(model):
    return {layer.name: layer.w_bits for layer in model.layers if hasattr(layer, "w_bits")}


def test_stages_chain_with_their_bits(digits, float_model):
    """Each stage's model has its bits; stage k+1 starts where stage k ended."""
    x, y, xv, yv = digits
    seen_at_start = []

    class RecordStart(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen_at_start.append({v.name: v.numpy().copy() for v in self.model.weights})

    result = progressive_fit(float_model, x, y, stages=[(4, 4), (2, 2)], epochs_per_stage=1,
                             loss=LOSS, metrics=["accuracy"], batch_size=64,
                             validation_data=(xv, yv), callbacks=[RecordStart()],
                             calibration_data=x[:128], verbose=0)
    assert len(result.models) == 2 and len(result.histories) == 2
    assert _bits(result.models[0]) == {"first_conv": 8, "inner_conv": 4, "head": 8}
    assert _bits(result.models[1]) == {"first_conv": 8, "inner_conv": 2, "head": 8}
    # Stage 2 began with stage 1's final weights, BatchNorm and activation intervals;
    # only the interval of the layer whose bits changed restarted (weight_intervals
    # "reinitialize"), from the MSE-optimal range of its trained kernel, and the BatchNorm
    # step counts restarted (new grids: batch statistics again before the next freeze).
    stage1 = {v.name: v.numpy() for v in result.models[0].weights}
    restarted = {"inner_conv/kernel_c:0", "inner_conv/kernel_d:0", "inner_conv/kernel_gamma:0"}
    assert set(stage1) == set(seen_at_start[1])
    for name, end in stage1.items():
        if name.endswith("batch_steps:0"):
            assert end > 0 and seen_at_start[1][name] == 0, name
        elif name not in restarted and not name.endswith("bits:0"):  # bits change by design
            np.testing.assert_array_equal(seen_at_start[1][name], end, err_msg=name)
    inner = result.models[1].get_layer("inner_conv")
    q = 1.0  # 2-bit weights: levels {-1, 0, 1}
    h = qil_keras.quantization.init.mse_optimal_range(result.models[0].get_layer("inner_conv").kernel.numpy(), q)
    np.testing.assert_allclose(seen_at_start[1]["inner_conv/kernel_c:0"], h / 2, rtol=1e-6)
    assert inner.w_bits == 2
    assert set(result.histories[1]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    for model in result.models:  # the float model is untouched stage 0
        assert model is not float_model


class _Interrupt(Exception):
    pass


class _InterruptAt(keras.callbacks.Callback):
    """Raises at the end of ``epoch`` of stage ``stage`` (1-based)."""

    def __init__(self, stage, epoch):
        super().__init__()
        self.stage, self.epoch, self.fits = stage, epoch, 0

    def on_train_begin(self, logs=None):
        self.fits += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.fits == self.stage and epoch == self.epoch:
            raise _Interrupt(f"simulated kill after epoch {epoch}")


def _run(float_model, digits, tmp, callbacks=()):
    x, y, _, _ = digits
    keras.utils.set_random_seed(3)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)  # fixed order
    return progressive_fit(float_model, data, stages=[(4, 4), (3, 3)], epochs_per_stage=3,
                           loss=LOSS, calibration_data=x[:128], checkpoint_dir=tmp,
                           callbacks=list(callbacks), verbose=0)


def test_interrupted_stage_resumes_to_the_same_result(digits, float_model, tmp_path):
    """Killed after epoch 2 of stage 2, a rerun skips stage 1 and finishes stage 2 alike."""
    tf.config.experimental.enable_op_determinism()
    try:
        reference = _run(float_model, digits, str(tmp_path / "uninterrupted"))
        with pytest.raises(_Interrupt):
            _run(float_model, digits, str(tmp_path / "resumed"), [_InterruptAt(stage=2, epoch=1)])
        stage1_file = tmp_path / "resumed" / "stage_1_4w4a" / "final.weights.h5"
        assert stage1_file.exists()
        stamp = stage1_file.stat().st_mtime_ns
        resumed = _run(float_model, digits, str(tmp_path / "resumed"))
        assert stage1_file.stat().st_mtime_ns == stamp  # stage 1 was not retrained
        # The resumed stage ran only its last epoch, and its history still has all three: the
        # first two from the killed run's log, each equal to the uninterrupted run's epoch.
        assert len(resumed.histories[1]["loss"]) == 3
        np.testing.assert_allclose(resumed.histories[1]["loss"], reference.histories[1]["loss"],
                                   rtol=1e-4)
        history_file = tmp_path / "resumed" / "stage_2_3w3a" / "history.json"
        assert len(json.loads(history_file.read_text())["loss"]) == 3
        for a, b in zip(reference.final_model.get_weights(), resumed.final_model.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    finally:
        disable_op_determinism()


def test_progressive_fit_under_mirrored_strategy(digits, float_model):
    """Quantize, per-stage compile and fit inside a MirroredStrategy scope (1 CPU replica),
    with the interval optimizer in quantizer-only mode."""
    x, y, _, _ = digits
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        result = progressive_fit(float_model, x[:256], y[:256], stages=[(4, 4), (3, 3)],
                                 epochs_per_stage=1, loss=LOSS, batch_size=64,
                                 calibration_data=x[:64], quantizer_only=True,
                                 interval_lr_multiplier=2.0, verbose=0)
    model = result.final_model
    assert _bits(model) == {"first_conv": 8, "inner_conv": 3, "head": 8}
    for layer in float_model.layers:  # quantizer-only: kernels and BatchNorm untouched
        for before, after in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(before, after)


def test_loss_and_metrics_default_to_the_float_models_compiled_ones(digits, float_model):
    """Issue #16 item 6: no loss= needed when the float model is compiled; an uncompiled one
    without loss= gets an error that says what to pass."""
    x, y, xv, yv = digits
    result = progressive_fit(float_model, x[:256], y[:256], stages=[(4, 4)], batch_size=64,
                             validation_data=(xv, yv), calibration_data=x[:128], verbose=0)
    history = result.histories[0]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    # The compiled loss is the float model's (from logits): a near-chance first loss would be
    # ~2.3 for 10 classes either way, so check the value against a direct evaluation instead.
    model = result.models[-1]
    logits = model.predict(xv, verbose=0)
    assert history["val_loss"][-1] == pytest.approx(float(LOSS(yv, logits)), rel=1e-4)
    # the stage's model is compiled with that loss and those metrics: evaluate reports them
    evaluated = model.evaluate(xv, yv, verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-4)
    assert evaluated["accuracy"] == pytest.approx(history["val_accuracy"][-1], abs=1e-6)
    uncompiled = keras.models.clone_model(float_model)
    with pytest.raises(ValueError, match="compile the float model.*or pass loss="):
        progressive_fit(uncompiled, x[:64], y[:64], stages=[(4, 4)], verbose=0)


def test_a_second_backup_callback_is_refused_with_checkpoint_dir(digits, float_model, tmp_path):
    """checkpoint_dir adds its own BackupAndRestore; a second one used to fail at the end of the
    first stage with AttributeError: '_training_state'."""
    x, y, _, _ = digits
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="remove the BackupAndRestore callback"):
        progressive_fit(float_model, x[:64], y[:64], stages=[(4, 4)], verbose=0,
                        checkpoint_dir=str(tmp_path / "stages"), callbacks=[backup])


class _ScaledLoss(keras.losses.Loss):
    """A custom loss whose constructor takes an argument its config does not hold."""

    def __init__(self, scale):
        super().__init__(name="scaled")
        self.scale = scale

    def call(self, y_true, y_pred):
        return self.scale * LOSS(y_true, y_pred)


def test_stage_models_compile_with_a_custom_loss_class(digits, float_model):
    x, y, xv, yv = digits
    result = progressive_fit(float_model, x[:128], y[:128], stages=[(4, 4)], batch_size=64,
                             loss=_ScaledLoss(2.0), calibration_data=x[:128], verbose=0)
    evaluated = result.final_model.evaluate(xv, yv, verbose=0, return_dict=True)
    logits = result.final_model.predict(xv, verbose=0)
    assert evaluated["loss"] == pytest.approx(2.0 * float(LOSS(yv, logits)), rel=1e-4)
