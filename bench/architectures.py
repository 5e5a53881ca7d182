"""The exporter on the architectures Android apps are built on (issue #15).

For each Keras Applications architecture (and a hand-built Inception-style
net), at 32x32 on CIFAR-10:

1. a float model trained on a balanced CIFAR-10 subset (Adam, cosine decay,
   BatchNorm momentum 0.9 so that its moving statistics keep up with a short
   run; ``--float-epochs``), cached in the work folder;
2. quantized with :func:`qil_keras.quantize` at 8/8, 4/4 and 2/2 (first and
   last weight layers at 8 bits, the default) and fine-tuned
   (``--finetune-epochs``, Adam);
3. exported with the default settings (XNNPACK kernels, verification at
   99.5 % top-1 agreement) with INT8 and with INT4 weight storage.

Per row: Keras top-1 (the caller's model, ``evaluate`` in inference mode),
file top-1 under XNNPACK and under LiteRT's builtin kernels, top-1 agreement
with the Keras model under each, the largest output difference in output
steps, whether every intermediate tensor of the file equals
:class:`qil_keras.integer_reference.IntegerReference` under the builtin
kernels (the first op that differs otherwise), file bytes against the float
and post-training int8 files, host latency (1 thread, XNNPACK) against the
post-training int8 file measured in the same row, and export time; the file's top-1
under XNNPACK against the same file under the builtin kernels, with the baseline of the
post-training int8 file of the same float model (issue #15, "one file, every CPU path":
TFLite's own int8 files are kernel-dependent too), and how many layers the tie guard left
kernel-dependent (``report.snap["kernel_dependent"]``).

Inputs: models with built-in preprocessing (MobileNetV3's Rescaling,
EfficientNet's Rescaling + Normalization) get pixels in [0, 255]; the others
``x/127.5 - 1`` (MobileNet's preprocessing: every pixel an exact rounding tie
of the input quantizer, the case of issue #15 item 1).

Resumable: ``bench/results/architectures.json`` is rewritten after every row
and float models are kept in ``<out>/architectures_work/``. Run with
``nice``; ``--archs`` picks a subset.
"""

import collections
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import numpy as np  # noqa: E402

NAME = "architectures"
SIZES = {
    "quick": dict(archs=["mobilenetv2", "inception_small"], bits=[8, 4], train=2000, test=500,
                  float_epochs=2, finetune_epochs=1, storages=["int8"], latency_runs=10),
    "full": dict(archs=["mobilenetv2", "mobilenet", "mobilenetv3small_min", "mobilenetv3small",
                        "inception_small", "efficientnetb0", "mobilenetv3large_min",
                        "densenet121", "resnet50v2", "resnet50"],
                 bits=[8, 4, 2], train=10000, test=1000, float_epochs=8, finetune_epochs=2,
                 storages=["int8", "int4"], latency_runs=50),
}
BUILTIN = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
# Architectures whose Keras model carries its own preprocessing (inputs in [0, 255]).
RAW_PIXELS = ("mobilenetv3small", "mobilenetv3small_min", "mobilenetv3large_min",
              "efficientnetb0")


def build(name):
    """The float model (logits, 10 classes, 32x32x3) of an architecture; α as stated."""
    from qil_keras import keras

    apps, shape = keras.applications, (32, 32, 3)
    common_args = dict(input_shape=shape, weights=None, classes=10, classifier_activation=None)
    makers = {
        "mobilenet": lambda: apps.MobileNet(alpha=0.25, **common_args),
        "mobilenetv2": lambda: apps.MobileNetV2(alpha=0.35, **common_args),
        "mobilenetv3small": lambda: apps.MobileNetV3Small(**common_args),
        "mobilenetv3small_min": lambda: apps.MobileNetV3Small(minimalistic=True, **common_args),
        "mobilenetv3large_min": lambda: apps.MobileNetV3Large(minimalistic=True, **common_args),
        "efficientnetb0": lambda: apps.EfficientNetB0(**common_args),
        "resnet50": lambda: apps.ResNet50(**common_args),
        "resnet50v2": lambda: apps.ResNet50V2(**common_args),
        "densenet121": lambda: apps.DenseNet121(**common_args),
        "inception_small": inception_small,
    }
    model = makers[name]()
    for layer in model.layers:  # short runs: moving statistics that keep up
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def inception_small():
    """Two Inception blocks (1x1 | 1x1-3x3 | 1x1-3x3-3x3 | avgpool 3x3-1x1, Concatenate)."""
    from qil_keras import keras

    L = keras.layers

    def conv(x, filters, size, strides=1):
        x = L.Conv2D(filters, size, strides=strides, padding="same", use_bias=False)(x)
        return L.ReLU()(L.BatchNormalization()(x))

    def block(x, width):
        a = conv(x, width, 1)
        b = conv(conv(x, width, 1), width, 3)
        c = conv(conv(conv(x, width // 2, 1), width, 3), width, 3)
        d = conv(L.AveragePooling2D(3, strides=1, padding="same")(x), width, 1)
        return L.Concatenate()([a, b, c, d])

    inputs = keras.Input((32, 32, 3))
    x = conv(conv(inputs, 32, 3, strides=2), 48, 3)
    x = block(x, 24)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = block(x, 48)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(10)(x), name="inception_small")


def preprocess(name, x01):
    return (x01 * 255.0 if name in RAW_PIXELS else x01 * 2.0 - 1.0).astype(np.float32)


def fit(model, x, y, epochs, lr):
    from qil_keras import keras

    steps = epochs * int(np.ceil(len(x) / 64))
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=2)
    return model


def float_model(name, data, cfg, work):
    path = os.path.join(work, f"{name}.weights.h5")
    model = build(name)
    if os.path.exists(path):
        model.load_weights(path)
        return model
    (x, y), _ = data
    fit(model, x, y, cfg["float_epochs"], 3e-3)
    os.makedirs(work, exist_ok=True)
    model.save_weights(path)
    return model


def latency_ms(paths, x, runs, seconds=1.0, rounds=7):
    """Median host latency (1 thread, each file's default kernels) of each file and the median
    of the per-round ratio ``qil / ptq_int8``: ``rounds`` rounds of the package's harness, the
    files' order reversed every round, each file at least ``runs`` invokes and enough for about
    ``seconds`` per round (a 32x32 MobileNet takes 17 µs; 50 invokes are a millisecond, where a
    moment of contention from other work moved one row's median by 29 %; with one file timed
    after the other, such moments land on one of them, so rows are compared within a round)."""
    from qil_keras import harness

    def measure(order, count):
        result = harness.benchmark_models({name: paths[name] for name in order}, x[:1],
                                          num_threads=1, num_runs=count, progress=False)
        return {row.name: row.latency_median_ms for row in result.rows}

    names = list(paths)
    first = measure(names, runs)
    count = min(max(runs, int(seconds * 1e3 / max(min(first.values()), 1e-3))), 20000)
    per_round = [measure(names if r % 2 else names[::-1], count) for r in range(rounds)]
    medians = {name: float(np.median([m[name] for m in per_round])) for name in names}
    ratios = [m["qil"] / m["ptq_int8"] for m in per_round]
    return medians, float(np.median(ratios)), (float(min(ratios)), float(max(ratios)))


def export_row(q, float_bytes, ptq_file, data, storage, cfg, keep=None):
    """One row's export and measurements. ``keep``: a path prefix; a file the verification
    refuses is kept there (``.refused.tflite``, with the Keras weights) for diagnosis."""
    from qil_keras import export_tflite
    from qil_keras.integer.export import ExportError, ExportVerificationError, run_tflite
    from qil_keras.integer.integer_reference import UnsupportedOpError, compare_with_interpreter

    _, (xt, yt) = data
    row = dict(storage=storage)
    started = time.perf_counter()
    try:
        report = export_tflite(q, representative_data=xt[:256], validation_data=(xt, yt),
                               weight_storage=storage)
        row["default_export"] = "passed"
    except ExportVerificationError as error:
        report = error.report
        row["default_export"] = f"refused by the verification: {error}"
        if keep is not None:
            with open(f"{keep}.refused.tflite", "wb") as handle:
                handle.write(bytes(report.model_bytes))
            q.save_weights(f"{keep}.refused.weights.h5")
            row["refused_file_kept"] = os.path.basename(f"{keep}.refused.tflite")
    except ExportError as error:
        row["default_export"] = f"refused: {error}"
        row["export_s"] = time.perf_counter() - started
        return row
    row["export_s"] = time.perf_counter() - started
    keras_out = q.predict(xt, batch_size=256, verbose=0)
    file_bytes = report.model_bytes
    row["bytes"] = len(file_bytes)
    row["bytes_vs_float"] = len(file_bytes) / float_bytes
    row["bytes_vs_ptq_int8"] = len(file_bytes) / len(ptq_file)
    step = report.output_step
    top1 = {}
    for kernels, resolver in (("xnnpack", "AUTO"), ("builtin", BUILTIN)):
        out = run_tflite(file_bytes, xt, op_resolver=resolver)
        top1[kernels] = out.argmax(1)
        row[f"file_top1_{kernels}"] = float(np.mean(out.argmax(1) == yt))
        row[f"agreement_{kernels}"] = float(np.mean(out.argmax(1) == keras_out.argmax(1)))
        row[f"max_diff_steps_{kernels}"] = float(np.max(np.abs(out - keras_out)) / step)
    row["agreement_xnnpack_builtin"] = float(np.mean(top1["xnnpack"] == top1["builtin"]))
    kernel_dependent = (report.snap or {}).get("kernel_dependent") or {}
    row["kernel_dependent_layers"] = len(kernel_dependent)
    row["scale_moves"] = len((report.snap or {}).get("scale_moves") or {})
    # the γ moves that make dense channels kernel-independent are made by the snap at the end
    # of fit (the caller's model), so the export's own snap rarely has any left to make
    fit_snap = getattr(q, "fit_snap", None)
    if hasattr(fit_snap, "scale_moves"):
        row["fit_scale_moves"] = len(fit_snap.scale_moves)
        row["fit_scale_move_max"] = max(fit_snap.scale_moves.values(), default=0.0)
    # ops whose builtin and XNNPACK arithmetic differ on the verification's examples
    row["ops_differing"] = [dict(op_index=i, op=op, values=n, of=total, max_levels=levels)
                            for i, op, n, total, levels in report.kernel_differences or []]
    try:
        comparison = compare_with_interpreter(file_bytes, xt[:8])
        row["integer_reference"] = "exact" if comparison.exact else comparison.message()
    except UnsupportedOpError as error:
        row["integer_reference"] = f"not computed: {error}"
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for label, content in (("qil", file_bytes), ("ptq_int8", ptq_file)):
            paths[label] = os.path.join(folder, f"{label}.tflite")
            with open(paths[label], "wb") as handle:
                handle.write(content)
        lat, ratio, spread = latency_ms(paths, xt, cfg["latency_runs"])
    row["latency_ms"] = lat["qil"]
    row["latency_ptq_int8_ms"] = lat["ptq_int8"]
    row["latency_vs_ptq_int8"] = ratio   # median of per-round ratios (see latency_ms)
    row["latency_vs_ptq_int8_range"] = spread
    return row


def baselines(model, data):
    """The float file's size and the post-training int8 file of the float model."""
    from qil_keras.integer.export import convert_float, convert_int8_ptq

    (x, _), _ = data
    return len(convert_float(model)), convert_int8_ptq(model, x[:256])


def ptq_kernel_agreement(ptq_file, data):
    """The baseline for "one file, every CPU path": the post-training int8 file's top-1 under
    XNNPACK against the same file under the builtin kernels, on the test images."""
    from qil_keras.integer.export import run_tflite

    _, (xt, _) = data
    a = run_tflite(ptq_file, xt, op_resolver="AUTO").argmax(1)
    b = run_tflite(ptq_file, xt, op_resolver=BUILTIN).argmax(1)
    return float(np.mean(a == b))


def run_arch(name, store, data_raw, cfg, work):
    import qil_keras
    from qil_keras import keras
    from qil_keras._keras import tf

    (x, y), (xt, yt) = data_raw
    data = ((preprocess(name, x), y), (preprocess(name, xt), yt))
    keys = [f"{name}/{b}/{s}" for b in cfg["bits"] for s in cfg["storages"]]
    if all(store.has(k) for k in keys):
        return
    tf.keras.utils.set_random_seed(0)
    model = float_model(name, data, cfg, work)
    if not store.has(f"float/{name}"):
        model.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        store.add(f"float/{name}", dict(
            test_top1=common.top1(model, *data[1]), params=int(model.count_params()),
            float_epochs=cfg["float_epochs"], layers=len(model.layers)))
    float_bytes, ptq_file = baselines(model, data)
    if "ptq_agreement_xnnpack_builtin" not in store.get(f"float/{name}"):
        store.add(f"float/{name}", dict(store.get(f"float/{name}"),
                                        ptq_agreement_xnnpack_builtin=ptq_kernel_agreement(
                                            ptq_file, data)))
    for bits in cfg["bits"]:
        if all(store.has(f"{name}/{bits}/{s}") for s in cfg["storages"]):
            continue
        tf.keras.utils.set_random_seed(bits)
        started = time.perf_counter()
        try:
            q = qil_keras.quantize(model, bits, bits, calibration_data=data[0][0][:256])
        except Exception as error:  # noqa: BLE001 (recorded: which architectures do not quantize)
            for storage in cfg["storages"]:
                store.add(f"{name}/{bits}/{storage}", dict(
                    arch=name, bits=bits, storage=storage, quantize_error=str(error)))
            continue
        fit(q, *data[0], cfg["finetune_epochs"], 5e-4)
        train_s = time.perf_counter() - started
        for storage in cfg["storages"]:
            key = f"{name}/{bits}/{storage}"
            if store.has(key):
                continue
            # The caller's model as a user targeting this storage has it: fit ends with the
            # snap for INT8 storage; for INT4 files the user sets snap_storage = "int4", i.e.
            # the trained model snapped with the INT4 bias unit.
            caller = q
            if storage == "int4":
                from qil_keras.training.model import snap_after_fit
                from qil_keras.quantization.quantize import copy_model

                caller = copy_model(q)
                caller.snap_storage = "int4"
                snap_after_fit(caller, data[0][0])
            keras_top1 = common.top1(caller, *data[1])
            row = dict(arch=name, bits=bits, keras_top1=keras_top1, finetune_s=train_s,
                       float_top1=store.get(f"float/{name}")["test_top1"])
            row.update(export_row(caller, float_bytes, ptq_file, data, storage, cfg,
                                  keep=os.path.join(work, key.replace("/", "_"))))
            store.add(key, row)
            print(f"{key}: keras {keras_top1:.4f} file "
                  f"{row.get('file_top1_xnnpack', float('nan')):.4f} "
                  f"({row['default_export'][:60]})", flush=True)


def redo_arch(name, store, cfg, work, reason):
    """Supersede architecture ``name``'s rows (``ResultStore.redo``: a rerun in progress at
    this commit is resumed, not restarted); its float row too when the float model's weights
    are not in ``work``, since ``run_arch`` then trains it again."""
    keys = [f"{name}/{b}/{s}" for b in cfg["bits"] for s in cfg["storages"]]
    if not os.path.exists(os.path.join(work, f"{name}.weights.h5")):
        keys.insert(0, f"float/{name}")
    for key in keys:
        if store.redo(key, reason):
            print(f"{key}: superseded ({reason})", flush=True)


def _superseded_lines(store):
    """One line per reason: which rows run again, and the commits that had produced them."""
    by_reason = collections.defaultdict(list)
    for key, entries in store.data.get("superseded", {}).items():
        for entry in entries:
            by_reason[entry["reason"]].append(f"{key} (`{(entry['commit'] or '?')[:10]}`)")
    if not by_reason:
        return []
    return ["Superseded rows (kept in the JSON under `superseded`, rerun since or being rerun):",
            "", *[f"- {reason}: {', '.join(keys)}" for reason, keys in by_reason.items()], ""]


def _ops_differing(row):
    """``CONV_2D ×3, MUL ×1``: the op types whose two kernel sets' arithmetic differ."""
    if "ops_differing" not in row:
        return None
    counts = collections.Counter(d["op"] for d in row["ops_differing"])
    return ", ".join(f"{op} ×{n}" for op, n in counts.most_common()) or "none"


def write_markdown(store, path):
    settings = store.data["settings"]
    rows = sorted((dict(r, key=k) for k, r in store.rows.items() if not k.startswith("float/")),
                  key=lambda r: (settings["archs"].index(r["arch"])
                                 if r["arch"] in settings["archs"] else len(settings["archs"]),
                                 -r["bits"], r["storage"] != "int8"))
    floats = {k.split("/", 1)[1]: r for k, r in store.rows.items() if k.startswith("float/")}

    def pct(key):
        return lambda r: None if r.get(key) is None else f"{100 * r[key]:.2f}"

    lines = [f"# {NAME}: the integer export on Keras Applications architectures (issue #15)", "",
             common.run_header_markdown(store.data["run"]), "",
             f"Settings: {settings}. 32x32 CIFAR-10 inputs; top-1 and agreement in %, on "
             f"{settings['test']} test images. Agreement is with the caller's fine-tuned Keras "
             "model (not the export's snapped copy).", "",
             "Rows by run (the header above is the latest run):", "",
             *[f"- {run['started_utc']}, commit `{run['git_commit'][:10]}`: "
               + (", ".join(run["rows_added"]) or "no rows yet")
               for run in store.data.get("runs", [])], "",
             *_superseded_lines(store),
             "## Float models", "",
             common.markdown_table([dict(r, arch=k) for k, r in floats.items()],
                                   [("arch", "arch"), ("params", "params"),
                                    ("float epochs", "float_epochs"),
                                    ("test top-1", pct("test_top1")),
                                    ("PTQ int8 file: top-1 agreement XNNPACK vs builtin",
                                     pct("ptq_agreement_xnnpack_builtin"))]), "",
             "## Quantized, fine-tuned, exported with default settings", "",
             common.markdown_table(rows, [
                 ("row", "key"), ("Keras", pct("keras_top1")),
                 ("file XNNPACK", pct("file_top1_xnnpack")),
                 ("file builtin", pct("file_top1_builtin")),
                 ("agree XNNPACK", pct("agreement_xnnpack")),
                 ("agree builtin", pct("agreement_builtin")),
                 ("XNNPACK vs builtin", pct("agreement_xnnpack_builtin")),
                 ("ops whose kernel sets differ", _ops_differing),
                 ("max diff (steps) XNNPACK/builtin", lambda r: None if "max_diff_steps_xnnpack"
                  not in r else f"{r['max_diff_steps_xnnpack']:.1f}/{r['max_diff_steps_builtin']:.1f}"),
                 ("bytes / float", "bytes_vs_float", ".3f"),
                 ("bytes / PTQ int8", "bytes_vs_ptq_int8", ".3f"),
                 ("latency / PTQ int8", "latency_vs_ptq_int8", ".3f"),
                 ("export s", "export_s", ".0f"),
                 ("default export", lambda r: r.get("default_export", r.get("quantize_error", ""))[:90]),
                 ("integer reference (builtin)", lambda r: (r.get("integer_reference") or "")[:90]),
             ]), ""]
    common.write_text(path, "\n".join(lines))


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], NAME)
    parser.add_argument("--archs", default=None, help="comma-separated subset of the size's list")
    parser.add_argument("--redo", default=None, metavar="ARCHS",
                        help="comma-separated architectures whose rows run again at this commit: "
                             "their rows move to 'superseded' in the JSON with --redo-reason "
                             "(the float row too when its weights are not in the work folder, "
                             "so that the float model is trained again); the same command "
                             "resumes an interrupted rerun")
    parser.add_argument("--redo-reason", default=None,
                        help="why the --redo rows run again (required with --redo)")
    args = parser.parse_args(argv)
    from qil_keras import keras

    cfg = dict(SIZES[args.size])
    for option in ("archs", "redo"):
        unknown = sorted(set((getattr(args, option) or "").split(",")) - {""}
                         - set(SIZES["full"]["archs"]))
        if unknown:
            raise SystemExit(f"unknown --{option} {unknown}; choose from {SIZES['full']['archs']}")
    if args.redo and not args.redo_reason:
        raise SystemExit("--redo needs --redo-reason: say why the rows run again")
    out, store = common.open_store(args, NAME, cfg, argv)
    work = common.work_root(out, NAME)
    if args.fresh:
        common.clear_work(work)
    for name in (args.redo.split(",") if args.redo else ()):
        redo_arch(name, store, cfg, work, args.redo_reason)
    x, y, _ = common.cifar_images(args, cfg["train"], "train", style="none")
    xt, yt, _ = common.cifar_images(args, cfg["test"], "test", style="none")
    for name in (args.archs.split(",") if args.archs else cfg["archs"]):
        run_arch(name, store, ((x, y), (xt, yt)), cfg, work)
        write_markdown(store, os.path.join(out, f"{NAME}.md"))
        # one architecture's models and graphs are not needed by the next (a run that had been
        # through eight held 15 GB at ResNet50V2's export when the OOM killer stopped it)
        keras.backend.clear_session()
        gc.collect()
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
