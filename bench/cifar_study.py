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

Outputs: ``<out>/cifar_study.json`` and ``.md`` (quick runs under ``<out>/quick/``).
"""

import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "cifar_study"

SIZES = {
    "quick": dict(train_per_class=200, val_per_class=50, test_images=500, batch=64, epochs=3,
                  lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, seed=0),
    "full": dict(train_per_class=4500, val_per_class=500, test_images=10000, batch=128, epochs=60,
                 lr=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, seed=0),
}
TRAIN_FILES_PER_CLASS = 5000  # CIFAR-10's training folder


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    parser.add_argument("--stage", choices=("float",), default="float",
                        help="which part of the study to run")
    parser.add_argument("--work", default=None,
                        help="checkpoint folder (default $QIL_CACHE_DIR/cifar_study[_quick], else "
                             "~/.cache/qil_keras/cifar_study[_quick])")
    return parser.parse_args(argv)


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
    log_path = os.path.join(work, "float_log.csv")
    t0 = time.perf_counter()
    model.fit(train, validation_data=val, epochs=cfg["epochs"], verbose=2, callbacks=[
        keras.callbacks.BackupAndRestore(os.path.join(work, "float_backup")),
        keras.callbacks.CSVLogger(log_path, append=True)])
    wall = time.perf_counter() - t0
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    model.save_weights(weights)
    test_top1 = float(np.mean(model.predict(x_test, batch_size=256, verbose=0).argmax(1) == y_test))
    with open(log_path) as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    store.add("float", {
        "test_top1": test_top1, "test_images": int(len(y_test)),
        "val_top1_final": history[-1]["val_accuracy"] if history else None,
        "train_top1_final": history[-1]["accuracy"] if history else None,
        "epochs_logged": len(history), "history": history,
        "wall_s_this_process": wall, "weights": os.path.relpath(weights, common.REPO_ROOT),
    })
    print(f"float: test top-1 {test_top1:.4f}")


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
                      [("epochs", None), ("train top-1 (last epoch, augmented)", ".4f"),
                       ("val top-1 (5k held out)", ".4f"), ("test top-1 (10k)", ".4f")]), ""]
    common.write_text(path, "\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    cfg = SIZES[args.size]
    out, store = common.open_store(args, NAME, cfg, argv)
    if args.stage == "float":
        train_float(args, cfg, store, out)
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
