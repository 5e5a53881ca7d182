"""Deployment cost: TFLite file size, export time and host latency (issue #6, item 4).

Networks: ResNet-20 (CIFAR-10, 32x32x3, 10 classes) and ResNet-18 (224x224x3,
1000 classes), both with **random init weights** (latency and size do not
depend on training); calibration on **real CIFAR-10 training images** (for
ResNet-18 upscaled to 224x224 with ImageNet normalization, ``style="imagenet"``).
Quick size: ResNet-20 only.

Files per network:

* ``float``: ``qil_keras.convert_float``;
* ``ptq_int8``: ``qil_keras.convert_int8_ptq`` (full-integer post-training int8,
  calibrated on the real images, float input/output);
* ``tfmot_int8``: ``tfmot.quantization.keras.quantize_model`` (8-bit QAT, not
  trained: its ranges are set by a few training-mode forward passes over the
  calibration images, which also move the BatchNorm statistics; no weight
  update), converted with ``TFLiteConverter.from_keras_model`` and
  ``optimizations=[DEFAULT]``;
* ``qil_{b}w{b}a_{storage}`` for b = 8, 4, 3, 2: ``qil_keras.quantize(float, b,
  b, calibration_data=x)`` (first and last layers 8-bit, the default) then
  ``qil_keras.export_tflite(q, representative_data=x, weight_storage=S,
  verify=False)`` with S = ``"int4"`` (INT4 storage for every <= 4-bit layer,
  INT8 for the 8-bit first/last layers), ``"auto"`` (an alias of ``"int4"`` since
  the export offsets the builtin kernels' second rounding through the bias; the
  runs before that stored INT8 a layer whose INT4 file could not round its output
  once under XNNPACK) and ``"int8"``. At 8/8 all three are the same file, so only ``int8`` is
  made.

Per file: raw bytes, gzip bytes (level 9), ratios to the float file's raw
bytes, weight tensor types read from the flatbuffer, and the export (or
conversion) wall time. Latency: batch 1, ``ai_edge_litert`` ``Interpreter`` at
1 and 2 threads with ``OpResolverType.AUTO`` (builtin kernels + the default
XNNPACK delegate) and ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` (builtin kernels
only). For one (network, threads, kernels) setting all interpreters are built
and warmed up, then each repeat runs ``invokes`` timed ``invoke()`` calls of
every model in turn (the order rotates every repeat), so background load is
shared. Reported: median and p90 over all timed invokes, and the ratios of
median latency to the float and the PTQ int8 models computed within each
repeat (median [min-max] over repeats).

Results: ``<out>/deploy_cost.json`` (one row per file and per latency setting,
written as each finishes; rerun to resume; the files are kept in
``<out>/tflite/``), ``<out>/deploy_cost.md`` and ``<out>/deploy_cost.png``;
quick runs write to ``<out>/quick/``.
"""

import gzip
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "deploy_cost"
QIL_BITS = (8, 4, 3, 2)
RESOLVERS = {"AUTO": "XNNPACK", "BUILTIN_WITHOUT_DEFAULT_DELEGATES": "builtin"}
THREADS = (1, 2)
NETWORKS = {
    "resnet20": dict(builder="resnet20", num_classes=10, input_shape=(32, 32, 3), style="cifar",
                     image_size=None, calib=256),
    "resnet18": dict(builder="resnet18", num_classes=1000, input_shape=(224, 224, 3),
                     style="imagenet", image_size=224, calib=32),
}
# Each timed block runs ``invokes`` invokes or stops once ``block_s`` seconds have passed
# (at least 3 invokes), which bounds the time spent on pathologically slow settings.
SIZES = {
    "quick": dict(networks=("resnet20",), warmup=10,
                  latency={"resnet20": dict(repeats=8, invokes=50, block_s=0.3)}),
    "full": dict(networks=("resnet20", "resnet18"), warmup=10,
                 latency={"resnet20": dict(repeats=20, invokes=100, block_s=1.0),
                          "resnet18": dict(repeats=8, invokes=10, block_s=4.0)}),
}
TARGETS = {"qil2_int4_bytes_over_float": 0.16, "qil2_int4_gzip_over_float_raw": 0.06,
           "qil2_int8_latency_over_ptq_xnnpack_1t": 1.05,
           "ptq_latency_over_float_resnet20_reported": 0.47}
TFMOT_RANGE_PASSES = 4


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    parser.add_argument("--networks", default=None,
                        help="comma-separated subset of resnet20,resnet18 (default: by --size)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def variants():
    """``(name, kind, bits, storage)`` in table order."""
    out = [("float", "float", None, "float32"), ("ptq_int8", "ptq", 8, "int8"),
           ("tfmot_int8", "tfmot", 8, "int8")]
    for b in QIL_BITS:
        for storage in (("int8",) if b > 4 else ("int4", "auto", "int8")):
            out.append((f"qil_{b}w{b}a_{storage}", "qil", b, storage))
    return out


def label(name):
    if name == "float":
        return "float32"
    if name == "ptq_int8":
        return "post-training int8"
    if name == "tfmot_int8":
        return "tfmot 8-bit QAT"
    _, bits, storage = name.split("_")
    b = bits.split("w")[0]
    return f"QIL {b}/{b}, " + {"int4": "INT4 weights", "auto": "INT4 weights (auto)",
                               "int8": "INT8 weights"}[storage]


# ---------------------------------------------------------------------------
# files


def float_model(net, seed):
    import qil_keras
    from qil_keras import keras

    cfg = NETWORKS[net]
    keras.utils.set_random_seed(seed)
    return getattr(qil_keras, cfg["builder"])(num_classes=cfg["num_classes"],
                                              input_shape=cfg["input_shape"])


def tfmot_bytes(model, x):
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    q = tfmot.quantization.keras.quantize_model(model)
    for i in range(TFMOT_RANGE_PASSES):  # set the moving-average ranges (no weight update)
        for start in range(0, len(x), 32):
            q(x[start:start + 32], training=True)
    converter = tf.lite.TFLiteConverter.from_keras_model(q)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return bytes(converter.convert())


def weight_types(data):
    from qil_keras import tflite_inspect

    counts = {}
    for t in tflite_inspect.weight_tensors(data):
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return counts


def op_counts(data):
    from qil_keras import tflite_inspect

    counts = {}
    for name in tflite_inspect.operator_names(data):
        counts[name] = counts.get(name, 0) + 1
    return counts


def make_files(args, store, cfg, net, files_dir):
    """Create (or reuse) every file of one network; one row per file."""
    todo = [v for v in variants() if not (store.has(f"file/{net}/{v[0]}")
                                          and os.path.exists(store.get(f"file/{net}/{v[0]}")["path"]))]
    if not todo:
        return
    import qil_keras

    spec = NETWORKS[net]
    t0 = time.perf_counter()
    x, _, _ = common.cifar_images(args, spec["calib"], split="train", seed=args.seed,
                                  style=spec["style"], image_size=spec["image_size"])
    print(f"  {net}: {len(x)} calibration images {x.shape[1:]} in {time.perf_counter() - t0:.1f} s",
          flush=True)
    base = float_model(net, args.seed)
    quantized = {}
    for name, kind, bits, storage in todo:
        row = {"kind": "file", "net": net, "variant": name, "label": label(name), "bits": bits,
               "storage": storage, "weights": "random init",
               "calibration": f"{len(x)} real CIFAR-10 training images"
                              + (" upscaled to 224x224" if spec["image_size"] else "")}
        t0 = time.perf_counter()
        if kind == "float":
            data = qil_keras.convert_float(base)
        elif kind == "ptq":
            data = qil_keras.convert_int8_ptq(base, x, num_calibration=len(x))
        elif kind == "tfmot":
            data = tfmot_bytes(base, x)
        else:
            if bits not in quantized:
                tq = time.perf_counter()
                quantized[bits] = qil_keras.quantize(base, bits, bits, calibration_data=x)
                row["quantize_s"] = time.perf_counter() - tq
            t0 = time.perf_counter()
            report = qil_keras.export_tflite(quantized[bits], representative_data=x,
                                             weight_storage=storage, verify=False)
            data = report.model_bytes
        row["export_s"] = time.perf_counter() - t0
        row["export_what"] = "export_tflite" if kind == "qil" else "conversion"
        path = os.path.join(files_dir, f"{net}_{name}.tflite")
        with open(path, "wb") as handle:
            handle.write(data)
        row.update(path=path, bytes=len(data), gzip_bytes=len(gzip.compress(data, 9)),
                   weight_tensor_types=weight_types(data), ops=op_counts(data))
        store.add(f"file/{net}/{name}", row)
        print(f"  {net} {name}: {row['bytes']:,} B (gzip {row['gzip_bytes']:,} B), "
              f"{row['export_what']} {row['export_s']:.1f} s, weights {row['weight_tensor_types']}",
              flush=True)


# ---------------------------------------------------------------------------
# latency


def latency_setting(args, store, cfg, net, threads, resolver, x1):
    key = f"latency/{net}/t{threads}/{resolver}"
    if store.has(key):
        return
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    lat = cfg["latency"][net]
    names = [v[0] for v in variants()]
    interps, errors = {}, {}
    t0 = time.perf_counter()
    for name in names:
        path = store.get(f"file/{net}/{name}")["path"]
        try:
            it = Interpreter(model_path=path, num_threads=threads,
                             experimental_op_resolver_type=getattr(OpResolverType, resolver))
            inp = it.get_input_details()[0]
            if list(inp["shape"]) != [1, *x1.shape[1:]]:
                it.resize_tensor_input(inp["index"], [1, *x1.shape[1:]])
            it.allocate_tensors()
            if inp["dtype"] != np.float32:
                raise TypeError(f"input dtype {inp['dtype']} (all files here take float input)")
            it.set_tensor(inp["index"], x1)
            for _ in range(cfg["warmup"]):
                it.invoke()
            interps[name] = it
        except Exception as error:  # noqa: BLE001
            errors[name] = f"{type(error).__name__}: {error}"
    setup_s = time.perf_counter() - t0
    samples = {n: [] for n in interps}
    per_repeat = []
    live = [n for n in names if n in interps]
    for r in range(lat["repeats"]):
        order = live[r % len(live):] + live[:r % len(live)]
        medians = {}
        for name in order:
            it = interps[name]
            times = []
            budget = time.perf_counter_ns() + int(lat["block_s"] * 1e9)
            for i in range(lat["invokes"]):
                start = time.perf_counter_ns()
                it.invoke()
                end = time.perf_counter_ns()
                times.append((end - start) / 1e6)
                if i >= 2 and end > budget:
                    break
            samples[name] += times
            medians[name] = float(np.median(times))
        per_repeat.append(medians)
    del interps
    models = {}
    for name in live:
        s = np.asarray(samples[name])
        m = {"median_ms": float(np.median(s)), "p90_ms": float(np.percentile(s, 90)),
             "mean_ms": float(s.mean()), "min_ms": float(s.min()), "n": int(s.size)}
        for ref in ("float", "ptq_int8"):
            if ref in live:
                m[f"over_{ref}"] = common.summary([rep[name] / rep[ref] for rep in per_repeat])
        models[name] = m
    row = {"kind": "latency", "net": net, "threads": threads, "resolver": resolver,
           "kernels": RESOLVERS[resolver], "repeats": lat["repeats"], "invokes": lat["invokes"],
           "warmup": cfg["warmup"], "models": models, "errors": errors, "per_repeat_median_ms":
           per_repeat, "setup_s": setup_s, "loadavg": os.getloadavg()[0]}
    store.add(key, row)
    print(f"  {net} {threads} thread(s) {RESOLVERS[resolver]}: "
          + ", ".join(f"{n} {m['median_ms']:.2f}" for n, m in models.items()) + " ms"
          + (f"; errors: {errors}" if errors else ""), flush=True)


def run_latency(args, store, cfg, net):
    spec = NETWORKS[net]
    x, _, _ = common.cifar_images(args, 10, split="test", seed=args.seed, style=spec["style"],
                                  image_size=spec["image_size"])
    x1 = np.ascontiguousarray(x[:1], dtype=np.float32)
    for threads in THREADS:
        for resolver in RESOLVERS:
            latency_setting(args, store, cfg, net, threads, resolver, x1)


# ---------------------------------------------------------------------------
# summary, tables, plot


def summarize(store, nets):
    out = {"targets": TARGETS, "nets": {}}
    for net in nets:
        fl = store.get(f"file/{net}/float")
        d = {"files": {}, "latency": {}}
        for name, *_ in variants():
            f = store.get(f"file/{net}/{name}")
            d["files"][name] = {"bytes": f["bytes"], "gzip_bytes": f["gzip_bytes"],
                                "bytes_over_float": f["bytes"] / fl["bytes"],
                                "gzip_over_float_raw": f["gzip_bytes"] / fl["bytes"],
                                "gzip_over_float_gzip": f["gzip_bytes"] / fl["gzip_bytes"],
                                "export_s": f["export_s"]}
        for t in THREADS:
            for res in RESOLVERS:
                row = store.get(f"latency/{net}/t{t}/{res}")
                if row:
                    d["latency"][f"t{t}/{RESOLVERS[res]}"] = {
                        n: {k: m[k] for k in ("median_ms", "p90_ms")}
                        | {k: m[k]["median"] for k in ("over_float", "over_ptq_int8") if k in m}
                        for n, m in row["models"].items()}
        x1 = store.get(f"latency/{net}/t1/AUTO")
        checks = {
            "qil2_int4_bytes_over_float": d["files"]["qil_2w2a_int4"]["bytes_over_float"],
            "qil2_int4_gzip_over_float_raw": d["files"]["qil_2w2a_int4"]["gzip_over_float_raw"],
            "qil2_auto_bytes_over_float": d["files"]["qil_2w2a_auto"]["bytes_over_float"],
            "qil2_auto_gzip_over_float_raw": d["files"]["qil_2w2a_auto"]["gzip_over_float_raw"],
        }
        if x1:
            checks["qil2_int8_latency_over_ptq_xnnpack_1t"] = x1["models"]["qil_2w2a_int8"]["over_ptq_int8"]["median"]
            checks["ptq_latency_over_float_xnnpack_1t"] = x1["models"]["ptq_int8"]["over_float"]["median"]
        d["checks"] = checks
        out["nets"][net] = d
    return out


def write_markdown(store, path, nets, png):
    st = store.data["settings"]
    s = store.data["summary"]
    parts = ["# Deployment cost: TFLite size, export time and host latency\n",
             common.run_header_markdown(store.data["run"]),
             f"- size `{st['size']}`; networks: {', '.join(nets)}; **random init weights**, "
             "calibration on real CIFAR-10 training images (ResNet-20: 256 at 32x32; ResNet-18: "
             "32 upscaled to 224x224). Latency at batch 1 on one real test image, "
             f"`ai_edge_litert` Interpreter, {st['warmup']} warm-up invokes, models interleaved "
             "(order rotated per repeat); XNNPACK = `OpResolverType.AUTO`, builtin = "
             "`BUILTIN_WITHOUT_DEFAULT_DELEGATES`.",
             f"- wall time: {store.data.get('wall_s_total', 'n/a')} s (all runs of this file)", ""]
    for net in nets:
        lat = st["latency"][net]
        d = s["nets"][net]
        parts.append(f"## {net}\n")
        parts.append(f"Latency: {lat['repeats']} repeats x {lat['invokes']} invokes per model and "
                     f"setting (a block stops early after {lat['block_s']} s, at least 3 invokes). "
                     "Ratios are medians over repeats of within-repeat ratios (each repeat: median "
                     "of its block); [min–max] over repeats.\n")
        rows = []
        for name, *_ in variants():
            f = store.get(f"file/{net}/{name}")
            row = {"model": label(name), "bytes": f["bytes"], "gzip": f["gzip_bytes"],
                   "rf": f["bytes"] / d["files"]["float"]["bytes"],
                   "gf": f["gzip_bytes"] / d["files"]["float"]["bytes"],
                   "export": f["export_s"],
                   "types": ", ".join(f"{k}x{v}" for k, v in sorted(f["weight_tensor_types"].items()))}
            rows.append(row)
        parts.append(common.markdown_table(rows, [
            ("model", "model"), ("bytes", "bytes", ","), ("gzip bytes", "gzip", ","),
            ("bytes / float", "rf", ".3f"), ("gzip / float raw", "gf", ".3f"),
            ("export / conversion s", "export", ".1f"), ("weight tensors", "types")]))
        parts.append("")
        rows = []
        for name, *_ in variants():
            row = {"model": label(name)}
            for t in THREADS:
                for res, kern in RESOLVERS.items():
                    lr = store.get(f"latency/{net}/t{t}/{res}")
                    m = lr["models"].get(name) if lr else None
                    row[f"{t}{kern}"] = (f"{m['median_ms']:.2f} / {m['p90_ms']:.2f}" if m
                                         else (lr or {}).get("errors", {}).get(name, "n/a")[:40])
            lr = store.get(f"latency/{net}/t1/AUTO")
            m = lr["models"].get(name) if lr else None
            row["vf"] = common.fmt_spread(m["over_float"]) if m and "over_float" in m else "n/a"
            row["vp"] = common.fmt_spread(m["over_ptq_int8"]) if m and "over_ptq_int8" in m else "n/a"
            lr = store.get(f"latency/{net}/t1/BUILTIN_WITHOUT_DEFAULT_DELEGATES")
            m = lr["models"].get(name) if lr else None
            row["bf"] = common.fmt_spread(m["over_float"]) if m and "over_float" in m else "n/a"
            rows.append(row)
        cols = [("model", "model")]
        for t in THREADS:
            for kern in RESOLVERS.values():
                cols.append((f"{kern} {t}T ms (median / p90)", f"{t}{kern}"))
        cols += [("XNNPACK 1T / float", "vf"), ("XNNPACK 1T / PTQ int8", "vp"),
                 ("builtin 1T / float", "bf")]
        parts.append(common.markdown_table(rows, cols))
        loads = []
        for t in THREADS:
            for res, kern in RESOLVERS.items():
                lr = store.get(f"latency/{net}/t{t}/{res}")
                if lr:
                    n = sorted(m["n"] for m in lr["models"].values())
                    loads.append(f"{kern} {t}T: load {lr['loadavg']:.1f}, {n[0]}–{n[-1]} invokes")
        parts.append("\nLoad average (1 min) when each setting started, and timed invokes per "
                     "model: " + "; ".join(loads) + ".")
        parts.append("2-thread figures are only as good as the machine was idle: on a 2-core "
                     "machine where another process holds a core, a 2-thread invoke waits for the "
                     "scheduler at each parallel op (seen while this script was written: the same int8 ResNet-20 file under "
                     "the builtin kernels took ~3 ms or ~80 ms per invoke within one minute, "
                     "depending on the background load). The 1-thread figures are the robust ones.")
        c = d["checks"]
        tg = TARGETS
        parts.append("\nTargets:\n")
        parts.append(f"- QIL 2/2 `weight_storage=\"int4\"` bytes / float bytes = {c['qil2_int4_bytes_over_float']:.3f} "
                     f"(target <= {tg['qil2_int4_bytes_over_float']}): "
                     f"**{'met' if c['qil2_int4_bytes_over_float'] <= tg['qil2_int4_bytes_over_float'] else 'not met'}**")
        parts.append(f"- its gzip / float raw bytes = {c['qil2_int4_gzip_over_float_raw']:.3f} (target <= "
                     f"{tg['qil2_int4_gzip_over_float_raw']}): "
                     f"**{'met' if c['qil2_int4_gzip_over_float_raw'] <= tg['qil2_int4_gzip_over_float_raw'] else 'not met'}**")
        if "qil2_int8_latency_over_ptq_xnnpack_1t" in c:
            r = store.get(f"latency/{net}/t1/AUTO")["models"]
            v = c["qil2_int8_latency_over_ptq_xnnpack_1t"]
            parts.append(f"- QIL 2/2 INT8 storage latency / PTQ int8 latency (XNNPACK, 1 thread) = "
                         f"{common.fmt_spread(r['qil_2w2a_int8']['over_ptq_int8'])} (target <= "
                         f"{tg['qil2_int8_latency_over_ptq_xnnpack_1t']}): **{'met' if v <= tg['qil2_int8_latency_over_ptq_xnnpack_1t'] else 'not met'}**")
            parts.append(f"- PTQ int8 / float latency (XNNPACK, 1 thread) = "
                         f"{common.fmt_spread(r['ptq_int8']['over_float'])} (issue #6 quoted about "
                         f"{tg['ptq_latency_over_float_resnet20_reported']} for ResNet-20)")
        parts.append(f"- with `weight_storage=\"auto\"` (an alias of `\"int4\"`"
                     f"): bytes / float = {c['qil2_auto_bytes_over_float']:.3f}, gzip / float "
                     f"raw = {c['qil2_auto_gzip_over_float_raw']:.3f}")
        parts.append("")
    parts.append(f"Plot: `{os.path.basename(png)}` (file size against XNNPACK 1-thread median latency).")
    common.write_text(path, "\n".join(parts) + "\n")


def plot(store, path, nets):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(nets), figsize=(6.5 * len(nets), 5), squeeze=False)
    markers = {"float": "s", "ptq": "D", "tfmot": "^", "qil": "o"}
    for ax, net in zip(axes[0], nets):
        for res in ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
            lr = store.get(f"latency/{net}/t1/{res}")
            if not lr:
                continue
            for i, (name, kind, bits, storage) in enumerate(variants()):
                f = store.get(f"file/{net}/{name}")
                m = lr["models"].get(name)
                if not m:
                    continue
                color = f"C{i}"
                if res == "AUTO":
                    ax.scatter(f["bytes"] / 1e6, m["median_ms"], marker=markers[kind], color=color,
                               s=50, label=label(name))
                else:
                    ax.scatter(f["bytes"] / 1e6, m["median_ms"], marker=markers[kind],
                               facecolors="none", edgecolors=color, s=50)
        ax.set_xscale("log")
        ax.set_xlabel("file size, MB (log)")
        ax.set_ylabel("batch-1 latency, ms (median, 1 thread)")
        ax.set_title(f"{net}: filled = XNNPACK, hollow = builtin kernels")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("TFLite size vs host latency (random init weights)")
    common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    common.check_archive(args.data or common.default_archive())
    cfg = SIZES[args.size]
    nets = tuple(args.networks.split(",")) if args.networks else cfg["networks"]
    for net in nets:
        if net not in NETWORKS:
            raise SystemExit(f"unknown network {net!r}: choose from {', '.join(NETWORKS)}")
    out = common.out_dir(args)
    files_dir = os.path.join(out, "tflite")
    os.makedirs(files_dir, exist_ok=True)
    settings = dict(size=args.size, networks=list(nets), seed=args.seed, warmup=cfg["warmup"],
                    latency={n: cfg["latency"].get(n, SIZES["full"]["latency"][n]) for n in nets},
                    threads=list(THREADS), resolvers=list(RESOLVERS), qil_bits=list(QIL_BITS),
                    weights="random init", tfmot_range_passes=TFMOT_RANGE_PASSES)
    cfg = dict(cfg, latency=settings["latency"])
    json_path = os.path.join(out, NAME + ".json")
    store = common.ResultStore(json_path, common.run_info(argv if argv is not None else sys.argv),
                               settings, fresh=args.fresh)
    print(f"deploy_cost --size {args.size}: writing {json_path}", flush=True)
    for net in nets:
        make_files(args, store, cfg, net, files_dir)
        run_latency(args, store, cfg, net)
    store.set_summary(summarize(store, nets))
    wall = store.finish()
    png = os.path.join(out, NAME + ".png")
    plot(store, png, nets)
    write_markdown(store, os.path.join(out, NAME + ".md"), nets, png)
    for net in nets:
        print(net, {k: round(v, 3) for k, v in store.data["summary"]["nets"][net]["checks"].items()})
    print(f"wall {wall:.0f} s; wrote {json_path}, {NAME}.md, {NAME}.png", flush=True)


if __name__ == "__main__":
    main()
