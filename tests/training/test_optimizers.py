"""IntervalOptimizer: QIL intervals with their own learning rate, any optimizer.

Real data: scikit-learn's 8x8 digits (pixel values / 16). The network is
QILConv2D(4, 3, w_bits=3) - BatchNormalization - ReLU - QILActivation(3) -
Flatten - QILDense(10, w_bits=8): 8 interval variables (c, d, γ of both weight
quantizers, c, d of the activation quantizer).

One-step comparisons apply one set of gradients (computed once) to the same
starting values, so any difference comes from the optimizer. The variables
are float32: a stored result is rounded to half a float32 step of its value,
so comparisons of update sizes allow that rounding on top of their relative
tolerance.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from qil_keras._keras import keras, tf
from qil_keras.quantization.layers import QILActivation, QILConv2D, QILDense
from qil_keras.training.optimizers import (
    IntervalOptimizer,
    ScaledSchedule,
    attach_interval_variables,
    build_optimizer,
    interval_variables,
    qil_optimizer,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N_STEP = 256  # examples in the one-step gradient batch and in the fit() data
BATCH = 64  # fit(): 4 steps per epoch


def load_data():
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    return x[:N_STEP], data.target[:N_STEP].astype(np.int32)


@pytest.fixture(scope="module")
def digits():
    return load_data()


def build(batch_norm=True):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8, 8, 1)), QILConv2D(4, 3, w_bits=3, name="conv")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers += [keras.layers.ReLU(name="relu"), QILActivation(3, name="act"),
               keras.layers.Flatten(name="flat"), QILDense(10, w_bits=8, name="dense")]
    return keras.Sequential(layers)


def is_interval(model, variable):
    return any(variable is v for v in interval_variables(model))


def split_values(model):
    """(interval values, other trainable values) as numpy arrays."""
    intervals, others = [], []
    for v in model.trainable_variables:
        (intervals if is_interval(model, v) else others).append(v.numpy())
    return intervals, others


class OneStep:
    """Gradients of one batch, computed once; apply them with any optimizer."""

    def __init__(self, digits):
        self.model = build()
        x, y = digits
        with tf.GradientTape() as tape:
            loss = LOSS(y, self.model(x, training=True))
        self.variables = self.model.trainable_variables
        self.grads = tape.gradient(loss, self.variables)
        self.start = [v.numpy() for v in self.variables]
        self.interval = [is_interval(self.model, v) for v in self.variables]

    def deltas(self, optimizer):
        """Update of every trainable variable (float64) after one step from the start."""
        for v, value in zip(self.variables, self.start):
            v.assign(value)
        optimizer.apply_gradients(zip(self.grads, self.variables))
        return [v.numpy().astype(np.float64) - s for v, s in zip(self.variables, self.start)]

    def rounding(self, *deltas):
        """Half a float32 step of every stored result, summed over the runs compared."""
        return [sum(np.spacing(np.abs(s + d).astype(np.float32)).astype(np.float64) / 2
                    for d in ds)
                for s, ds in zip(self.start, zip(*deltas))]


@pytest.fixture(scope="module")
def one_step(digits):
    return OneStep(digits)


def compile_fit(model, optimizer, digits, epochs=1, **kwargs):
    model.compile(optimizer, LOSS)
    x, y = digits
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, **kwargs)


def fit_under(strategy, digits, batch_norm=True, callbacks=None, epochs=1, start=None,
              sgd=False):
    """Adam(1e-2) (or SGD with momentum) with intervals at 3x, shuffle-free fit."""
    with strategy.scope():
        model = build(batch_norm)
        if start is not None:
            model.set_weights(start)
        inner = keras.optimizers.SGD(0.05, momentum=0.9) if sgd else keras.optimizers.Adam(1e-2)
        opt = qil_optimizer(model, inner, interval_lr_multiplier=3.0)
    compile_fit(model, opt, digits, epochs=epochs, callbacks=callbacks)
    return model, opt


# -- finding the interval variables --------------------------------------------------


def test_interval_variables_are_the_quantizer_variables():
    model = build()
    conv, act, dense = (model.get_layer(n) for n in ("conv", "act", "dense"))
    expected = ([conv.kernel_quantizer_vars[k] for k in ("c", "d", "gamma")]
                + [act.quantizer_vars[k] for k in ("c", "d")]
                + [dense.kernel_quantizer_vars[k] for k in ("c", "d", "gamma")])
    found = interval_variables(model)
    assert len(found) == len(expected) == 8
    assert all(a is b for a, b in zip(found, expected))
    # Layers or lists of layers work too, and nothing else is picked up.
    assert all(a is b for a, b in zip(interval_variables([conv, act]), expected[:5]))
    assert not any(v is conv.kernel or v is conv.bias for v in found)
    assert not any(v is w for v in found for w in model.get_layer("bn").weights)


def test_interval_variables_of_a_tfmot_model():
    from tensorflow_model_optimization.quantization.keras import quantize_annotate_layer

    from qil_keras.quantization.tfmot_config import QILQuantizeConfig, quantize_apply

    inputs = keras.Input((8, 8, 1))
    h = quantize_annotate_layer(keras.layers.Conv2D(4, 3, activation="relu"),
                                QILQuantizeConfig(3, 3))(inputs)
    h = quantize_annotate_layer(keras.layers.ReLU(), QILQuantizeConfig(3, 3))(h)
    h = keras.layers.Flatten()(h)
    outputs = quantize_annotate_layer(keras.layers.Dense(10), QILQuantizeConfig(3, 3))(h)
    model = quantize_apply(keras.Model(inputs, outputs))
    found = interval_variables(model)
    # conv: kernel c, d, γ + relu activation c, d; relu layer: output c, d; dense: c, d, γ.
    assert len(found) == 3 + 2 + 2 + 3
    assert len({id(v) for v in found}) == len(found)
    trainable = model.trainable_variables
    assert all(any(v is t for t in trainable) for v in found)
    kernels = [lyr.layer.kernel for lyr in model.layers if hasattr(getattr(lyr, "layer", None),
                                                                    "kernel")]
    assert len(kernels) == 2 and not any(v is k for v in found for k in kernels)


# -- the optimizer object ------------------------------------------------------------------


def test_accepted_by_compile_and_argument_checks():
    model = build()
    opt = qil_optimizer(model, keras.optimizers.Adam(1e-3), interval_lr_multiplier=5.0)
    assert isinstance(opt, keras.optimizers.Optimizer)
    assert keras.optimizers.get(opt) is opt
    model.compile(opt, LOSS)
    assert model.optimizer is opt
    assert opt.interval_lr_multiplier == 5.0 and opt.train_weights
    with pytest.raises(TypeError, match="legacy"):
        IntervalOptimizer(keras.optimizers.legacy.Adam(), interval_variables(model))
    with pytest.raises(ValueError, match=">= 0"):
        IntervalOptimizer(keras.optimizers.Adam(), [], interval_lr_multiplier=-1)
    with pytest.raises(ValueError, match="no QIL interval variables"):
        qil_optimizer(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
                      keras.optimizers.Adam())


def test_sgd_interval_step_is_multiplier_times_larger(one_step):
    multiplier = 3.0
    lr = 0.005  # small enough that no d reaches its floor (the projection d >= 1e-6)
    base = one_step.deltas(IntervalOptimizer(keras.optimizers.SGD(lr), interval_variables(
        one_step.model), 1.0))
    scaled = one_step.deltas(IntervalOptimizer(keras.optimizers.SGD(lr), interval_variables(
        one_step.model), multiplier))
    plain = one_step.deltas(keras.optimizers.SGD(lr))
    for is_iv, b, s, p, r, v in zip(one_step.interval, base, scaled, plain,
                                    one_step.rounding(base, scaled), one_step.variables):
        if is_iv:
            assert np.all(b != 0), v.name
            np.testing.assert_array_less(np.abs(s - multiplier * b),
                                         1e-5 * np.abs(multiplier * b) + multiplier * r,
                                         err_msg=v.name)
        else:  # network weights: exactly as the plain optimizer moves them
            assert np.array_equal(s, b) and np.array_equal(s, p), v.name
    # With multiplier 1 the wrapper is the plain optimizer.
    assert all(np.array_equal(b, p) for b, p in zip(base, plain))


def test_adam_first_step_of_intervals_is_multiplier_times_lr(one_step):
    lr = 1e-3
    ivs = interval_variables(one_step.model)
    base = one_step.deltas(IntervalOptimizer(keras.optimizers.Adam(lr), ivs, 1.0))
    scaled = one_step.deltas(IntervalOptimizer(keras.optimizers.Adam(lr), ivs, 10.0))
    for is_iv, b, s, v in zip(one_step.interval, base, scaled, one_step.variables):
        if is_iv:
            # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): gradient
            # scaling would not change it, a learning rate of its own does.
            np.testing.assert_allclose(np.abs(b), lr, rtol=1e-3, err_msg=v.name)
            np.testing.assert_allclose(s, 10.0 * b, rtol=1e-3, err_msg=v.name)
        else:
            assert np.array_equal(s, b), v.name


@pytest.mark.parametrize("make", [
    lambda wd: keras.optimizers.AdamW(1e-3, weight_decay=wd),
    lambda wd: keras.optimizers.SGD(0.005, weight_decay=wd),
], ids=["AdamW", "SGD"])
def test_weight_decay_is_not_applied_to_intervals(one_step, make):
    ivs = interval_variables(one_step.model)
    decayed = one_step.deltas(IntervalOptimizer(make(0.5), ivs, 2.0))
    undecayed = one_step.deltas(IntervalOptimizer(make(0.0), ivs, 2.0))
    plain_decayed = one_step.deltas(make(0.5))
    plain_undecayed = one_step.deltas(make(0.0))
    for is_iv, a, b, pa, pb, v in zip(one_step.interval, decayed, undecayed, plain_decayed,
                                      plain_undecayed, one_step.variables):
        if is_iv:
            assert np.array_equal(a, b), v.name  # no decay on intervals
            assert not np.array_equal(pa, pb), v.name  # the plain optimizer decays them
        else:
            assert np.array_equal(a, pa), v.name  # weights decay as with the plain optimizer


def test_multiplier_zero_freezes_intervals(one_step):
    ivs = interval_variables(one_step.model)
    frozen = one_step.deltas(IntervalOptimizer(keras.optimizers.Adam(1e-2), ivs, 0.0))
    plain = one_step.deltas(keras.optimizers.Adam(1e-2))
    for is_iv, f, p, v in zip(one_step.interval, frozen, plain, one_step.variables):
        if is_iv:
            assert not np.any(f), v.name  # not updated at all
        else:
            assert np.array_equal(f, p), v.name


def test_train_weights_false_keeps_weights_bit_identical(digits):
    model = build()
    opt = qil_optimizer(model, keras.optimizers.Adam(1e-2), train_weights=False)
    intervals, others = split_values(model)
    compile_fit(model, opt, digits)
    new_intervals, new_others = split_values(model)
    assert len(others) == 6  # kernels, biases, BatchNorm γ and β
    assert all(np.array_equal(a, b) for a, b in zip(others, new_others))
    dicts = [model.get_layer("conv").kernel_quantizer_vars, model.get_layer("act").quantizer_vars,
             model.get_layer("dense").kernel_quantizer_vars]
    moved = {id(v) for v, a, b in zip(interval_variables(model), intervals, new_intervals)
             if not np.array_equal(a, b)}
    assert all(id(d[k]) in moved for d in dicts for k in ("c", "d"))
    assert int(opt.iterations.numpy()) == int(opt.interval_optimizer.iterations.numpy()) == 4
    assert len(opt.weights_optimizer.variables) == 1  # never built for the weights


def test_learning_rate_schedule_under_fit(digits):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.5)
    model = build()
    opt = qil_optimizer(model, keras.optimizers.SGD(schedule), interval_lr_multiplier=4.0)
    compile_fit(model, opt, digits)
    # The rates used at the last step (step 3), and the intervals' at the next.
    np.testing.assert_allclose(opt.learning_rate.numpy(), 0.05 * 0.5**3, rtol=1e-6)
    np.testing.assert_allclose(opt.interval_optimizer.learning_rate.numpy(),
                               4 * 0.05 * 0.5**3, rtol=1e-6)
    np.testing.assert_allclose(opt.interval_learning_rate.numpy(), 4 * 0.05 * 0.5**4, rtol=1e-6)
    assert isinstance(opt.interval_optimizer._learning_rate, ScaledSchedule)
    scaled = ScaledSchedule(schedule, 4.0)
    again = ScaledSchedule.from_config(scaled.get_config())
    np.testing.assert_allclose(again(7).numpy(), scaled(7).numpy(), rtol=1e-7)


# -- fit with callbacks, saving --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Two epochs (8 steps) with LearningRateScheduler and ModelCheckpoint(.keras)."""
    path = str(tmp_path_factory.mktemp("checkpoint") / "model.keras")
    model, opt = fit_under(tf.distribute.get_strategy(), digits, epochs=2, callbacks=[
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: 1e-2 if epoch == 0 else 2e-3),
        keras.callbacks.ModelCheckpoint(path),
    ])
    return model, opt, path


def test_learning_rate_scheduler_callback_and_setter(trained):
    model, opt, _ = trained
    np.testing.assert_allclose(model.history.history["lr"], [1e-2, 2e-3], rtol=1e-6)
    # The callback assigns the weights' learning-rate variable; the intervals follow.
    np.testing.assert_allclose(opt.interval_optimizer.learning_rate.numpy(), 6e-3, rtol=1e-6)
    assert int(opt.iterations.numpy()) == int(opt.interval_optimizer.iterations.numpy()) == 8
    setter = qil_optimizer(build(), keras.optimizers.SGD(0.1), interval_lr_multiplier=3.0)
    setter.learning_rate = 0.5
    np.testing.assert_allclose(setter.learning_rate.numpy(), 0.5, rtol=1e-7)
    np.testing.assert_allclose(setter.interval_learning_rate.numpy(), 1.5, rtol=1e-6)


def test_model_checkpoint_keras_file_round_trip(trained, digits):
    model, opt, path = trained
    loaded = keras.models.load_model(path)
    restored = loaded.optimizer
    assert isinstance(restored, IntervalOptimizer)
    assert restored.get_config() == opt.get_config()
    assert restored.interval_lr_multiplier == 3.0 and restored.train_weights
    assert restored.interval_variables is None  # a config cannot name them
    x, y = digits
    with pytest.raises(RuntimeError, match="attach_interval_variables"):
        loaded.fit(x, y, batch_size=BATCH, verbose=0)
    assert attach_interval_variables(loaded) is restored
    saved = [v.numpy() for v in opt.variables]
    assert len(saved) == (1 + 2 * 6) + (1 + 2 * 8)  # iterations + Adam m, v for each
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(saved, restored.variables))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))
    loaded.fit(x, y, batch_size=BATCH, verbose=0)
    assert int(restored.iterations.numpy()) == 12
    assert int(restored.interval_optimizer.iterations.numpy()) == 12


def test_h5_file_round_trip(trained, tmp_path):
    model, opt, _ = trained
    model.save(tmp_path / "model.h5")
    loaded = keras.models.load_model(tmp_path / "model.h5")
    assert isinstance(loaded.optimizer, IntervalOptimizer)
    assert loaded.optimizer.get_config() == opt.get_config()
    attach_interval_variables(loaded)  # the state was kept until now
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(opt.variables, loaded.optimizer.variables))


def test_savedmodel_round_trip(trained, tmp_path):
    # tf-keras keeps no optimizer state in a SavedModel (for any optimizer);
    # the optimizer comes back from its config and trains once attached.
    model, opt, _ = trained
    model.save(tmp_path / "saved", save_format="tf")
    loaded = keras.models.load_model(tmp_path / "saved")
    assert isinstance(loaded.optimizer, IntervalOptimizer)
    assert loaded.optimizer.get_config() == opt.get_config()
    attach_interval_variables(loaded)
    assert len(loaded.optimizer.interval_variables) == 8
    loaded.optimizer.build(loaded.trainable_variables)  # what the first step does
    assert len(loaded.optimizer.weights_optimizer.variables) == 1 + 2 * 6
    assert len(loaded.optimizer.interval_optimizer.variables) == 1 + 2 * 8


def test_tf_checkpoint_restores_slot_variables(trained, tmp_path):
    model, opt, _ = trained
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
    fresh = build()
    fresh_opt = qil_optimizer(fresh, keras.optimizers.Adam(1e-2), interval_lr_multiplier=3.0)
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path)
    fresh_opt.build(fresh.trainable_variables)  # slots are created, then restored
    status.assert_consumed()
    interval_slots = fresh_opt.interval_optimizer.variables
    assert len(interval_slots) == 1 + 2 * 8
    assert all(np.any(v.numpy() != 0) for v in interval_slots)
    for a, b in zip(opt.variables, fresh_opt.variables):
        assert np.array_equal(a.numpy(), b.numpy()), b.name


# -- tf.distribute -------------------------------------------------------------------------------


def test_mirrored_strategy_one_device(trained, digits):
    reference, _, _ = trained
    model, opt = fit_under(tf.distribute.MirroredStrategy(["/cpu:0"]), digits, epochs=2,
                           callbacks=[keras.callbacks.LearningRateScheduler(
                               lambda epoch, lr: 1e-2 if epoch == 0 else 2e-3)])
    assert int(opt.iterations.numpy()) == int(opt.interval_optimizer.iterations.numpy()) == 8
    for a, b in zip(reference.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.name)


_TWO_REPLICAS = textwrap.dedent("""
    import sys
    import numpy as np
    from qil_keras._keras import tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/.."]  # this test's folder, and tests/ (conftest)
    import test_optimizers as t
    saved = np.load(sys.argv[2])
    n = len(saved.files) // 2
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    model, opt = t.fit_under(strategy, t.load_data(), batch_norm=False, sgd=True,
                             start=[saved[f"start{i}"] for i in range(n)])
    # One count per step (4), not per replica; weights as on one device.
    assert int(opt.iterations.numpy()) == int(opt.interval_optimizer.iterations.numpy()) == 4
    for i, v in enumerate(model.weights):
        np.testing.assert_allclose(v.numpy(), saved[f"end{i}"], rtol=1e-4, atol=1e-6,
                                   err_msg=v.name)
    print("two replicas OK")
""")


def test_mirrored_strategy_two_replicas_subprocess(digits, tmp_path):
    # Logical CPU devices must be configured before TensorFlow initializes: a
    # fresh process. Without batch norm (per-replica statistics), two replicas
    # of half a batch each train exactly like one device. SGD, not Adam: Adam
    # would hide gradients summed twice (it is invariant to gradient scale).
    start = build(batch_norm=False).get_weights()
    reference, _ = fit_under(tf.distribute.get_strategy(), digits, batch_norm=False, start=start,
                             sgd=True)
    np.savez(tmp_path / "weights.npz",
             **{f"start{i}": w for i, w in enumerate(start)},
             **{f"end{i}": w for i, w in enumerate(reference.get_weights())})
    result = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICAS, str(Path(__file__).parent),
         str(tmp_path / "weights.npz")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "two replicas OK" in result.stdout


@pytest.mark.parametrize("wrap", [False, True], ids=["adam", "interval_optimizer"])
def test_build_optimizer_makes_the_first_fit_trace_once(digits, wrap):
    """A train function that creates the optimizer's slots is traced twice by tf.function;
    after ``build_optimizer`` once, and the fit moves the same variables the same way."""
    results = {}
    for prebuild in (False, True):
        keras.utils.set_random_seed(0)
        model = build()
        opt = keras.optimizers.Adam(1e-2)
        if wrap:
            opt = qil_optimizer(model, opt, interval_lr_multiplier=2.0)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if prebuild:
            build_optimizer(model)
            assert len(opt.variables) > 1  # the slots exist before any step
        x, y = digits
        model.fit(x[:256], y[:256], batch_size=64, epochs=1, shuffle=False, verbose=0)
        results[prebuild] = (model.train_function.experimental_get_tracing_count(),
                             [w.copy() for w in model.get_weights()])
    assert results[False][0] == 2 and results[True][0] == 1
    for before, after in zip(results[False][1], results[True][1]):
        np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-6)
