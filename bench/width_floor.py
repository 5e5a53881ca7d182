"""The weight width's floor (commit 236ee0a): what it changes, against the width as before.

A weight interval's width ``d`` is reflected at ``|c|/16`` (``ops.effective_weight_interval``).
Before, it was free down to the constraint's ``1e-6``; ``WEIGHT_WIDTH_FLOOR = 0`` computes that
again (the reflection then sits at ``1e-6``, where the constraint keeps ``d`` anyway). Two parts:

* ``study``: the CIFAR-10 study's float ResNet-20 (``bench/cifar_study.py``, its committed
  weights) quantized at 2/2 and fine-tuned for ``steps`` steps as the study's rows start (SGD,
  Nesterov momentum 0.9, cosine decay from 0.01 over the rows' 15 epochs, intervals at 0.01x;
  the same batches in every arm): the old width, the floor, and frozen intervals. Per arm:
  training top-1 over the run (training mode), validation top-1 on the 5,000 held-out images
  (after the BatchNorm re-estimation that ends ``fit``), the layers pruned to all zeros, the
  smallest effective ``d'/c'`` at the end, and ``layer3_2_conv2``'s effective lower threshold
  ``c' - d'`` and width ``d'`` every ``trace_every`` steps.
* ``intervals``: the learned arm of ``bench/intervals.py`` (Adam, 4 epochs; seed 0; MNIST
  digits and the CIFAR-10 subset at 2/2 and 3/3) with the old width and with the floor: whether
  the floor changes anything there (test top-1, zeros).

Outputs: ``width_floor.json``, ``width_floor.md`` (quick runs under ``<out>/quick/``).
"""

import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "width_floor"
FLOORS = {"old width": 0.0, "floor |c|/16": 1.0 / 16.0}
TRACED = "layer3_2_conv2"
SIZES = {
    "quick": dict(steps=20, trace_every=5, intervals=False),
    "full": dict(steps=351, trace_every=10, intervals=True),
}


@contextlib.contextmanager
def _width_floor(value):
    """``ops.WEIGHT_WIDTH_FLOOR = value`` inside the block (``None``: the package's own), restored
    after it."""
    from qil_keras.quantization import ops

    saved = ops.WEIGHT_WIDTH_FLOOR
    ops.WEIGHT_WIDTH_FLOOR = saved if value is None else value
    try:
        yield
    finally:
        ops.WEIGHT_WIDTH_FLOOR = saved


def _weight_layers(model):
    return [layer for layer in model.layers if hasattr(layer, "kernel_quantizer_vars")]


def _effective(layer):
    """The ``(c', d')`` the forward pass uses (numpy)."""
    variables = layer.kernel_quantizer_vars
    c, d = layer.kernel_quantizer.effective_interval(variables["c"], variables["d"])
    return c.numpy(), d.numpy()


def _width_ratios(model):
    """``{layer: min d'/c'}`` over the layer's (per-channel) interval, effective values."""
    ratios = {}
    for layer in _weight_layers(model):
        c, d = _effective(layer)
        ratios[layer.name] = float(np.min(d / c))
    return ratios


def study_arm(arm, args, cfg, data):
    """One arm of the study part: a fresh 2/2 model, ``cfg['steps']`` steps, the same batches."""
    with _width_floor(FLOORS.get(arm)):  # frozen: the package's floor
        return _study_arm(arm, args, cfg, data)


def _study_arm(arm, args, cfg, data):
    import cifar_study
    import qil_keras
    from qil_keras import keras
    from qil_keras.training.model import fully_pruned_layers

    study = cifar_study.SIZES["full"]
    batches, val, steps_per_epoch = data
    keras.utils.set_random_seed(0)
    base = cifar_study._load_float(args, study, args.out)
    model = qil_keras.quantize(base, 2, 2, calibration_data=batches[0][0][:256])
    schedule = keras.optimizers.schedules.CosineDecay(
        study["row_lr"], steps_per_epoch * study["row_epochs"])
    optimizer = qil_keras.qil_optimizer(
        model, keras.optimizers.SGD(schedule, momentum=study["momentum"], nesterov=True),
        interval_lr_multiplier=0.0 if arm == "frozen" else study["interval_lr_multiplier"])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    traced = model.get_layer(TRACED)
    trace = []

    class Trace(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch % cfg["trace_every"] == 0 or batch == cfg["steps"] - 1:
                c, d = _effective(traced)
                trace.append([batch + 1, float(c - d), float(d)])

    import tensorflow as tf

    x = tf.concat([b[0] for b in batches], 0)
    y = tf.concat([b[1] for b in batches], 0)
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(batches[0][0])),
                        epochs=1, validation_data=val, callbacks=[Trace()], verbose=0)
    ratios = _width_ratios(model)
    smallest = min(ratios, key=ratios.get)
    return {"arm": arm, "steps": cfg["steps"], "train_top1": history.history["accuracy"][-1],
            "val_top1": history.history["val_accuracy"][-1],
            "fully_pruned": fully_pruned_layers(model),
            "smallest_width": [smallest, ratios[smallest]], "trace": trace}


def intervals_arm(dataset, bits, floor_name, data, base):
    import intervals

    with _width_floor(FLOORS[floor_name]):
        row = intervals.run("learned", bits, 0, base, data, intervals.SIZES["full"])
    return {"data": dataset, "bits": bits, "width": floor_name, "test_top1": row["test_top1"],
            "zeros_final": row["zeros_final"]}


def write_markdown(store, path):
    rows = store.rows
    lines = [f"# {NAME}: the weight width's floor against the width as before", "",
             common.run_header_markdown(store.data["run"]), ""]
    study = [r for k, r in rows.items() if k.startswith("study/")]
    if study:
        lines += ["## The CIFAR-10 study's 2/2 ResNet-20, first epoch", "",
                  common.markdown_table(
                      [dict(r, arm=r["arm"].replace("|", "\\|"),
                            pruned=", ".join(r["fully_pruned"]) or "none",
                            smallest=f"{r['smallest_width'][1]:.3f} ({r['smallest_width'][0]})")
                       for r in study],
                      [("intervals", "arm"), ("steps", "steps"),
                       ("training top-1", "train_top1", ".4f"), ("validation top-1", "val_top1", ".4f"),
                       ("layers pruned to all zeros", "pruned"),
                       ("smallest d'/c' at the end", "smallest")]), ""]
        for r in study:
            lines.append(f"`{TRACED}` `(step, lower threshold c' − d', width d')`, {r['arm']}: "
                         + ", ".join(f"({s}, {lo:.4g}, {d:.4g})" for s, lo, d in r["trace"]))
        lines.append("")
    inner = [r for k, r in rows.items() if k.startswith("intervals/")]
    if inner:
        lines += ["## bench/intervals.py's learned arm, seed 0", "",
                  common.markdown_table(
                      [dict(r, bits=f"{r['bits']}/{r['bits']}", width=r["width"].replace("|", "\\|"),
                            zeros=f"{100 * np.mean(list(r['zeros_final'].values())):.2f}")
                       for r in inner],
                      [("data", "data"), ("bits", "bits"), ("width", "width"),
                       ("test top-1", "test_top1", ".4f"), ("mean zeros %", "zeros")]), ""]
    common.write_text(path, "\n".join(lines))


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    out, store = common.open_store(args, NAME, cfg, argv)
    import cifar_study

    study_args = cifar_study.full_size_args(args)
    data = None
    for arm in list(FLOORS) + ["frozen"]:
        key = f"study/{arm}"
        if not store.has(key):
            if data is None:  # the same batches (order, crops, flips) for every arm
                train, val, _, steps_per_epoch = cifar_study.datasets(
                    study_args, cifar_study.SIZES["full"])
                data = (list(train.take(cfg["steps"])), val, steps_per_epoch)
            store.add(key, study_arm(arm, study_args, cfg, data))
            print(f"{key}: {store.get(key)['val_top1']:.4f}", flush=True)
            write_markdown(store, os.path.join(out, f"{NAME}.md"))
    if cfg["intervals"]:
        import intervals

        for dataset in ("cifar", "mnist"):
            inner_data, base = None, None
            for bits in (2, 3):
                for floor_name in FLOORS:
                    key = f"intervals/{dataset}/{bits}/{floor_name}"
                    if store.has(key):
                        continue
                    if base is None:
                        inner_cfg = intervals.SIZES["full"]
                        inner_data = common.small_data(dataset, args, inner_cfg["cifar_train"],
                                                       inner_cfg["cifar_test"])
                        base = intervals.float_model(dataset, inner_data, inner_cfg)
                    store.add(key, intervals_arm(dataset, bits, floor_name, inner_data, base))
                    print(f"{key}: {store.get(key)['test_top1']:.4f}", flush=True)
                    write_markdown(store, os.path.join(out, f"{NAME}.md"))
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
