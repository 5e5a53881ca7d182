"""The converged CIFAR-10 study (issue #17): a float ResNet-20 trained to convergence, then QIL and
baseline rows fine-tuned from it.

Stage ``float`` (this file, so far): one float ResNet-20 (``qil_keras.resnet20``) trained with the
standard recipe, on the 45k/5k split of the training folder (the first 4,500 files of each class for
training, the last 500 for validation), so that the recipe is chosen on validation images:

* SGD, momentum 0.9 (Nesterov), batch 128, learning rate 0.1 with a linear warm-up over the first
  epoch, then cosine decay to 0 at the last step;
* weight decay 5e-4 in the SGD sense (``grad += 5e-4 · w`` on conv and dense kernels; written as
  Keras ``L2(2.5e-4)``, whose gradient is ``2 · 2.5e-4 · w``), none on BatchNorm;
* zero-pad 4, random 32x32 crop, horizontal flip, CIFAR-10 mean/std normalization
  (``qil_keras.datasets.load_image_folder(style="cifar", training=True)``);
* ``epochs`` epochs (60 at ``--size full``); the model scored is the last epoch's, not the best.

Per epoch: training loss and top-1 (training mode, augmented) and validation top-1 (5,000 held-out
training images); at the end: top-1 on the 10,000 test images. Resumable per epoch
(``BackupAndRestore`` plus an appended CSV log) from a work folder outside the work tree
(``--work``, default ``$QIL_CACHE_DIR/cifar_study``), so a later session on the same machine can
resume a run an earlier one left; the finished weights are written to
``<out>/cifar_study/float_resnet20.weights.h5`` (1 MB, committed: every later row starts from it).

Stage ``qil`` (after ``float``): rows fine-tuned from the committed float weights, each
``row_epochs`` epochs per bit-width stage (15 at ``--size full``) of SGD (momentum 0.9, Nesterov,
learning rate 0.01 with cosine decay to 0 per stage, the model's L2 as in the float run), interval
variables at 0.01x the learning rate (``qil_optimizer``; README "Interval learning rate with
SGD"), QILBatchNormalization with the default freeze:

* ``qil_direct_{4,3,2}``: ``quantize(float, b, b)`` then one stage;
* ``qil_progressive``: 4/4 -> 3/3 -> 2/2, each stage the direct rows' epochs (the paper's
  comparison: progressive adds earlier stages); ``qil_direct_2_long``: 2/2 for the chain's
  total epochs (the control for the extra training);
* ``qil_frozen_2``: 2/2 with the intervals frozen at their initial values;
* ``qil_direct_2_conv1_4``: direct 2/2 with the first conv's weights at 4 bits instead of 8
  (``layer_bits={"conv1": (4, 8)}``, the recipe for one file under both CPU kernel sets,
  ``bench/first_layer_bits.py``): its accuracy cost at the study's budget, paired by seed with
  ``qil_direct_2``;
* ``float_finetune``: the float model trained ``row_epochs`` more epochs the same way;
* ``tfmot_{4,2}``: tfmot's ``DefaultNBitQuantizeScheme(b, b)`` with the first and last layers at 8
  bits (``accuracy_cifar.tfmot_model``), its activation ranges calibrated on 512 training
  images before training (one training-mode pass with the moving average's decay at 0, BatchNorm
  statistics restored), then trained like the QIL rows; whether its file converts.

Per row: final-epoch test top-1 of the Keras model (10,000 images; for the progressive chain also
each stage's model, its zeros and γ), and of its INT8 export under
XNNPACK and under the builtin kernels (``export_tflite`` verifies on 2,000 test images and
raises below 99.5 % agreement, recorded as the row's export error); γ's final values; zero
weight levels per layer against the rounding-only zeros of the initial grid at the row's bits.
Seeds: ``seeds`` for the rows named in ``seeded_rows`` (the float model is one; its variance
is not sampled). Resumable per stage (``progressive_fit(checkpoint_dir=...)``) and per epoch
(``BackupAndRestore``) under ``--work``.

Outputs: ``<out>/cifar_study.json`` and ``.md`` (quick runs under ``<out>/quick/``).
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "cifar_study"

SIZES = {
    "quick": dict(train_per_class=200, val_per_class=50, test_images=500, batch=64, epochs=3,
                  lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, seed=0,
                  row_epochs=1, row_lr=0.01, interval_lr_multiplier=0.01, seeds=(0,),
                  export_images=200),
    "full": dict(train_per_class=4500, val_per_class=500, test_images=10000, batch=128, epochs=60,
                 lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, seed=0,
                 row_epochs=15, row_lr=0.01, interval_lr_multiplier=0.01, seeds=(0, 1),
                 export_images=2000),
}
FLOAT_SETTINGS = ("train_per_class", "val_per_class", "test_images", "batch", "epochs", "lr",
                  "momentum", "weight_decay", "warmup_epochs", "seed")
ROW_SETTINGS = ("row_epochs", "row_lr", "interval_lr_multiplier", "seeds", "export_images")
# name -> (stages, interval multiplier key, epochs factor); stages None = the float model.
ROWS = {
    "qil_direct_4": ([(4, 4)], "learned", 1),
    "qil_direct_2": ([(2, 2)], "learned", 1),
    "qil_direct_3": ([(3, 3)], "learned", 1),
    "qil_frozen_2": ([(2, 2)], "frozen", 1),
    "float_finetune": (None, "learned", 1),
    "qil_progressive": ([(4, 4), (3, 3), (2, 2)], "learned", 1),
    "qil_direct_2_long": ([(2, 2)], "learned", 3),
    "tfmot_4": ("tfmot", 4, 1),
    "tfmot_2": ("tfmot", 2, 1),
    "qil_direct_2_conv1_4": ([(2, 2)], "learned", 1),
}
# Rows that override bits per layer (``quantize``'s ``layer_bits``; every stage gets the same).
ROW_LAYER_BITS = {"qil_direct_2_conv1_4": {"conv1": (4, 8)}}
SEEDED_ROWS = ("qil_direct_4", "qil_direct_2", "qil_progressive", "qil_frozen_2",
               "qil_direct_2_conv1_4")
TRAIN_FILES_PER_CLASS = 5000  # CIFAR-10's training folder


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    parser.add_argument("--stage", choices=("float", "qil", "all"), default="all",
                        help="which part of the study to run (all: float, then the rows)")
    parser.add_argument("--rows", nargs="*", default=None, choices=sorted(ROWS),
                        help="run only these rows (default: all, in the table's order)")
    parser.add_argument("--redo", nargs="*", default=(), metavar="ROW/seedN",
                        help="run these finished rows again (e.g. qil_direct_2/seed0): each is "
                             "moved to 'superseded' in the JSON with --redo-reason, and its "
                             "checkpoint folder is cleared")
    parser.add_argument("--redo-reason", default=None,
                        help="why the --redo rows run again (required with --redo)")
    parser.add_argument("--redo-keep-stages", type=int, default=0, metavar="K",
                        help="with --redo: keep the first K finished stages of a row with more "
                             "than K stages (stages the reason does not touch), run the rest")
    parser.add_argument("--work", default=None,
                        help="checkpoint folder (default $QIL_CACHE_DIR/cifar_study[_quick], else "
                             "~/.cache/qil_keras/cifar_study[_quick])")
    return parser.parse_args(argv)


def full_size_args(args):
    """This study's full-size arguments for another script that reuses its float model and data
    (``bench/width_floor.py``, ``bench/first_layer_bits.py``): that script's ``--out``,
    ``--data`` and ``--cache-dir``."""
    return parse_args(["--size", "full", "--out", args.out]
                      + (["--data", args.data] if args.data else [])
                      + (["--cache-dir", args.cache_dir] if args.cache_dir else []))


class WarmupCosine:
    """Learning rate: linear from ``lr / warmup`` to ``lr`` over ``warmup`` steps, then
    ``lr · (1 + cos(π t)) / 2`` with ``t`` going from 0 to 1 over the remaining steps."""

    def __new__(cls, lr, warmup, total):
        from qil_keras import keras
        import tensorflow as tf

        class _Schedule(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                step = tf.cast(step, tf.float32)
                warm = lr * (step + 1.0) / float(max(1, warmup))
                t = tf.clip_by_value((step - warmup) / float(max(1, total - warmup)), 0.0, 1.0)
                cos = 0.5 * lr * (1.0 + tf.cos(np.pi * t))
                return tf.where(step < warmup, warm, cos)

            def get_config(self):
                return {"lr": lr, "warmup": warmup, "total": total}

        return _Schedule()


def work_folder(args):
    if args.work:
        return args.work
    base = args.cache_dir or os.environ.get("QIL_CACHE_DIR") or os.path.expanduser(
        "~/.cache/qil_keras")
    return os.path.join(base, NAME + ("_quick" if args.size == "quick" else ""))


def datasets(args, cfg):
    """``(train, val, (x_test, y_test), steps_per_epoch)``."""
    from qil_keras import datasets as qd

    archive = common.check_archive(args.data or common.default_archive())
    n_train = cfg["train_per_class"]
    train, info = qd.load_image_folder(
        archive, "train", training=True, style="cifar", batch_size=cfg["batch"],
        limit_per_class=n_train, seed=cfg["seed"], drop_remainder=True, cache=True,
        cache_dir=args.cache_dir)
    val, _ = qd.load_image_folder(
        archive, "train", training=False, style="cifar", batch_size=256,
        skip_per_class=TRAIN_FILES_PER_CLASS - cfg["val_per_class"], cache=True,
        cache_dir=args.cache_dir, class_names=info.class_names)
    x_test, y_test, _ = common.cifar_images(args, cfg["test_images"], "test", seed=0)
    return train, val, (x_test, y_test), (n_train * 10) // cfg["batch"]


def train_float(args, cfg, store, out):
    import qil_keras
    from qil_keras import keras

    weights = os.path.join(out, NAME, "float_resnet20.weights.h5")
    if store.has("float") and os.path.exists(weights):
        print(f"float: done ({weights})")
        return
    work = work_folder(args)
    if args.fresh and os.path.isdir(work):
        shutil.rmtree(work)   # --fresh: no checkpoint or appended log of an earlier run
    os.makedirs(work, exist_ok=True)
    train, val, (x_test, y_test), steps = datasets(args, cfg)
    keras.utils.set_random_seed(cfg["seed"])
    model = qil_keras.resnet20(num_classes=10, weight_decay=cfg["weight_decay"] / 2)
    total = steps * cfg["epochs"]
    optimizer = keras.optimizers.SGD(
        WarmupCosine(cfg["lr"], steps * cfg["warmup_epochs"], total),
        momentum=cfg["momentum"], nesterov=True)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    t0 = time.perf_counter()
    history = _fit_resumable(model, train, val, cfg["epochs"], os.path.join(work, "float"))
    wall = time.perf_counter() - t0
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    model.save_weights(weights)
    test_top1 = float(np.mean(model.predict(x_test, batch_size=256, verbose=0).argmax(1) == y_test))
    store.add("float", {
        "test_top1": test_top1, "test_images": int(len(y_test)),
        "val_top1_final": history[-1]["val_accuracy"] if history else None,
        "train_top1_final": history[-1]["accuracy"] if history else None,
        "epochs_logged": len(history), "history": history,
        "wall_s_this_process": wall, "weights": os.path.relpath(weights, common.REPO_ROOT),
    })
    print(f"float: test top-1 {test_top1:.4f}")


def _float_weights(out):
    return os.path.join(out, NAME, "float_resnet20.weights.h5")


def _load_float(args, cfg, out):
    import qil_keras
    from qil_keras import keras

    model = qil_keras.resnet20(num_classes=10, weight_decay=cfg["weight_decay"] / 2)
    model.load_weights(_float_weights(out))
    model.compile(keras.optimizers.SGD(), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    return model


def _weight_zeros(model):
    import qil_keras

    return {layer.name: float(np.mean(layer.integer_levels() == 0)) for layer in model.layers
            if isinstance(layer, (qil_keras.QILConv2D, qil_keras.QILDense,
                                  qil_keras.QILDepthwiseConv2D))}


def _gammas(model):
    return {w.name.split(":")[0]: float(w.numpy()) for w in model.weights
            if w.name.split(":")[0].endswith("_gamma") and w.shape.rank == 0}


def _file_top1(model, x_test, y_test, cfg):
    """INT8 export of ``model``: verification on ``export_images`` test images, then top-1 on all
    test images under XNNPACK and under the builtin kernels."""
    from qil_keras.integer.export import ExportError, export_tflite

    n = cfg["export_images"]
    t0 = time.perf_counter()
    try:
        report = export_tflite(model, validation_data=(x_test[:n], y_test[:n]))
    except ExportError as error:
        return {"export_error": f"{type(error).__name__}: {error}"[:2000]}
    row = {"export_s": time.perf_counter() - t0, "file_bytes": len(report.model_bytes),
           "export_agreement": report.agreement,
           "export_max_diff_steps": report.max_abs_diff_steps}
    row.update(_file_top1_by_kernels(report.model_bytes, x_test, y_test))
    return row


def _file_top1_by_kernels(model_bytes, x_test, y_test):
    """``{"file_top1_xnnpack", "file_top1_builtin"}``: the file's top-1 under each kernel set."""
    from qil_keras.integer.export import run_tflite

    top1 = {}
    for label, resolver in (("xnnpack", "AUTO"), ("builtin", "BUILTIN_WITHOUT_DEFAULT_DELEGATES")):
        logits = run_tflite(model_bytes, x_test, op_resolver=resolver)
        top1[f"file_top1_{label}"] = float(np.mean(logits.argmax(1) == y_test))
    return top1


def calibrate_tfmot(model, x):
    """Set every tfmot activation range (``MovingAverageQuantizer``) to the range of ``x``'s
    activations: one training-mode pass with the moving average's decay at 0, BatchNorm's moving
    statistics restored afterwards. Returns the number of quantizers calibrated."""
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops
    from tensorflow_model_optimization.python.core.quantization.keras.quantizers import (
        MovingAverageQuantizer)

    class Calibrating(MovingAverageQuantizer):
        def __call__(self, inputs, training, weights, **kwargs):
            return quant_ops.MovingAvgQuantize(
                inputs, weights["min_var"], weights["max_var"], ema_decay=0.0,
                is_training=training, num_bits=self.num_bits, per_channel=self.per_axis,
                symmetric=self.symmetric, narrow_range=self.narrow_range)

    found = {}
    for layer in model.layers:
        candidates = [getattr(layer, "quantizer", None)]
        candidates += [a.quantizer for a in getattr(layer, "_quantize_activations", [])]
        candidates += list(getattr(layer, "_output_quantizers", []))
        for quantizer in candidates:
            if type(quantizer) is MovingAverageQuantizer:
                found[id(quantizer)] = quantizer
    statistics = [w for w in model.weights if "moving_mean" in w.name or "moving_variance" in w.name]
    saved = [w.numpy() for w in statistics]
    for quantizer in found.values():
        quantizer.__class__ = Calibrating
    try:
        model(x, training=True)
    finally:
        for quantizer in found.values():
            quantizer.__class__ = MovingAverageQuantizer
        for weight, value in zip(statistics, saved):
            weight.assign(value)
    return len(found)


def _per_epoch(history):
    """A Keras ``history`` dict as one dict per epoch."""
    return [{key: float(values[i]) for key, values in history.items()}
            for i in range(len(history["loss"]))]


def _fit_resumable(model, train, val, epochs, work):
    """``fit`` resumable per epoch under ``work``; the history of every epoch, those of an
    interrupted earlier run included (``qil_keras``' ``CSVLogger`` + ``BackupAndRestore``)."""
    from qil_keras.training.progressive import read_epoch_log, resumable_callbacks

    os.makedirs(work, exist_ok=True)
    model.fit(train, validation_data=val, epochs=epochs, verbose=2,
              callbacks=resumable_callbacks(work))
    return _per_epoch(read_epoch_log(os.path.join(work, "epochs.csv")))


def run_tfmot_row(name, seed, args, cfg, out, data):
    from qil_keras import keras
    from accuracy_cifar import tfmot_model, try_convert

    _, bits, factor = ROWS[name]
    train, val, (x_test, y_test), steps = data
    epochs = cfg["row_epochs"] * factor
    work = os.path.join(work_folder(args), f"{name}_seed{seed}")
    keras.utils.set_random_seed(seed)
    model, changed = tfmot_model(_load_float(args, cfg, out), bits)
    calibration = np.concatenate([b[0].numpy() for b in train.take(max(1, 512 // cfg["batch"]))])
    calibrated = calibrate_tfmot(model, calibration[:512])
    model.compile(keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(
        cfg["row_lr"], steps * epochs), momentum=cfg["momentum"], nesterov=True),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    t0 = time.perf_counter()
    history = _fit_resumable(model, train, val, epochs, work)
    row = {"row": name, "seed": seed, "epochs_per_stage": epochs, "stages": [[bits, bits]],
           "set_to_8_bits": changed, "calibrated_quantizers": calibrated,
           "calibration_images": int(min(512, len(calibration))),
           "fit_wall_s": time.perf_counter() - t0, "history": history,
           "keras_top1": float(np.mean(
               model.predict(x_test, batch_size=256, verbose=0).argmax(1) == y_test))}
    tflite, errors = try_convert(model)
    row.update(converts=tflite is not None, convert_errors=errors)
    if tflite is not None:
        row.update(_file_top1_by_kernels(tflite, x_test, y_test))
    return row


def run_row(name, seed, args, cfg, out, data):
    """One row of the study: fine-tune, evaluate, export."""
    import qil_keras
    from qil_keras import keras

    stages, intervals, factor = ROWS[name]
    if stages == "tfmot":
        return run_tfmot_row(name, seed, args, cfg, out, data)
    train, val, (x_test, y_test), steps = data
    epochs = cfg["row_epochs"] * factor
    work = os.path.join(work_folder(args), f"{name}_seed{seed}")
    os.makedirs(work, exist_ok=True)
    keras.utils.set_random_seed(seed)
    base = _load_float(args, cfg, out)

    def optimizer(*_):
        return keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(
            cfg["row_lr"], steps * epochs), momentum=cfg["momentum"], nesterov=True)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    calibration = next(iter(train))[0][:256]
    t0 = time.perf_counter()
    layer_bits = ROW_LAYER_BITS.get(name)
    row = {"row": name, "seed": seed, "epochs_per_stage": epochs,
           "stages": None if stages is None else [list(s) for s in stages]}
    if layer_bits:
        row["layer_bits"] = {layer: list(bits) for layer, bits in layer_bits.items()}
    if stages is None:
        model = base
        model.compile(optimizer(), loss, metrics=["accuracy"])
        row["history"] = _fit_resumable(model, train, val, epochs, work)
    else:
        initial = qil_keras.quantize(base, *stages[-1], calibration_data=calibration,
                                     layer_bits=layer_bits)
        row["zeros_initial_grid"] = _weight_zeros(initial)
        del initial
        multiplier = 0.0 if intervals == "frozen" else cfg["interval_lr_multiplier"]
        result = qil_keras.progressive_fit(
            base, train, stages=[qil_keras.Stage(*s, layer_bits=layer_bits) for s in stages],
            epochs_per_stage=epochs, optimizer=optimizer,
            loss=loss, metrics=["accuracy"], validation_data=val, calibration_data=calibration,
            interval_lr_multiplier=multiplier, checkpoint_dir=os.path.join(work, "stages"),
            verbose=2)
        model = result.final_model
        row["history"] = [_per_epoch(h) if h else None for h in result.histories]
        row["zeros_final"] = _weight_zeros(model)
        row["gamma_final"] = _gammas(model)
    row["fit_wall_s"] = time.perf_counter() - t0

    def test_top1(m):
        return float(np.mean(m.predict(x_test, batch_size=256, verbose=0).argmax(1) == y_test))

    row["keras_top1"] = test_top1(model)
    if stages is not None and len(stages) > 1:
        # the chain's earlier stages against the direct rows at their bits (test top-1, inner
        # zeros); the file is exported for the last stage only, the final model scored above
        row["stage_keras_top1"] = [test_top1(m) for m in result.models[:-1]] + [row["keras_top1"]]
        row["stage_zeros"] = [_weight_zeros(m) for m in result.models[:-1]] + [row["zeros_final"]]
        row["stage_gamma"] = [_gammas(m) for m in result.models[:-1]] + [row["gamma_final"]]
    row.update(_file_top1(model, x_test, y_test, cfg) if stages is not None else {})
    return row


def note_unlogged_epochs(row):
    """Rows resumed by an earlier version of this script (before the per-epoch log) hold only
    the epochs of their last process in ``history``; say so in the row."""
    history = row.get("history") or []
    stages = history if history and (history[0] is None or isinstance(history[0], list)) \
        else [history]
    expected = row["epochs_per_stage"] * len(stages)
    logged = sum(len(stage or []) for stage in stages)
    if logged < expected:
        row["history_note"] = (
            f"{expected - logged} of {expected} epochs ran in an earlier process, before "
            "bench/cifar_study.py logged every epoch (CSVLogger): not in history")


def run_rows(args, cfg, store, out):
    if not os.path.exists(_float_weights(out)):
        raise SystemExit(f"the rows start from {_float_weights(out)}: run --stage float first")
    data = None
    # every row's first seed before any second seed: a partial run still covers every row
    order = [(name, seed) for i, seed in enumerate(cfg["seeds"])
             for name in (args.rows or list(ROWS)) if i == 0 or name in SEEDED_ROWS]
    for name, seed in order:
        key = f"{name}/seed{seed}"
        if store.has(key):
            continue
        data = data or datasets(args, cfg)
        row = run_row(name, seed, args, cfg, out, data)
        note_unlogged_epochs(row)
        row["settings"] = {k: cfg[k] for k in ROW_SETTINGS}
        store.add(key, row)
        print(f"{key}: Keras {store.get(key)['keras_top1']:.4f}", flush=True)
        write_markdown(store, os.path.join(out, f"{NAME}.md"))


def redo(args, store):
    """Supersede the ``--redo`` rows and clear their checkpoints (all but the first
    ``--redo-keep-stages`` stages), so that ``run_rows`` runs them again.

    A row already superseded for the same reason (rerun since), or produced by the current
    commit, is kept, and a row not in the file (superseded earlier, its rerun interrupted)
    keeps its checkpoints: the same command resumes, at this commit or a later one."""
    if not args.redo_reason:
        raise SystemExit("--redo needs --redo-reason: say why the rows run again")
    for key in args.redo:
        name, _, seed = key.partition("/seed")
        if name not in ROWS or not seed.isdigit():
            raise SystemExit(f"--redo {key!r}: expected ROW/seedN with ROW one of {sorted(ROWS)}")
        if not store.redo(key, args.redo_reason):
            continue
        print(f"{key}: superseded ({args.redo_reason})", flush=True)
        work = os.path.join(work_folder(args), f"{name}_seed{seed}")
        stages = os.path.join(work, "stages")
        row_stages = ROWS[name][0]
        if (isinstance(row_stages, list) and len(row_stages) > args.redo_keep_stages > 0
                and os.path.isdir(stages)):
            for folder in os.listdir(stages):
                index = folder.split("_")[1] if folder.startswith("stage_") else ""
                if index.isdigit() and int(index) > args.redo_keep_stages:
                    shutil.rmtree(os.path.join(stages, folder))
        else:
            shutil.rmtree(work, ignore_errors=True)


def write_markdown(store, path):
    lines = [common.run_header_markdown(store.data["run"]), ""]
    row = store.get("float") if store.has("float") else None
    if row:
        lines += ["## Float ResNet-20", "",
                  common.markdown_table([{
                      "epochs": row["epochs_logged"],
                      "train top-1 (last epoch, augmented)": row["train_top1_final"],
                      "val top-1 (5k held out)": row["val_top1_final"],
                      "test top-1 (10k)": row["test_top1"]}],
                      [("epochs", None), ("train top-1 (last epoch, augmented)", None, ".4f"),
                       ("val top-1 (5k held out)", None, ".4f"),
                       ("test top-1 (10k)", None, ".4f")]), ""]
    rows = []
    for key, row in store.rows.items():
        if key == "float":
            continue
        zeros = row.get("zeros_final") or {}
        initial = row.get("zeros_initial_grid") or {}
        inner = [k for k in zeros if k not in ("conv1", "fc")]
        gammas = list((row.get("gamma_final") or {}).values())
        rows.append({
            "row": key, "epochs": row["epochs_per_stage"], "keras": 100 * row["keras_top1"],
            "xnnpack": 100 * row["file_top1_xnnpack"] if "file_top1_xnnpack" in row else None,
            "builtin": 100 * row["file_top1_builtin"] if "file_top1_builtin" in row else None,
            "export": (row.get("export_error") or ("converts" if row.get("converts") else None)
                       or ("; ".join(row.get("convert_errors") or [])) or
                       ("ok" if "file_top1_xnnpack" in row else "n/a"))[:60],
            "gamma": f"{min(gammas):.3f}–{max(gammas):.3f}" if gammas else None,
            "zeros": (f"{100 * np.mean([zeros[k] for k in inner]):.1f} vs "
                      f"{100 * np.mean([initial[k] for k in inner]):.1f}") if inner else None})
    if rows:
        lines += [f"## Rows (final epoch, {store.data['settings']['test_images']:,} test images)",
                  "",
                  "`zeros`: mean share of zero weight levels over the inner layers, learned vs "
                  "the initial grid's rounding-only zeros at the row's final bits.", "",
                  common.markdown_table(rows, [
                      ("row", None), ("epochs per stage", "epochs"),
                      ("Keras top-1 %", "keras", ".2f"), ("file, XNNPACK %", "xnnpack", ".2f"),
                      ("file, builtin %", "builtin", ".2f"), ("export", None),
                      ("γ range", "gamma"), ("zeros %", "zeros")]), ""]
    common.write_text(path, "\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    cfg = SIZES[args.size]
    # The file's settings are the float model's (a row records its own: the rows' settings can
    # change without invalidating the float model every row starts from).
    out, store = common.open_store(args, NAME, {k: cfg[k] for k in FLOAT_SETTINGS}, argv)
    if args.stage in ("float", "all"):
        train_float(args, cfg, store, out)
    if args.redo:
        redo(args, store)
    if args.stage in ("qil", "all"):
        run_rows(args, cfg, store, out)
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
