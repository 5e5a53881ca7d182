"""The quantized model's ``fit`` traces its train step once and trains as Keras' ``fit`` does."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import digits_cnn

import qil_keras
from qil_keras import keras
from qil_keras.training.model import build_before_tracing


def _quantized(float_model, x, optimizer):
    keras.utils.set_random_seed(1)
    model = qil_keras.quantize(float_model, 2, 2, calibration_data=x[:64])
    model.reestimate_images, model.snap_after_fit = 0, False  # compare the training alone
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    traces = []
    step = model.train_step

    def counted(data):  # runs once per trace of the train function
        traces.append(1)
        return step(data)

    model.train_step = counted
    return model, traces


@pytest.mark.parametrize("inputs", ["arrays", "dataset"])
def test_first_fit_traces_once_and_equals_keras_fit(inputs):
    """Keras creates the optimizer's slots and the metrics' variables inside the first train
    step, which makes ``tf.function`` trace it twice; the quantized model's ``fit`` creates
    them first (the same variables), traces once, and ends with the same weights and history
    as ``keras.Model.fit`` on an identical copy, bit for bit."""
    float_model, x, y = digits_cnn()
    x, y = x[:256], y[:256]
    ours, our_traces = _quantized(float_model, x, keras.optimizers.Adam(1e-2))
    plain, plain_traces = _quantized(float_model, x, keras.optimizers.Adam(1e-2))
    if inputs == "arrays":
        history = ours.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    else:
        history = ours.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(64), epochs=2,
                           verbose=0)
    reference = keras.Model.fit(plain, x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    assert (len(our_traces), len(plain_traces)) == (1, 2)
    assert history.history == reference.history
    assert [v.name for v in ours.optimizer.variables] == [
        v.name for v in plain.optimizer.variables]
    for a, b in zip(ours.get_weights() + [v.numpy() for v in ours.optimizer.variables],
                    plain.get_weights() + [v.numpy() for v in plain.optimizer.variables]):
        np.testing.assert_array_equal(a, b)


def test_other_inputs_and_optimizers_are_left_to_keras():
    """A Python generator, a legacy optimizer, an already-built optimizer: nothing is built
    ahead (Keras does it in the step), and ``fit`` still trains."""
    float_model, x, y = digits_cnn()
    x, y = x[:128], y[:128]
    model, traces = _quantized(float_model, x, keras.optimizers.Adam(1e-2))
    assert not build_before_tracing(model, (b for b in [(x, y)]))
    assert not build_before_tracing(model, x, list(y))
    legacy, _ = _quantized(float_model, x, keras.optimizers.legacy.SGD(0.1))
    assert not build_before_tracing(legacy, x, y)
    legacy.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert build_before_tracing(model, x, y)
    assert not build_before_tracing(model, x, y)  # built once
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert len(traces) == 1


def test_fit_warns_when_training_pruned_a_whole_layer(caplog):
    """A layer whose pruning threshold lies above all its weights outputs its bias only; the
    end of ``fit`` names it (the CIFAR-10 study's 2/2 rows lost their last block's conv so
    before the weight width's floor, silently). A healthy model gets no warning."""
    float_model, x, y = digits_cnn()
    x, y = x[:128], y[:128]
    model, _ = _quantized(float_model, x, keras.optimizers.SGD(0.0))  # lr 0: nothing moves
    with caplog.at_level("WARNING", logger="qil_keras"):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert not [r for r in caplog.records if "pruned every weight" in r.getMessage()]
    conv = [layer for layer in model.layers if isinstance(layer, qil_keras.QILConv2D)][1]
    top = float(np.max(np.abs(conv.kernel.numpy())))
    # interval [2·top, 2·top + 0.02]: every |w| is below its lower threshold, level 0
    conv.kernel_quantizer_vars["c"].assign(2 * top + 0.01)
    conv.kernel_quantizer_vars["d"].assign(0.01)
    assert not conv.integer_levels().any()
    caplog.clear()
    with caplog.at_level("WARNING", logger="qil_keras"):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    messages = [r.getMessage() for r in caplog.records if "pruned every weight" in r.getMessage()]
    assert len(messages) == 1 and repr(conv.name) in messages[0], messages
    assert qil_keras.training.model.fully_pruned_layers(model) == [conv.name]


def test_last_validation_is_the_fit_end_models():
    """The fit-end re-estimation and snap, with the snap's widening of input ties
    (``untie_inputs``), run before the last epoch's validation makes its test function: the
    last validation metrics are those of the model ``fit`` returns. tf-keras makes that
    function before ``on_test_begin``, where both ran, so the validation used the input grid
    from before the widening (``extra_steps`` is read when a step is traced).

    The digits' pixel 8/16 = 0.5 lies on a rounding tie of the input grid [0, 1]
    (0.5 · 255 = 127.5 steps); ``quantize`` widened the grid on its calibration batch. That
    widening undone, training tracks [0, 1] again, and the fit-end snap widens it anew."""
    float_model, x, y = digits_cnn()
    model = qil_keras.quantize(float_model, 4, 4, calibration_data=x[:256])
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    (inputs,) = [layer for layer in model.layers
                 if isinstance(layer, qil_keras.FakeQuant8) and layer.quantize_op_rounding]
    assert inputs.extra_steps > 0
    inputs.extra_steps = 0
    history = model.fit(x[:1024], y[:1024], batch_size=128, epochs=2, shuffle=False, verbose=0,
                        validation_data=(x[1024:], y[1024:]))
    assert inputs.extra_steps > 0, "the fit-end snap did not widen the input grid"
    assert model.fit_snap.bias_moves  # snapped
    loss, accuracy = model.evaluate(x[1024:], y[1024:], batch_size=128, verbose=0)
    assert (history.history["val_loss"][-1], history.history["val_accuracy"][-1]) == (
        loss, accuracy)
    # and the snap came after the re-estimation: snapping again moves the biases by float
    # error only (a re-estimation after the snap moves folded biases off the grid, by up to
    # half a unit), and nothing else
    again = qil_keras.training.model.snap_after_fit(model, x[:1024])
    assert again.largest_bias_move < 1e-3 and not again.step_moves, again

    # a dataset of unknown length (fit does not know its steps): both run when the last
    # validation starts, in the same order, and fit still ends snapped
    unknown = tf.data.Dataset.from_tensor_slices((x[:1024], y[:1024])).filter(
        lambda *_: True).batch(128)
    assert unknown.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model.fit(unknown, epochs=1, verbose=0, validation_data=(x[1024:], y[1024:]))
    again = qil_keras.training.model.snap_after_fit(model, x[:1024])
    assert again.largest_bias_move < 1e-3 and not again.step_moves, again


@pytest.mark.parametrize("filename, sequential", [("model.h5", False), ("model.h5", True),
                                                   ("model.keras", False), ("saved", True)])
def test_what_quantize_returns_reloads_without_custom_objects(tmp_path, filename, sequential):
    """``quantize``'s QILModel / QILSequential round-trip through every save format (HDF5
    stores the model's bare class name; the .keras QILSequential case is in test_batchnorm)."""
    from qil_keras.training.model import QILModel, QILSequential

    _, x, _ = digits_cnn()
    layers = [keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
              keras.layers.Dense(10)]
    if sequential:
        float_model = keras.Sequential([keras.Input((8, 8, 1))] + layers)
    else:
        inputs = keras.Input((8, 8, 1))
        h = inputs
        for layer in layers:
            h = layer(h)
        float_model = keras.Model(inputs, h)
    model = qil_keras.quantize(float_model, 2, 2, calibration_data=x[:64])
    path = str(tmp_path / filename)
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is (QILSequential if sequential else QILModel)
    np.testing.assert_array_equal(loaded.predict(x[:32], verbose=0),
                                  model.predict(x[:32], verbose=0))
