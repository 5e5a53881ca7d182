"""Train a small QIL model for a few steps, alone or under ``tf.distribute``.

Run by ``tests/training/test_distribute.py`` in subprocesses, because the distributed
set-ups must happen before TensorFlow initializes:

    python distribute_worker.py single      OUT.npz
    python distribute_worker.py mirrored    OUT.npz   # 2 logical CPUs, 1 process
    python distribute_worker.py multiworker OUT.npz   # one process per worker;
                                                      # TF_CONFIG says which

Every mode builds the same seeded model, quantizes it with
``qil_keras.quantize`` under ``strategy.scope()``, trains ``STEPS`` SGD steps
with ``model.fit`` on the same global batches of ``GLOBAL_BATCH`` real images
(scikit-learn's 8x8 digits, in order, no shuffling) and writes every model
variable (``var/<name>``, numpy) plus diagnostics to ``OUT.npz``.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the same CPU kernels in every mode

import numpy as np  # noqa: E402

GLOBAL_BATCH = 32
STEPS = 5
LEARNING_RATE = 0.05
W_BITS = A_BITS = 3


def load_data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = digits.target.astype(np.int32)
    n = GLOBAL_BATCH * STEPS
    return x[:n], y[:n], x[n:n + 128]  # training batches, calibration batch


def build_float_model(keras):
    """Input(8,8,1) -> 2 x [Conv2D-BN-ReLU] -> GlobalAveragePooling2D -> Dense(10).

    Every initializer is seeded, so each mode (and each worker) starts from
    the same weights whatever ops the strategy adds to the graph.

    The BatchNormalization layers are ``synchronized=True``: without it each
    replica normalizes with the statistics of its own half of the global batch,
    which is Keras's documented behaviour under ``tf.distribute`` but not the
    single-device computation. With it, mean and variance are all-reduced over
    the global batch, so the distributed run computes the same function as the
    single-device one. It is set in every mode (it is a no-op on one device) so
    that every mode runs the same, non-fused batch-norm kernels.
    """
    L = keras.layers
    init = keras.initializers
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for i, filters in enumerate((8, 16)):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}",
                     kernel_initializer=init.GlorotUniform(seed=10 + i))(x)
        x = L.BatchNormalization(synchronized=True, name=f"bn{i}")(x)
        x = L.ReLU(name=f"relu{i}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    outputs = L.Dense(10, name="logits", kernel_initializer=init.GlorotUniform(seed=20),
                      bias_initializer="zeros")(x)
    return keras.Model(inputs, outputs, name="qil_distribute")


def fakequant8_probe(strategy, tf, FakeQuant8):
    """Two training calls of a lone FakeQuant8, distributed and on one device.

    The global batch is built so that the replicas see very different ranges:
    replica 0's examples lie in [-1, -0.5], replica 1's in [0.5, 3] (further
    replicas, if any, like replica 1). The range is clamped to include 0, so
    averaging per-replica ranges (MEAN aggregation alone) would be far from the
    single-device range of the global batch (``probe_naive/*`` records it). The
    second call is an EMA step (``ema_decay=0.5``). Returns ``{name: value}``
    for the output file, with every local copy of the distributed variables.
    """
    replicas = strategy.num_replicas_in_sync
    per_replica = GLOBAL_BATCH // replicas
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(2):  # the first call starts the range, the second is an EMA step
        blocks = [rng.uniform(-1.0, -0.5, (per_replica, 4, 4, 1))]
        blocks += [rng.uniform(0.5, 3.0, (per_replica, 4, 4, 1)) for _ in range(replicas - 1)]
        batches.append(np.concatenate(blocks).astype(np.float32))

    with strategy.scope():
        layer = FakeQuant8(ema_decay=0.5, name="probe_fq8")
        layer.build((None, 4, 4, 1))

    @tf.function
    def train_call(values):
        return strategy.run(lambda x: layer(x, training=True), args=(values,))

    for batch in batches:
        def local_batch(ctx, batch=batch):
            i = ctx.replica_id_in_sync_group
            return tf.constant(batch[i * per_replica:(i + 1) * per_replica])

        train_call(strategy.experimental_distribute_values_from_function(local_batch))

    reference = FakeQuant8(ema_decay=0.5, name="probe_fq8_reference")  # no strategy
    for batch in batches:
        reference(tf.constant(batch), training=True)
    # What averaging independent per-replica ranges would give (must differ).
    alone = [FakeQuant8(ema_decay=0.5, name=f"probe_fq8_alone{i}") for i in range(replicas)]
    for batch in batches:
        for i, layer_alone in enumerate(alone):
            layer_alone(tf.constant(batch[i * per_replica:(i + 1) * per_replica]), training=True)
    out = {"probe_naive/range_min": np.mean([a.range_min.numpy() for a in alone]),
           "probe_naive/range_max": np.mean([a.range_max.numpy() for a in alone])}
    for key, dist_var, ref_var in (("range_min", layer.range_min, reference.range_min),
                                   ("range_max", layer.range_max, reference.range_max),
                                   ("num_updates", layer.num_updates, reference.num_updates)):
        local = [v.numpy() for v in strategy.experimental_local_results(dist_var)]
        out[f"probe/{key}"] = np.stack(local)  # every local copy
        out[f"probe_reference/{key}"] = ref_var.numpy()
    return out


# Distances (in kernel units) at which a weight is probed for a discontinuity of its quantizer.
NEAR_LADDER = (1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)


def nearest_discontinuity(model, tf):
    """The smallest distance of ``NEAR_LADDER`` within which some QIL weight meets a
    discontinuity of its quantizer (``inf`` if none): moved by that much up or down, its
    quantized value (a rounding boundary) or whether it gets a gradient (the pruning and
    clipping thresholds) changes. Two runs whose states differ by a few ulps can take different
    paths from such a weight on, however exact each computation is."""
    def probe(layer, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            out = layer.kernel_quantizer(w, None, layer.kernel_quantizer_vars)
            total = tf.reduce_sum(out)
        return out.numpy(), tape.gradient(total, w).numpy() != 0

    layers = [(layer, tf.convert_to_tensor(layer.float_kernel))
              for layer in model.layers if hasattr(layer, "kernel_quantizer_vars")]
    unmoved = [probe(layer, w) for layer, w in layers]
    for eps in NEAR_LADDER:
        for (layer, w), (out, inside) in zip(layers, unmoved):
            for shifted in (w + eps, w - eps):
                moved_out, moved_inside = probe(layer, shifted)
                if np.any(moved_out != out) or np.any(moved_inside != inside):
                    return np.float64(eps)
    return np.float64(np.inf)


def step_recorder(keras, tf):
    class StepRecorder(keras.callbacks.Callback):
        """Every variable after each training step (``step<k>/<name>``) and, with ``near``,
        ``nearest_discontinuity`` of the state each step starts from (``near/<k>``)."""

        def __init__(self, target, result, near):
            super().__init__()
            self.target, self.result, self.near = target, result, near

        def on_train_batch_begin(self, batch, logs=None):
            if self.near:
                self.result[f"near/{batch}"] = nearest_discontinuity(self.target, tf)

        def on_train_batch_end(self, batch, logs=None):
            for v in self.target.variables:
                self.result[f"step{batch}/{v.name}"] = v.numpy()

    return StepRecorder


def make_strategy(mode, tf):
    if mode == "single":
        return tf.distribute.get_strategy()  # the default (no-op) strategy
    if mode == "mirrored":
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if mode == "multiworker":
        # Reads TF_CONFIG. RING (gRPC) is the CPU implementation of collectives.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    raise SystemExit(f"unknown mode {mode!r}")


def main(mode, out_path):
    import tensorflow as tf

    if mode == "mirrored":
        # Must run before anything initializes the TensorFlow runtime.
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import qil_keras
    from qil_keras._keras import keras

    keras.utils.set_random_seed(0)
    x, y, x_calib = load_data()
    strategy = make_strategy(mode, tf)
    result = {"num_replicas": np.int32(strategy.num_replicas_in_sync), "global_labels": y}

    with strategy.scope():
        float_model = build_float_model(keras)
        model = qil_keras.quantize(float_model, W_BITS, A_BITS, calibration_data=x_calib)
        result["bn_synchronized"] = np.array(
            [layer.synchronized for layer in model.layers
             if isinstance(layer, keras.layers.BatchNormalization)])
        model.compile(
            optimizer=keras.optimizers.SGD(LEARNING_RATE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    initial = {v.name: v.numpy() for v in model.variables}

    # One dataset for every mode: STEPS global batches, in order. Under
    # MultiWorkerMirroredStrategy, fit() distributes it with
    # experimental_distribute_dataset, which rebatches every global batch of
    # GLOBAL_BATCH into per-replica batches and, with the DATA policy, hands
    # worker i the i-th of them: worker 0 gets examples [0:16) of each global
    # batch, worker 1 examples [16:32). (The default AUTO policy would try FILE
    # sharding first and fall back to DATA with a warning.)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)

    StepRecorder = step_recorder(keras, tf)
    if mode != "single":
        result.update(fakequant8_probe(strategy, tf, qil_keras.FakeQuant8))
        # Record which labels each local replica receives in the first step.
        distributed = strategy.experimental_distribute_dataset(dataset)
        _, first_labels = next(iter(distributed))
        local = strategy.experimental_local_results(first_labels)
        result["first_step_labels"] = np.stack([t.numpy() for t in local])

    history = model.fit(dataset, epochs=1, verbose=0, shuffle=False,
                        callbacks=[StepRecorder(model, result, near=mode == "single")])
    result["loss"] = np.float32(history.history["loss"][-1])

    names = [v.name for v in model.variables]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate variable names: {names}")
    for v in model.variables:
        result[f"var/{v.name}"] = v.numpy()
        result[f"init/{v.name}"] = initial[v.name]
        result[f"trainable/{v.name}"] = np.bool_(v.trainable)
        replicas = strategy.experimental_local_results(v)
        # Largest difference between the local copies of the variable (MirroredVariable).
        result[f"replica_diff/{v.name}"] = np.float64(max(
            float(np.max(np.abs(r.numpy().astype(np.float64) - replicas[0].numpy())))
            for r in replicas))
        result[f"num_copies/{v.name}"] = np.int32(len(replicas))
        result[f"type/{v.name}"] = np.array(type(v).__name__)
    result["iterations"] = np.int64(model.optimizer.iterations.numpy())
    np.savez(out_path, **result)
    print(json.dumps({"mode": mode, "replicas": int(strategy.num_replicas_in_sync),
                      "loss": float(result["loss"])}))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
