"""``qil-keras bench``: the harness (``qil_keras.harness``) from the command line.

``qil-keras bench MODEL.tflite [MODEL ...] --data DATA --device host|adb --out DIR``
evaluates each model on ``DATA`` (on this machine, or on an Android phone over
adb with ``--benchmark-binary``), prints the Markdown table and writes
``results.json``, ``results.csv``, ``results.md`` and
``accuracy_vs_latency.png`` to ``DIR``.

``--data`` is ``mnist`` (the 1,000 test digits of
``qil_keras.data.embedded_mnist``), an image folder or ``.tar.gz`` laid out
``split/class/*.jpg`` (read with ``qil_keras.datasets.load_image_folder``,
``--split``), or a ``.npz`` with ``x`` (images, NHWC) and ``y`` (labels).
Images enter as raw pixels (0-255) and each model gets its own input from its
metadata: ``x = pixel * scale + offset`` (``preprocessing`` in
``qil_keras.tflite_metadata``). A model without that metadata uses
``--scale``/``--offset`` when given, else ``[0, 1]`` pixels (scale 1/255,
offset 0: what ``mnist`` models and ``style="none"`` image folders expect); the
command says so. ``--no-preprocess`` feeds the data as stored.
"""

import argparse
import os
import sys

import numpy as np

__all__ = ["add_bench_parser", "run_bench"]

_UNIT = (1 / 255, 0.0)


def add_bench_parser(subcommands):
    """Register ``bench`` on an ``argparse`` sub-parsers object; returns the new parser."""
    from .harness import OP_RESOLVERS

    bench = subcommands.add_parser(
        "bench", help="accuracy, latency, size and memory of .tflite models (host or Android over adb)",
        description="Top-1/top-5 accuracy, agreement with a reference model, batch-1 latency, size and "
                    "memory of .tflite models, on this machine (LiteRT) or on an Android phone over adb. "
                    "Prints a Markdown table; writes results.json, results.csv, results.md and "
                    "accuracy_vs_latency.png to --out. Images enter as 0-255 pixels and get each model's "
                    "metadata preprocessing (x = pixel*scale + offset).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("models", nargs="+", metavar="MODEL.tflite", help=".tflite files to compare")
    bench.add_argument("--data", required=True,
                       help="'mnist', an image folder or .tar.gz (split/class/*.jpg), or a .npz with x, y")
    bench.add_argument("--split", default="test", help="split folder of an image folder")
    bench.add_argument("--limit", type=int, default=None,
                       help="evaluate a seeded random subset of this many examples")
    bench.add_argument("--limit-per-class", type=int, default=None,
                       help="read at most this many images per class (image folders)")
    bench.add_argument("--scale", default=None,
                       help="x = pixel*scale+offset for models without preprocessing metadata "
                            "(a number or R,G,B)")
    bench.add_argument("--offset", default=None, help="see --scale")
    bench.add_argument("--no-preprocess", action="store_true", help="feed the data as stored")
    bench.add_argument("--device", choices=("host", "adb"), default="host")
    bench.add_argument("--serial", default=None, help="adb device serial (when several are attached)")
    bench.add_argument("--benchmark-binary", default=None,
                       help="LiteRT benchmark_model built for the phone (see tflite/README.md)")
    bench.add_argument("--adb", default="adb", help="adb executable")
    bench.add_argument("--remote-dir", default="/data/local/tmp/qil_keras",
                       help="device folder for pushed files (deleted at the end)")
    bench.add_argument("--taskset", default=None, help="CPU mask for latency runs on the phone, e.g. f0")
    bench.add_argument("--no-xnnpack", action="store_true",
                       help="adb: --use_xnnpack=false (builtin kernels)")
    bench.add_argument("--repeats", type=int, default=5,
                       help="adb: separate benchmark_model latency runs (statistics are over them)")
    bench.add_argument("--threads", type=int, default=1, help="interpreter threads")
    bench.add_argument("--op-resolver", choices=OP_RESOLVERS, default=None,
                       help="kernels for every model (default: each model's metadata, else AUTO)")
    bench.add_argument("--num-runs", type=int, default=50, help="timed runs at batch 1")
    bench.add_argument("--warmup-runs", type=int, default=5, help="untimed runs before them")
    bench.add_argument("--batch-size", type=int, default=100, help="batch of the accuracy pass")
    bench.add_argument("--reference", default=None,
                       help="model the others are compared with (name or path; default: first float)")
    bench.add_argument("--seed", type=int, default=0, help="seed of --limit's subset")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.add_argument("--out", default="runs/bench", help="output folder")
    bench.set_defaults(run=run_bench)
    return bench


def _channels(text, name):
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise SystemExit(f"qil-keras bench: --{name} must be a number or R,G,B numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


def _first_info(path):
    from .harness import _model_info

    return _model_info(os.path.basename(path), path, None)


def _load_data(args, first):
    """Raw ``(x, y)``: pixels 0-255 (or the .npz as stored), labels."""
    if args.data == "mnist":
        from ..data import embedded_mnist

        _, (x, y) = embedded_mnist()
        return np.round(x * 255.0).astype(np.float32), y
    if args.data.endswith(".npz"):
        with np.load(args.data) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise SystemExit(f"qil-keras bench: {args.data} has no {sorted(missing)} array; it needs "
                                 "x (images, NHWC) and y (labels)")
            return archive["x"], archive["y"]
    from ..data import datasets

    height, width = first.input["shape_signature"][1:3]
    prep = first.metadata.get("preprocessing") or {}
    style = "imagenet" if prep.get("resize_shorter") else "none"
    raw = datasets.Preprocessing("raw", mean=0.0, std=1 / 255, image_size=(height, width),
                                 resize_shorter=prep.get("resize_shorter"))
    ds, info = datasets.load_image_folder(
        args.data, args.split, training=False, batch_size=256, style=style, normalization=raw,
        image_size=(height, width), limit_per_class=args.limit_per_class,
        class_names=first.metadata.get("class_names") or None)
    xs, ys = zip(*ds.as_numpy_iterator())
    x = np.concatenate(xs)
    if first.input["shape_signature"][-1] == 1:  # a grayscale model: the decoder gives RGB
        x = x.mean(axis=-1, keepdims=True)
    print(f"[qil-keras] {info.num_examples} images of {info.num_classes} classes from {info.name}")
    return x, np.concatenate(ys)


def _preprocessor(args):
    """``callable(info, x)``: the model's ``x * scale + offset`` on raw pixels."""
    told = set()
    fallback = (_channels(args.scale, "scale") if args.scale is not None else _UNIT[0],
                _channels(args.offset, "offset") if args.offset is not None else _UNIT[1])

    def preprocess(info, x):
        prep = info.metadata.get("preprocessing") or {}
        if "scale" in prep and "offset" in prep:
            scale, offset = prep["scale"], prep["offset"]
        else:
            scale, offset = fallback
            if info.name not in told:
                told.add(info.name)
                source = "--scale/--offset" if args.scale is not None or args.offset is not None else \
                    "[0, 1] pixels (pass --scale/--offset to change)"
                print(f"[qil-keras] {info.name} has no preprocessing metadata: x = pixel*{scale}+{offset}, "
                      f"from {source}")
        x = np.asarray(x, dtype=np.float32)
        return x * np.asarray(scale, np.float32) + np.asarray(offset, np.float32)

    return preprocess


def run_bench(args):
    """Run ``qil-keras bench`` from parsed ``args``; returns the exit code."""
    from .adb import AdbBackend, AdbError
    from .harness import benchmark_models

    try:
        first = _first_info(args.models[0])
        x, y = _load_data(args, first)
        if args.limit is not None and args.limit < len(x):
            keep = np.sort(np.random.default_rng(args.seed).permutation(len(x))[: args.limit])
            x, y = x[keep], y[keep]
        common = dict(reference=args.reference, op_resolver=args.op_resolver, batch_size=args.batch_size,
                      preprocess=None if args.no_preprocess else _preprocessor(args), out_dir=args.out,
                      progress=not args.no_progress)
        if args.device == "adb":
            backend = AdbBackend(serial=args.serial, benchmark_binary=args.benchmark_binary, adb=args.adb,
                                 remote_dir=args.remote_dir, taskset=args.taskset, num_threads=args.threads,
                                 use_xnnpack=not args.no_xnnpack, num_runs=args.num_runs,
                                 warmup_runs=args.warmup_runs, repeats=args.repeats)
            result = benchmark_models(args.models, (x, y), backend=backend, **common)
        else:
            result = benchmark_models(args.models, (x, y), num_threads=args.threads,
                                      num_runs=args.num_runs, warmup_runs=args.warmup_runs, **common)
    except (AdbError, FileNotFoundError, ValueError) as error:
        print(f"qil-keras bench: error: {error}", file=sys.stderr)
        return 1
    print(result.markdown())
    print(f"[qil-keras] results: {os.path.join(args.out, 'results.md')} (also .json, .csv, "
          "accuracy_vs_latency.png)")
    return 0
