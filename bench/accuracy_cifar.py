"""Accuracy on CIFAR-10: float, QIL (progressive, direct, quantizer-only, fixed γ), tfmot n-bit, PTQ int8
(issue #6, item 2).

One float ResNet-20 (``qil_keras.resnet20``) is trained for ``float_epochs`` epochs (with
``shared_float``, the default at both sizes, once with the first seed and shared by all seeds: the
seeds then vary the fine-tuning -- data order, augmentation, calibration batch -- not the float
model; the 2-hour budget of the full size has no room for a float model per seed) and cached under
``<out>/accuracy_work/``. Every other row starts from it and gets the same fine-tuning budget of
``budget_steps`` optimizer steps on the same augmented training stream:

* ``float``: the float model itself (Keras top-1);
* ``ptq_int8``: ``qil_keras.convert_int8_ptq(float, 256 training images)`` run with LiteRT;
* ``qil_prog_{4,3,2}``: ``qil_keras.progressive_fit`` through the paper's schedule
  FP -> 5/5 -> 4/4 [-> 3/3 [-> 2/2]], the budget split evenly over the stages (starting at 5/5 as
  the paper does, so ``qil_prog_4`` is not the same run as ``qil_direct_4``);
* ``qil_direct_{4,3,2}``: ``progressive_fit`` with one stage at the target bits (direct);
* ``qil_qonly_{4,2}``: direct, ``quantizer_only=True`` (weights and BatchNorm frozen);
* ``qil_gamma_fixed_{3,2}``: direct, ``train_gamma=False`` (γ = 1), against ``qil_direct_{3,2}``;
* ``tfmot_nbit_{4,2}``: tfmot's ``DefaultNBitQuantizeScheme(b, b)`` via
  ``quantize_apply(quantize_annotate_model(float), scheme)``, same optimizer and budget; Keras
  top-1, and whether ``TFLiteConverter`` (``optimizations=[DEFAULT]``) converts it (else the
  converter's distinct error messages).

The same for every QIL and tfmot row: Adam, learning rate ``lr`` with cosine decay to 0 over each
stage (a fresh optimizer per stage, as ``progressive_fit`` makes), no weight decay, interval
learning rate = weight learning rate, batch ``batch``, ``jit_compile=False``, sparse categorical
cross-entropy on logits. QIL: first and last weight layers (``conv1``, ``fc``) at 8 bits
(``first_last_bits=8``); weight intervals re-initialized when a stage changes the bits (the library
default). tfmot's scheme has no first/last option; after ``quantize_apply`` and before training the
script sets to 8 bits the input quantizer, ``conv1``'s weight quantizer, the pooled features that
feed ``fc`` and ``fc``'s weights and output (``num_bits`` of those quantizer objects): the same
policy. The rest is tfmot's scheme: conv kernels quantized before BatchNorm (this scheme does not
fold), BatchNorm outputs before each residual add quantized at ``b`` bits.

Training data: ``qil_keras.datasets.load_image_folder(style="cifar", training=True)`` (zero-pad 4,
random 32x32 crop, horizontal flip, CIFAR-10 normalization) over the first ``train_images / 10``
files of each class, whole batches. Float: ``float_epochs`` passes, shuffled with the seed. A
fine-tuning stage of ``n`` steps is one ``fit`` epoch over the first ``n`` batches of a fresh
shuffle (seed + 1000); a direct row has one stage of ``budget_steps``, a progressive row with k
stages k stages of ``budget_steps / k``. Test: the first ``test_images / 10`` test files per class.

For every QIL row: Keras top-1 before export; then ``qil_keras.export_tflite(weight_storage="int8",
min_agreement=0, validation_data=test set)``: the exported file's top-1, its top-1 agreement with the
Keras model, the Keras top-1 of the export's snapped copy (``report.keras_model``); and the weight pruning ratio
(``qil_keras.pruning_ratios``: fraction of integer levels at 0, parameter-weighted over the inner
low-bit layers; the plain mean over all weight layers is stored too).

The rows after the float ones run in ``--workers`` processes (default 2, each with ``cores / 2``
TensorFlow threads): ``qil_keras.quantize``, model copies and tf.function tracing are mostly
single-threaded and take most of a short row, so two rows at once keep both cores busy (quick
size on an idle 2-core machine: about 6 min with 2 workers, 12 on a slower one). Per-row wall times include
the contention; per-step times (steady state, from a batch-end callback) and first-step
(tracing) times are recorded per row.

Resumable: each (seed, row) is written to ``<out>/accuracy.json`` as it finishes; the float model
resumes per epoch (``BackupAndRestore``) and, at the full size, QIL rows per stage
(``progressive_fit``'s ``checkpoint_dir``). Outputs: ``accuracy.json``, ``accuracy.md`` and
``accuracy.png`` in ``<out>`` (quick runs: ``<out>/quick/``).
"""

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "accuracy"

SIZES = {
    # quick float: 10 epochs, so that 12 fine-tuning steps no longer mostly keep training an
    # undertrained model (at 3 epochs, 40 % top-1, progressive beat direct at 4/4 by 2.2 points,
    # the opposite of the full run; at 10 epochs direct won on 3 of 3 seeds, as at full size)
    "quick": dict(train_images=2000, test_images=500, batch=64, float_epochs=10, budget_steps=12,
                  seeds=[0], multi_seed_rows=[], shared_float=True, float_lr=3e-3, lr=1e-3,
                  calibration_images=256, stage_checkpoints=False),
    "full": dict(train_images=50000, test_images=10000, batch=128, float_epochs=6, budget_steps=240,
                 seeds=[0, 1], multi_seed_rows=["qil_prog_4", "qil_direct_4", "qil_prog_2",
                                                "qil_direct_2", "qil_direct_3", "qil_gamma_fixed_3",
                                                "qil_gamma_fixed_2"],
                 shared_float=True, float_lr=3e-3, lr=1e-3, calibration_images=256,
                 stage_checkpoints=True),
}

# name: (kind, bits label, method, options)
ROWS = {
    "float": ("float", "32/32", "float ResNet-20", {}),
    "ptq_int8": ("ptq", "8/8", "TFLite post-training int8 of the float model", {}),
    "qil_prog_4": ("qil", "4/4", "QIL progressive FP→5/5→4/4", dict(stages=[(5, 5), (4, 4)])),
    "qil_prog_3": ("qil", "3/3", "QIL progressive FP→5/5→4/4→3/3",
                   dict(stages=[(5, 5), (4, 4), (3, 3)])),
    "qil_prog_2": ("qil", "2/2", "QIL progressive FP→5/5→4/4→3/3→2/2",
                   dict(stages=[(5, 5), (4, 4), (3, 3), (2, 2)])),
    "qil_direct_4": ("qil", "4/4", "QIL direct FP→4/4", dict(stages=[(4, 4)])),
    "qil_direct_3": ("qil", "3/3", "QIL direct FP→3/3", dict(stages=[(3, 3)])),
    "qil_direct_2": ("qil", "2/2", "QIL direct FP→2/2", dict(stages=[(2, 2)])),
    "qil_qonly_4": ("qil", "4/4", "QIL quantizer-only (weights, BN frozen) FP→4/4",
                    dict(stages=[(4, 4)], quantizer_only=True)),
    "qil_qonly_2": ("qil", "2/2", "QIL quantizer-only (weights, BN frozen) FP→2/2",
                    dict(stages=[(2, 2)], quantizer_only=True)),
    "qil_gamma_fixed_3": ("qil", "3/3", "QIL direct FP→3/3, γ fixed at 1",
                          dict(stages=[(3, 3)], train_gamma=False)),
    "qil_gamma_fixed_2": ("qil", "2/2", "QIL direct FP→2/2, γ fixed at 1",
                          dict(stages=[(2, 2)], train_gamma=False)),
    "tfmot_nbit_4": ("tfmot", "4/4", "tfmot DefaultNBitQuantizeScheme(4, 4), first/last 8-bit",
                     dict(bits=4)),
    "tfmot_nbit_2": ("tfmot", "2/2", "tfmot DefaultNBitQuantizeScheme(2, 2), first/last 8-bit",
                     dict(bits=2)),
}
TARGETS = {"qil_4_vs_float_max_loss": 0.5, "qil_2_vs_float_max_loss": 3.0}
# export_tflite verifies (and reports snap figures) on at most this many test images; TFLite
# top-1 and agreement on a larger test set are then computed here on all of it.
EXPORT_VERIFY_MAX = 2000
# A QIL row whose TFLite file agrees with its Keras model on fewer test images than this keeps
# its snapped weights and file under <out>/accuracy_work/disagreements/ (export_tflite's own
# default would refuse such a file; the benchmark exports with min_agreement=0 to record it).
KEEP_BELOW_AGREEMENT = 0.995
DISAGREEMENTS = "disagreements"  # in the work folder; --fresh keeps it


def parse_args(argv=None):
    # the short-budget study, kept for the record apart from the results that feed the docs
    parser = common.base_parser(__doc__.split("\n")[0], NAME,
                                out=os.path.join("bench", "results", "short"))
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for the rows after the float model (1: all in this process)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated subset of rows to run (default: all)")
    parser.add_argument("--plan-only", action="store_true",
                        help="print the size's plan and time estimate, then exit")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# data


class Data:
    """Training streams, test set and calibration batches for one size."""

    def __init__(self, args, cfg):
        from qil_keras import datasets

        self.args, self.cfg = args, cfg
        self.archive = common.check_archive(args.data or common.default_archive())
        self.per_class = cfg["train_images"] // 10
        self.x_test, self.y_test, info = common.cifar_images(args, cfg["test_images"], "test", seed=0)
        self.class_names = info.class_names
        self.steps_per_epoch = (self.per_class * 10) // cfg["batch"]
        self._datasets = datasets
        self._calibration = {}

    def train(self, seed):
        """One augmented pass over the training images, shuffled with ``seed``, whole batches."""
        ds, _ = self._datasets.load_image_folder(
            self.archive, "train", training=True, style="cifar", batch_size=self.cfg["batch"],
            limit_per_class=self.per_class, seed=seed, drop_remainder=True,
            cache_dir=self.args.cache_dir, class_names=self.class_names)
        return ds

    def stage(self, seed, steps):
        """``steps`` batches; every iteration (one per fit epoch) draws a fresh shuffle."""
        return self.train(seed + 1000).repeat().take(steps)

    def calibration(self, seed):
        if seed not in self._calibration:
            self._calibration[seed] = common.cifar_images(
                self.args, self.cfg["calibration_images"], "train", seed=seed)[0]
        return self._calibration[seed]


# ---------------------------------------------------------------------------
# models and training


def loss_fn():
    from qil_keras import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def adam_cosine(lr, steps):
    from qil_keras import keras
    return keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, max(1, int(steps))))


def step_timer():
    """A callback recording, per ``fit``, the first-step latency and the steady step times.

    It also builds the optimizer for the model's trainable variables before the first step:
    tf-keras otherwise creates the optimizer's slots inside the first trace of the train
    function, which then traces twice. Same training, about 40 % less first-step time.
    """
    from qil_keras import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.fits = []

        def on_train_begin(self, logs=None):
            self.model.optimizer.build(self.model.trainable_variables)
            self.fits.append([time.perf_counter()])

        def on_train_batch_end(self, batch, logs=None):
            self.fits[-1].append(time.perf_counter())

        def summary(self):
            steady = [b - a for fit in self.fits for a, b in zip(fit[1:-1], fit[2:])]
            return {"step_s": float(np.median(steady)) if steady else None,
                    "first_step_s": [fit[1] - fit[0] for fit in self.fits if len(fit) > 1]}

    return StepTimer()


def top1(model, x, y):
    out = model.predict(x, verbose=0, batch_size=256)
    return float(np.mean(out.argmax(1) == y)), out


def work_dir(out, seed):
    return os.path.join(common.work_root(out, NAME), f"seed{seed}")


def get_float_model(cache, data, cfg, out, seed):
    """``(model, info)``: the trained float ResNet-20 for fine-tuning seed ``seed`` (with
    ``shared_float``, the first seed's for all), from its weight file or trained now (resumable
    per epoch)."""
    if cfg.get("shared_float"):
        seed = cfg["seeds"][0]
    if seed in cache:
        return cache[seed]
    import qil_keras
    from qil_keras import keras

    keras.utils.set_random_seed(seed)
    model = qil_keras.resnet20(num_classes=10, input_shape=(32, 32, 3))
    folder = work_dir(out, seed)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "float.weights.h5")
    info = {"weights": os.path.relpath(path, common.REPO_ROOT) if path.startswith(common.REPO_ROOT)
            else path, "train_steps": cfg["float_epochs"] * data.steps_per_epoch, "float_seed": seed}
    if os.path.exists(path):
        model.load_weights(path)
        info["loaded"] = True
    else:
        model.compile(adam_cosine(cfg["float_lr"], info["train_steps"]), loss_fn(),
                      metrics=["accuracy"], jit_compile=False)
        qil_keras.build_optimizer(model)
        timer = step_timer()
        t0 = time.perf_counter()
        hist = model.fit(data.train(seed), epochs=cfg["float_epochs"], verbose=0, callbacks=[
            keras.callbacks.BackupAndRestore(os.path.join(folder, "float_backup")), timer])
        info.update(train_wall_s=time.perf_counter() - t0, loaded=False, **timer.summary(),
                    history={k: [float(v) for v in vals] for k, vals in hist.history.items()})
        model.save_weights(path)
        shutil.rmtree(os.path.join(folder, "float_backup"), ignore_errors=True)
    cache[seed] = (model, info)
    return cache[seed]


def mean_pruning(model):
    """(parameter-weighted zero fraction of the inner (< 8-bit) weight layers, plain mean over all
    weight layers, per-layer fractions), from ``qil_keras.pruning_ratios``."""
    import qil_keras

    ratios = qil_keras.pruning_ratios(model).to_dict()
    weights = {n: r for n, r in ratios.items() if "weights" in r}
    sizes = {layer.name: int(np.prod(layer.kernel.shape)) for layer in model.layers
             if layer.name in weights}
    inner = {n: r for n, r in weights.items() if r["bits"] < 8}
    total = sum(sizes[n] for n in inner)
    weighted = sum(r["weights"] * sizes[n] for n, r in inner.items()) / total if total else None
    plain = float(np.mean([r["weights"] for r in weights.values()])) if weights else None
    return weighted, plain, {n: r["weights"] for n, r in weights.items()}


def run_qil(name, opts, float_model, data, cfg, out, seed):
    import qil_keras

    stages_bits = opts["stages"]
    steps = cfg["budget_steps"] // len(stages_bits)
    stages = [qil_keras.Stage(w, a, epochs=1) for w, a in stages_bits]
    ckpt = os.path.join(work_dir(out, seed), name) if cfg["stage_checkpoints"] else None
    lr = cfg["lr"]
    calib = data.calibration(seed)
    timer = step_timer()
    qil_keras.keras.utils.set_random_seed(seed)
    t0 = time.perf_counter()
    result = qil_keras.progressive_fit(
        float_model, data.stage(seed, steps), stages=stages,
        optimizer=lambda index, stage: adam_cosine(lr, steps), loss=loss_fn(),
        calibration_data=calib, quantizer_only=opts.get("quantizer_only", False),
        train_gamma=opts.get("train_gamma", True), first_last_bits=8, checkpoint_dir=ckpt,
        callbacks=[timer], verbose=0)
    row = {"stages": [s.name for s in stages], "steps_per_stage": steps,
           "train_steps": steps * len(stages), "train_wall_s": time.perf_counter() - t0,
           "final_loss": [h["loss"][-1] for h in result.histories], **timer.summary()}
    model = result.final_model
    row["keras_top1"], _ = top1(model, data.x_test, data.y_test)
    row["pruning_inner_weighted"], row["pruning_layer_mean"], row["pruning_per_layer"] = \
        mean_pruning(model)
    gammas = [float(np.mean(layer.kernel_quantizer_vars["gamma"].numpy())) for layer in model.layers
              if isinstance(getattr(layer, "kernel_quantizer_vars", None), dict)
              and "gamma" in layer.kernel_quantizer_vars and layer.w_bits < 8]
    row["gamma_mean_inner"] = float(np.mean(gammas)) if gammas else None
    t0 = time.perf_counter()
    n_verify = min(len(data.x_test), EXPORT_VERIFY_MAX)
    try:
        report = qil_keras.export_tflite(
            model, validation_data=(data.x_test[:n_verify], data.y_test[:n_verify]),
            weight_storage="int8", min_agreement=0.0, max_examples=n_verify)
        snap = report.snap or {}
        row.update(exported=True, export_verified_on=n_verify,
                   export_report_agreement=report.agreement,
                   export_report_tflite_top1=report.tflite_accuracy,
                   keras_top1_before_snap_export=snap.get("keras_accuracy_before_snap"),
                   agreement_before_snap=snap.get("agreement_before_snap"),
                   largest_bias_move_units=snap.get("largest_bias_move_in_units"),
                   tie_step_moves=snap.get("step_moves"), tie_near_ties=snap.get("near_ties"),
                   ties_left=snap.get("ties_left"), tie_bias_moves=snap.get("bias_tie_moves"),
                   max_abs_diff_steps=report.max_abs_diff_steps, tflite_bytes=report.size_bytes,
                   file_zero_fraction={w.layer: w.zero_fraction for w in report.weight_layers})
        if n_verify == len(data.x_test):
            row.update(tflite_top1=report.tflite_accuracy, agreement=report.agreement,
                       keras_top1_after_snap=report.keras_accuracy)
        else:  # the whole test set: the file, and the (snapped) Keras model it must match
            from qil_keras.integer.export import run_tflite
            got = run_tflite(report.model_bytes, data.x_test).argmax(1)
            row["keras_top1_after_snap"], expected = top1(report.keras_model, data.x_test,
                                                          data.y_test)
            row.update(tflite_top1=float(np.mean(got == data.y_test)),
                       agreement=float(np.mean(got == expected.argmax(1))))
        if row["agreement"] < KEEP_BELOW_AGREEMENT:
            # Training is not bit-reproducible across runs, so keep what disagreed for diagnosis.
            keep = os.path.join(common.work_root(out, NAME), DISAGREEMENTS, f"s{seed}_{name}")
            os.makedirs(keep, exist_ok=True)
            report.keras_model.save_weights(os.path.join(keep, "snapped.weights.h5"))
            with open(os.path.join(keep, "model.tflite"), "wb") as handle:
                handle.write(report.model_bytes)
            row["kept_for_diagnosis"] = os.path.relpath(keep, common.REPO_ROOT)
    except Exception as error:  # noqa: BLE001 - recorded in the row
        row.update(exported=False, export_error=f"{type(error).__name__}: {error_lines(error)[0]}")
    row["export_wall_s"] = time.perf_counter() - t0
    if ckpt:
        shutil.rmtree(ckpt, ignore_errors=True)
    return row


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++ output on fd 2 (a failing conversion prints pages of MLIR locations)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def error_lines(error, limit=6):
    """The distinct ``error: ...`` messages of a converter error (numbers in quant types cut),
    else the first non-empty line."""
    text = str(error)
    found = []
    for message in re.findall(r"error: ([^\n]*)", text):
        message = re.sub(r"(quant\.uniform<[^:>]+:f32)[^>]*>", r"\1, ...>", message.strip())
        message = re.sub(r"tensor<[?x0-9]+x", "tensor<...x", message)
        if message not in found:
            found.append(message[:300])
    if not found:
        found = [next((l.strip() for l in text.splitlines() if l.strip()), text)[:300]]
    return found[:limit]


def tfmot_model(float_model, bits, first_last_8=True):
    """tfmot n-bit QAT model with the QIL rows' first/last policy (see the module doc)."""
    import tensorflow_model_optimization as tfmot

    q = tfmot.quantization.keras
    scheme = q.experimental.default_n_bit.DefaultNBitQuantizeScheme(
        num_bits_weight=bits, num_bits_activation=bits)
    model = q.quantize_apply(q.quantize_annotate_model(float_model), scheme)
    changed = []
    if not first_last_8:
        return model, changed
    for layer in model.layers:
        if type(layer).__name__ == "QuantizeLayer":
            layer.quantizer.num_bits = 8
            changed.append(f"{layer.name}: input")
        inner = getattr(layer, "layer", None)
        if inner is None:
            continue
        config = layer.quantize_config
        if inner.name in ("conv1", "fc"):
            config.weight_quantizer.num_bits = 8
            config._num_bits_weight = 8
            for _, quantizer, _ in layer._weight_vars:
                quantizer.num_bits = 8
            changed.append(f"{layer.name}: weights")
        if inner.name in ("avgpool", "fc"):
            config.activation_quantizer.num_bits = 8
            config._num_bits_activation = 8
            for activation in layer._quantize_activations:
                activation.quantizer.num_bits = 8
            for quantizer in layer._output_quantizers:
                quantizer.num_bits = 8
            changed.append(f"{layer.name}: outputs")
    return model, changed


def try_convert(model):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        with quiet_stderr():
            return bytes(converter.convert()), None
    except Exception as error:  # noqa: BLE001
        return None, [f"{type(error).__name__}: {m}" for m in error_lines(error)]


def run_tfmot(bits, float_model, data, cfg, seed):
    import qil_keras
    from qil_keras import keras
    from qil_keras.integer.export import run_tflite

    keras.utils.set_random_seed(seed)
    model, changed = tfmot_model(float_model, bits)
    steps = cfg["budget_steps"]
    model.compile(adam_cosine(cfg["lr"], steps), loss_fn(), jit_compile=False)
    qil_keras.build_optimizer(model)  # as progressive_fit does for the QIL rows: one trace, not two
    timer = step_timer()
    t0 = time.perf_counter()
    hist = model.fit(data.stage(seed, steps), epochs=1, verbose=0, callbacks=[timer])
    row = {"train_steps": steps, "train_wall_s": time.perf_counter() - t0,
           "final_loss": [float(hist.history["loss"][-1])], "set_to_8_bits": changed,
           **timer.summary()}
    row["keras_top1"], _ = top1(model, data.x_test, data.y_test)
    t0 = time.perf_counter()
    tflite, errors = try_convert(model)
    row.update(converts=tflite is not None, convert_errors=errors)
    if tflite is not None:
        out = run_tflite(tflite, data.x_test)
        row["tflite_top1"] = float(np.mean(out.argmax(1) == data.y_test))
    row["convert_wall_s"] = time.perf_counter() - t0
    if tflite is None:  # is it our 8-bit first/last edit? Try tfmot's scheme as it comes, untrained.
        plain, _ = tfmot_model(float_model, bits, first_last_8=False)
        plain_bytes, plain_errors = try_convert(plain)
        row.update(plain_scheme_converts=plain_bytes is not None, plain_scheme_errors=plain_errors)
    return row


def run_ptq(float_model, data, seed):
    import qil_keras
    from qil_keras.integer.export import run_tflite

    calib = data.calibration(seed)
    t0 = time.perf_counter()
    tflite = qil_keras.convert_int8_ptq(float_model, calib)
    out = run_tflite(tflite, data.x_test)
    keras_acc, keras_out = top1(float_model, data.x_test, data.y_test)
    return {"tflite_top1": float(np.mean(out.argmax(1) == data.y_test)),
            "agreement": float(np.mean(out.argmax(1) == keras_out.argmax(1))),
            "float_keras_top1": keras_acc, "tflite_bytes": len(tflite),
            "convert_wall_s": time.perf_counter() - t0}


def compute_row(seed, name, data, cfg, out, floats):
    kind, bits, method, opts = ROWS[name]
    t0 = time.perf_counter()
    float_model, float_info = get_float_model(floats, data, cfg, out, seed)
    if kind == "float":
        row = dict(float_info)
        row["keras_top1"], _ = top1(float_model, data.x_test, data.y_test)
    elif kind == "ptq":
        row = run_ptq(float_model, data, seed)
    elif kind == "qil":
        row = run_qil(name, opts, float_model, data, cfg, out, seed)
    else:
        row = run_tfmot(opts["bits"], float_model, data, cfg, seed)
    row.setdefault("float_seed", float_info["float_seed"])
    row.update(row=name, seed=seed, kind=kind, bits=bits, method=method, batch=cfg["batch"],
               test_images=len(data.x_test), row_wall_s=time.perf_counter() - t0,
               loadavg_end=os.getloadavg()[0], pid=os.getpid())
    return row


# ---------------------------------------------------------------------------
# worker processes

_WORKER = {}


def _worker_init(args_dict, cfg, out, threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    args = argparse.Namespace(**args_dict)
    _WORKER.update(data=Data(args, cfg), cfg=cfg, out=out, floats={})


def _worker_row(seed, name):
    w = _WORKER
    try:
        return seed, name, compute_row(seed, name, w["data"], w["cfg"], w["out"], w["floats"]), None
    except Exception:  # noqa: BLE001 - reported by the parent
        return seed, name, None, traceback.format_exc()


# ---------------------------------------------------------------------------
# plan and estimates


def plan(cfg):
    """(seed, row) pairs in run order."""
    pairs = []
    for i, seed in enumerate(cfg["seeds"]):
        for name in ROWS:
            if i == 0 or name in cfg["multi_seed_rows"]:
                pairs.append((seed, name))
    return pairs


def measured_costs(rows):
    """Steady step times (s, at the run's batch) and fixed per-row overheads, medians over rows."""
    by = {"float": [], "qil": [], "tfmot": []}
    over = {"qil": [], "tfmot": [], "ptq": []}
    export = []
    batch = test = None
    for r in rows.values():
        kind = r.get("kind")
        batch, test = r.get("batch", batch), r.get("test_images", test)
        if kind in by and r.get("step_s"):
            by[kind].append(r["step_s"])
        if kind in ("qil", "tfmot") and r.get("step_s"):
            over[kind].append(r["row_wall_s"] - r["train_steps"] * r["step_s"]
                              - r.get("export_wall_s", 0))
        if kind == "qil" and r.get("export_wall_s") is not None:
            export.append(r["export_wall_s"])
        if kind == "ptq":
            over["ptq"].append(r["row_wall_s"])
    med = lambda v: float(np.median(v)) if v else None  # noqa: E731
    return {"batch": batch, "test_images": test,
            "step_s": {k: med(v) for k, v in by.items()},
            "overhead_s": {k: med(v) for k, v in over.items()}, "export_s": med(export)}


# Used when no run has been measured yet (2-core EPYC, lightly loaded, batch 64).
DEFAULT_COSTS = {"batch": 64, "test_images": 1000,
                 "step_s": {"float": 0.35, "qil": 0.7, "tfmot": 0.6},
                 "overhead_s": {"qil": 60.0, "tfmot": 40.0, "ptq": 15.0}, "export_s": 12.0}


def estimate(cfg, costs=None, workers=1):
    """Expected wall time (s) of a size's plan, scaling measured per-row costs by batch and test
    size: the float model, then the other rows' summed costs divided by ``workers`` (right when
    the costs were measured with the same number of workers, whose contention they include)."""
    c = json.loads(json.dumps(DEFAULT_COSTS))
    for key, value in (costs or {}).items():
        if isinstance(value, dict):
            c[key].update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
            c[key] = value
    scale = cfg["batch"] / c["batch"]
    test_scale = cfg["test_images"] / c["test_images"]
    pairs = plan(cfg)
    steps_per_epoch = cfg["train_images"] // cfg["batch"]
    n = {k: sum(1 for _, name in pairs if ROWS[name][0] == k) for k in ("float", "ptq", "qil", "tfmot")}
    float_s = n["float"] * (cfg["float_epochs"] * steps_per_epoch * c["step_s"]["float"] * scale + 20)
    export_scale = max(1.0, 0.4 + 0.6 * min(cfg["test_images"], EXPORT_VERIFY_MAX) / c["test_images"])
    qil_s = n["qil"] * (cfg["budget_steps"] * c["step_s"]["qil"] * scale + c["overhead_s"]["qil"]
                        + c["export_s"] * export_scale + 2.5 * max(0, test_scale - export_scale))
    tfmot_s = n["tfmot"] * (cfg["budget_steps"] * c["step_s"]["tfmot"] * scale + c["overhead_s"]["tfmot"])
    ptq_s = n["ptq"] * c["overhead_s"]["ptq"] * max(1.0, test_scale ** 0.5)
    total = float_s + (qil_s + tfmot_s + ptq_s) / max(1, workers) + 30
    return {"total_s": total, "workers": workers, "float_s": float_s, "qil_s": qil_s, "tfmot_s": tfmot_s, "ptq_s": ptq_s,
            "rows": len(pairs), "row_counts": n,
            "fine_tune_epochs_per_row": cfg["budget_steps"] * cfg["batch"] / cfg["train_images"],
            "costs_used": c}


# ---------------------------------------------------------------------------
# summary and outputs


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    a = np.asarray(values, float)
    return {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            "values": [float(v) for v in a]}


def summarize(store, workers):
    by_name = {}
    for row in store.rows.values():
        by_name.setdefault(row["row"], []).append(row)
    table = {}
    for name in ROWS:
        got = sorted(by_name.get(name, []), key=lambda r: r["seed"])
        if not got:
            continue
        kind, bits, method, _ = ROWS[name]
        table[name] = {
            "kind": kind, "bits": bits, "method": method, "seeds": [r["seed"] for r in got],
            "keras_top1": stats([r.get("keras_top1") for r in got]),
            "keras_top1_after_snap": stats([r.get("keras_top1_after_snap") for r in got]),
            "tflite_top1": stats([r.get("tflite_top1") for r in got]),
            "agreement": stats([r.get("agreement") for r in got]),
            "pruning_inner_weighted": stats([r.get("pruning_inner_weighted") for r in got]),
            "pruning_layer_mean": stats([r.get("pruning_layer_mean") for r in got]),
            "converts": [r.get("converts") for r in got] if kind == "tfmot" else None,
            "convert_errors": next((r.get("convert_errors") for r in got if r.get("convert_errors")),
                                   None),
            "plain_scheme_converts": [r.get("plain_scheme_converts") for r in got] if kind == "tfmot" else None,
            "plain_scheme_errors": next((r.get("plain_scheme_errors") for r in got
                                         if r.get("plain_scheme_errors")), None),
            "export_errors": [r.get("export_error") for r in got if r.get("export_error")],
        }

    def val(name):
        s = table.get(name, {}).get("keras_top1")
        return None if s is None else s["mean"]

    def gap(a, b):
        return None if val(a) is None or val(b) is None else 100 * (val(a) - val(b))

    t = {"qil_4_minus_float_points": gap("qil_prog_4", "float"),
         "qil_2_minus_float_points": gap("qil_prog_2", "float"),
         "qil_2_minus_tfmot_2_points": gap("qil_prog_2", "tfmot_nbit_2")}
    t["qil_4_within_0.5_of_float"] = (None if t["qil_4_minus_float_points"] is None else
                                      t["qil_4_minus_float_points"] >= -TARGETS["qil_4_vs_float_max_loss"])
    t["qil_2_within_3_of_float"] = (None if t["qil_2_minus_float_points"] is None else
                                    t["qil_2_minus_float_points"] >= -TARGETS["qil_2_vs_float_max_loss"])
    t["qil_2_ahead_of_tfmot_2"] = (None if t["qil_2_minus_tfmot_2_points"] is None else
                                   t["qil_2_minus_tfmot_2_points"] > 0)
    costs = measured_costs(store.rows)
    return {"rows": table, "targets": t, "measured_costs": costs,
            "full_estimate_from_this_run_s": estimate(SIZES["full"], costs, workers)}


def pct(s, digits=1):
    if s is None:
        return "n/a"
    if s["n"] == 1:
        return f"{100 * s['mean']:.{digits}f}"
    return f"{100 * s['mean']:.{digits}f} [{100 * s['min']:.{digits}f}–{100 * s['max']:.{digits}f}] (n={s['n']})"


def write_markdown(store, path):
    s = store.data["summary"]
    st = store.data["settings"]
    rows = []
    for name, r in s["rows"].items():
        note = ""
        if r["kind"] == "tfmot":
            note = ("converts" if all(r["converts"]) else
                    "does not convert: " + "; ".join(f"`{e}`" for e in (r["convert_errors"] or []))
                    + ("" if not r.get("plain_scheme_errors") else
                       "; nor does tfmot's scheme unmodified (untrained): "
                       + _ops_summary(r["plain_scheme_errors"])))
        elif r["kind"] == "ptq":
            note = "TFLite only; agreement with the float Keras model"
        elif r["export_errors"]:
            note = "export failed: " + r["export_errors"][0]
        rows.append({"row": name, "bits": r["bits"], "method": r["method"],
                     "keras": pct(r["keras_top1"]), "snap": pct(r["keras_top1_after_snap"]),
                     "tflite": pct(r["tflite_top1"]), "agree": pct(r["agreement"]),
                     "prune": pct(r["pruning_inner_weighted"]), "note": note})
    table = common.markdown_table(rows, [
        ("row", "row"), ("bits W/A", "bits"), ("method", "method"),
        ("Keras top-1 % (before export)", "keras"), ("Keras top-1 % after the export's snap", "snap"),
        ("TFLite top-1 %", "tflite"), ("TFLite/Keras agreement %", "agree"),
        ("weights pruned % (inner layers)", "prune"), ("note", "note")])
    t = s["targets"]

    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    def verdict(v):
        return "n/a" if v is None else ("**met**" if v else "**not met**")

    c = s["measured_costs"]
    fe = s["full_estimate_from_this_run_s"]
    full = SIZES["full"]
    step = {k: ("n/a" if v is None else f"{v:.2f} s") for k, v in c["step_s"].items()}
    text = f"""# Accuracy: ResNet-20 on CIFAR-10 (float, QIL, tfmot n-bit, PTQ int8)

{common.run_header_markdown(store.data['run'])}
- size `{st['size']}`: {st['train_images']} training images ({st['train_images'] // 10} per class),
  {st['test_images']} test images; seeds {st['seeds']} (more than one seed only for
  {', '.join(st['multi_seed_rows']) or 'none'}; {'one float model, trained with seed ' + str(st['seeds'][0]) + ', shared by all seeds' if st.get('shared_float') else 'one float model per seed'});
  batch {st['batch']}; float: {st['float_epochs']} epochs,
  Adam({st['float_lr']}) with cosine decay; every QIL and tfmot row: {st['budget_steps']} steps
  ({st['budget_steps'] * st['batch'] / st['train_images']:.2f} epochs) from the float model,
  Adam({st['lr']}) with cosine decay to 0 per stage, progressive rows split the steps evenly over
  their stages; same augmentation for all; `jit_compile=False`; QIL first/last layers 8-bit, the
  same for tfmot (set after `quantize_apply`).
- wall time: {store.data.get('wall_s_total', 'n/a')} s (all runs of this file), rows in
  {s.get('workers', 1)} worker process(es)

{table}

Top-1 values are the mean over seeds, with [min–max] and n when there is more than one seed.
"Before export" is the trained Keras model; `export_tflite` then moves the folded biases of a
copy to the int32 grid ("after snap": `report.keras_model`), and the TFLite file computes that
snapped model.
Pruning: fraction of weights at integer level 0 in the inner (< 8-bit) layers, parameter-weighted.

Targets (issue #6, stated for the full run; QIL = the progressive rows):

| target | ours (points) | verdict |
|---|---|---|
| QIL 4/4 within {TARGETS['qil_4_vs_float_max_loss']} points of float | {fmt(t['qil_4_minus_float_points'])} | {verdict(t['qil_4_within_0.5_of_float'])} |
| QIL 2/2 within {TARGETS['qil_2_vs_float_max_loss']} points of float | {fmt(t['qil_2_minus_float_points'])} | {verdict(t['qil_2_within_3_of_float'])} |
| QIL 2/2 ahead of tfmot n-bit 2/2 | {fmt(t['qil_2_minus_tfmot_2_points'])} | {verdict(t['qil_2_ahead_of_tfmot_2'])} |

A quick run trains for minutes on a few thousand images: it checks the pipeline, and its
accuracies are far from converged.

Measured in this run (steady training step at batch {c['batch']}): float {step['float']},
QIL {step['qil']}, tfmot {step['tfmot']}; fixed cost per row besides the steps and the export
(`quantize`, tracing, evaluation): QIL {_sec(c['overhead_s']['qil'])}, tfmot {_sec(c['overhead_s']['tfmot'])};
QIL export {_sec(c['export_s'])}.
Full-size plan: {full['train_images']} training / {full['test_images']} test images, batch {full['batch']},
float {full['float_epochs']} epochs, {full['budget_steps']} steps per row
({full['budget_steps'] * full['batch'] / full['train_images']:.2f} epochs), seeds {full['seeds']}
({fe['rows']} rows); at this run's costs about {fe['total_s'] / 3600:.1f} h on this machine with
{fe['workers']} worker(s) (float {fe['float_s'] / 60:.0f} min; rows summed: QIL {fe['qil_s'] / 60:.0f} min,
tfmot {fe['tfmot_s'] / 60:.0f} min).

![accuracy](accuracy.png)
"""
    common.write_text(path, text)


def _ops_summary(errors):
    """``'tfl.conv_2d', 'tfl.add' reject i4 operands`` from converter messages (JSON keeps them all)."""
    ops = list(dict.fromkeys(re.findall(r"'(tfl\.[a-z_0-9]+)'", " ".join(errors))))
    types = sorted(set(re.findall(r"quant\.uniform<(i[0-9]+)", " ".join(errors))))
    if not ops:
        return "; ".join(f"`{e}`" for e in errors)
    return ", ".join(f"`{o}`" for o in ops) + (f" reject {'/'.join(types)} operands" if types else " fail")


def _sec(v):
    return "n/a" if v is None else f"{v:.0f} s"


def plot(store, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = store.data["summary"]["rows"]
    names = list(table)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(names)), 4.4))
    for offset, key, label in ((-0.2, "keras_top1", "Keras (before export)"),
                               (0.2, "tflite_top1", "TFLite")):
        means, lo, hi = [], [], []
        for n in names:
            s = table[n][key]
            m = np.nan if s is None else 100 * s["mean"]
            means.append(m)
            lo.append(0 if s is None else m - 100 * s["min"])
            hi.append(0 if s is None else 100 * s["max"] - m)
        ax.bar(x + offset, means, 0.4, yerr=[lo, hi], label=label, capsize=2)
    if "float" in table and table["float"]["keras_top1"]:
        ax.axhline(100 * table["float"]["keras_top1"]["mean"], color="grey", lw=0.8, ls="--",
                   label="float")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    st = store.data["settings"]
    ax.set_title(f"ResNet-20, CIFAR-10 ({st['size']}: {st['train_images']} train / "
                 f"{st['test_images']} test images); whiskers: min–max over seeds", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    cfg = SIZES[args.size]
    out = common.out_dir(args)
    json_path = os.path.join(out, NAME + ".json")
    quick_json = os.path.join(args.out, "quick", NAME + ".json")
    prior = None
    for candidate in (json_path, quick_json):
        if os.path.exists(candidate):
            with open(candidate) as handle:
                prior = measured_costs(json.load(handle).get("rows", {}))
            break
    est = estimate(cfg, prior, args.workers)
    line = (f"plan --size {args.size}: {est['rows']} rows ({est['row_counts']}), float "
            f"{cfg['float_epochs']} epochs of {cfg['train_images']} images, {cfg['budget_steps']} "
            f"steps of {cfg['batch']} per row ({est['fine_tune_epochs_per_row']:.2f} epochs); expected "
            f"about {est['total_s'] / 60:.0f} min with {args.workers} worker(s) (float "
            f"{est['float_s'] / 60:.0f} min; summed rows: QIL {est['qil_s'] / 60:.0f}, tfmot "
            f"{est['tfmot_s'] / 60:.0f} min)"
            + (" from measured costs" if prior else " from default costs"))
    print(line, flush=True)
    if args.plan_only:
        return
    common.check_archive(args.data or common.default_archive())
    settings = dict(cfg, size=args.size, jit_compile=False, first_last_bits=8,
                    optimizer="Adam + CosineDecay to 0 per stage (fresh per stage), no weight decay",
                    interval_lr_multiplier=1.0, weight_intervals="reinitialize",
                    export="export_tflite(weight_storage='int8', min_agreement=0)",
                    tfmot_first_last="input, conv1 weights, avgpool output, fc weights and output at 8 bits",
                    model="resnet20")
    store = common.ResultStore(json_path, common.run_info(argv if argv is not None else sys.argv),
                               settings, fresh=args.fresh)
    if args.fresh:
        common.clear_work(common.work_root(out, NAME), keep=(DISAGREEMENTS,))
    print(f"accuracy --size {args.size}: writing {json_path}", flush=True)
    wanted = None if args.rows is None else set(args.rows.split(","))
    todo = [(s, n) for s, n in plan(cfg) if not store.has(f"s{s}/{n}")
            and (wanted is None or n in wanted)]
    failures = []

    def record(seed, name, row):
        store.add(f"s{seed}/{name}", row)
        shown = {k: row.get(k) for k in ("keras_top1", "tflite_top1", "agreement",
                                         "pruning_inner_weighted") if row.get(k) is not None}
        print(f"  s{seed}/{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
              + (f", converts {row['converts']}" if "converts" in row else "")
              + (f", export error {row['export_error']}" if row.get("export_error") else "")
              + f" ({row['row_wall_s']:.0f} s)", flush=True)

    data = Data(args, cfg)
    floats = {}
    # Float models first (each needs both cores), in this process.
    for seed in sorted({s for s, _ in todo}):
        if (seed, "float") in todo:  # trains the float model (or loads it) and evaluates it
            record(seed, "float", compute_row(seed, "float", data, cfg, out, floats))
        else:
            get_float_model(floats, data, cfg, out, seed)
    rest = [(s, n) for s, n in todo if n != "float"]
    # Longest rows first, so the last ones to finish are short.
    weight = {"qil": 10, "tfmot": 5, "ptq": 1}
    rest.sort(key=lambda p: -(weight[ROWS[p[1]][0]] + len(ROWS[p[1]][3].get("stages", []))))
    if args.workers <= 1 or len(rest) <= 1:
        for seed, name in rest:
            record(seed, name, compute_row(seed, name, data, cfg, out, floats))
    else:
        threads = max(1, (os.cpu_count() or 2) // args.workers)
        arg_dict = {"data": args.data, "cache_dir": args.cache_dir}
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=args.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(arg_dict, cfg, out, threads)) as pool:
            futures = [pool.submit(_worker_row, s, n) for s, n in rest]
            for future in concurrent.futures.as_completed(futures):
                seed, name, row, error = future.result()
                if error:
                    failures.append((seed, name, error))
                    print(f"  s{seed}/{name} FAILED:\n{error}", flush=True)
                else:
                    record(seed, name, row)
    store.set_summary(dict(summarize(store, args.workers), workers=args.workers))
    wall = store.finish()
    write_markdown(store, os.path.join(out, NAME + ".md"))
    plot(store, os.path.join(out, NAME + ".png"))
    t = store.data["summary"]["targets"]
    print(f"wall {wall:.0f} s; targets: {t}; wrote {json_path}, {NAME}.md, {NAME}.png", flush=True)
    if failures:
        raise SystemExit(f"{len(failures)} row(s) failed: {[f's{s}/{n}' for s, n, _ in failures]}"
                         " (rerun to retry them)")


if __name__ == "__main__":
    main()
