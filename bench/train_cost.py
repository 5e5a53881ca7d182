"""Training cost of QIL against the float model and tfmot's 8-bit QAT (issue #6, item 3).

ResNet-20 (CIFAR-10, 10 classes, 32x32x3, random init), batch 128 of real
CIFAR-10 training images, three variants:

* ``float``: ``qil_keras.resnet20()``;
* ``qil``: ``qil_keras.quantize(float, 4, 4, calibration_data=<256 real images>)``
  (inner layers 4/4, first and last layers 8-bit, the package default);
  (Keras' BatchNormalization with batch statistics; ``fit`` re-estimates the moving statistics
  once at its end, timed separately: ``reestimate_batchnorm`` on 2,048 images);
* ``qil_frozen_bn``: the same with ``bn_freeze_after=200`` (``QILBatchNormalization``), timed in
  its steady state, every layer already frozen (its step count set to ``freeze_after`` before
  the warm-up: a run spends all but its first 200 steps there);
* ``tfmot``: ``tfmot.quantization.keras.quantize_model(float)`` (8-bit QAT);
* ``qil_no_wq`` and ``qil_no_aq`` (ablations, timed only): ``qil`` with every QIL
  weight quantizer, respectively every QIL activation quantizer, bypassed (the
  layer uses its float kernel / passes its input through; the ReLUs in front of the
  activation quantizers then run again, as in the float model). They split the QIL step into
  its parts: weight quantizers ``qil − qil_no_wq``, activation quantizers
  ``qil − qil_no_aq``, and the rest (8-bit fake quantizers, layer overhead) ``qil − float``
  minus those; the frozen BatchNorm option costs ``qil_frozen_bn − qil`` on top.

All are compiled identically: SGD(0.1, momentum 0.9), sparse categorical
cross-entropy on logits, no metrics, ``jit_compile=False`` (``--jit`` turns it on
for all). Steps are ``model.train_on_batch`` on the same batch.

Step time, interleaved: after ``warmup`` untimed steps per variant, each repeat
runs, for every variant in turn (the order rotates from repeat to repeat),
``warmup_per_block`` untimed steps then ``steps`` timed steps; the block's
time / ``steps`` is that variant's step time in that repeat. Background load
thus hits every variant alike. Reported: the median step time per variant
over repeats, and the ratios QIL/float and tfmot/float computed *within each
repeat* (median, min, max, IQR over repeats).

Peak memory: one fresh process per variant (``--memory-only VARIANT``) that
loads the data, builds the model(s) it needs, then runs ``memory_steps``
training steps and reports the peak resident set (``VmHWM``, and
``ru_maxrss``) before and after training. These processes run first, before
this process imports TensorFlow, since Linux carries ``ru_maxrss`` over
fork + exec.

Results: ``<out>/train_cost.json`` (one row per repeat and per memory process,
written as each finishes; rerun the same command to resume) and
``<out>/train_cost.md``; quick runs write to ``<out>/quick/``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "train_cost"
EPOCH_STEPS = 391  # CIFAR-10: 50,000 training images in batches of 128
VARIANTS = ("float", "qil", "qil_frozen_bn", "tfmot", "qil_no_wq", "qil_no_aq")
MEMORY_VARIANTS = VARIANTS[:4]
LABELS = {"float": "float ResNet-20", "qil": "QIL 4/4 (first/last 8-bit)",
          "qil_frozen_bn": "QIL 4/4, frozen BatchNorm (bn_freeze_after=200, steady state)",
          "tfmot": "tfmot 8-bit QAT (quantize_model)",
          "qil_no_wq": "ablation: QIL 4/4 without its weight quantizers",
          "qil_no_aq": "ablation: QIL 4/4 without its activation quantizers"}
PARTS = (("weight quantizers (QIL layers)", "qil_no_wq"),
         ("activation quantizers (QILActivation)", "qil_no_aq"))
SIZES = {
    "quick": dict(repeats=12, steps=5, warmup=3, warmup_per_block=0, memory_runs=1, memory_steps=5,
                  kernel_repeats=3, kernel_calls=5),
    "full": dict(repeats=40, steps=10, warmup=5, warmup_per_block=1, memory_runs=3, memory_steps=20,
                 kernel_repeats=20, kernel_calls=20),
}
BATCH = 128
NUM_CALIB = 256
# Repeats that also time re-estimation with one pass per depth (about a minute each).
BY_DEPTH_REPEATS = 3
TARGETS = {"qil_over_float": 1.10, "tfmot_over_float_reported": 1.18}


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for every variant")
    parser.add_argument("--memory-only", choices=MEMORY_VARIANTS, default=None,
                        help="(internal) measure the peak memory of one variant and print JSON")
    parser.add_argument("--memory-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_batch(args):
    x, y, _ = common.cifar_images(args, NUM_CALIB, split="train", seed=args.seed)
    return x, y


def build(variant, x, seed, jit):
    """The compiled model of one variant (the float model is built from ``seed`` each time)."""
    import qil_keras
    from qil_keras import keras

    keras.utils.set_random_seed(seed)
    model = qil_keras.resnet20(num_classes=10, input_shape=(32, 32, 3))
    if variant.startswith("qil"):
        options = {"bn_freeze_after": 200} if variant == "qil_frozen_bn" else {}
        model = qil_keras.quantize(model, 4, 4, calibration_data=x[:NUM_CALIB], **options)
        if variant in ("qil_no_wq", "qil_no_aq"):
            bypass_quantizers(model, weights=variant == "qil_no_wq")
        for layer in model.layers:   # steady state: BatchNorm frozen (see the module doc)
            if isinstance(layer, qil_keras.QILBatchNormalization):
                layer.batch_steps.assign(layer.freeze_after)
    elif variant == "tfmot":
        import tensorflow_model_optimization as tfmot
        model = tfmot.quantization.keras.quantize_model(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=bool(jit))
    return model


def bypass_quantizers(model, weights):
    """Ablation: bypass every QIL weight (or activation) quantizer of ``model`` in place.

    Instance attributes shadow the methods the layers' ``call`` uses, so the
    traced step contains no quantizer ops of that kind (asserted by the caller
    through the changed output).
    """
    import qil_keras
    from qil_keras._keras import tf

    count = 0
    for layer in model.layers:
        if weights and hasattr(layer, "kernel_quantizer"):
            layer.quantized_kernel = (lambda l: (lambda: l.float_kernel))(layer)
            count += 1
        elif not weights and isinstance(layer, qil_keras.QILActivation):
            layer.call = lambda inputs, *args, **kwargs: tf.identity(inputs)
            count += 1
        elif not weights and isinstance(layer, qil_keras.QILReLU):
            layer.pass_through_in_training = False  # its quantizer no longer applies the ReLU
    if not count:
        raise RuntimeError("no quantizer of the requested kind was found to bypass")


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def vm_hwm_mb():
    """Peak RSS of this process's own address space (``VmHWM``), ``None`` where unavailable.

    Linux carries ``ru_maxrss`` over ``fork`` + ``execve``, so a child started
    from a large parent reports the parent's peak; ``VmHWM`` starts afresh at
    ``execve``. The memory processes are started before the parent imports
    TensorFlow, so both should agree; both are recorded.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def memory_only(args):
    """Child process: peak RSS of one variant; prints one JSON line."""
    t0 = time.perf_counter()
    start = {"maxrss_mb": maxrss_mb(), "vm_hwm_mb": vm_hwm_mb()}
    x, y = load_batch(args)
    marks = {"after_data": (maxrss_mb(), vm_hwm_mb())}
    model = build(args.memory_only, x, args.seed, args.jit)
    marks["after_build"] = (maxrss_mb(), vm_hwm_mb())
    xb, yb = x[:BATCH], y[:BATCH]
    model.train_on_batch(xb, yb)
    marks["after_first_step"] = (maxrss_mb(), vm_hwm_mb())
    for _ in range(args.memory_steps - 1):
        model.train_on_batch(xb, yb)
    marks["after_training"] = (maxrss_mb(), vm_hwm_mb())
    row = {"variant": args.memory_only, "steps": args.memory_steps, "at_start": start,
           "process_s": time.perf_counter() - t0}
    for mark, (rss, hwm) in marks.items():
        row[f"maxrss_mb_{mark}"] = rss
        row[f"vm_hwm_mb_{mark}"] = hwm
    row["maxrss_mb"] = row["maxrss_mb_after_training"]
    row["peak_mb"] = row["vm_hwm_mb_after_training"] or row["maxrss_mb"]
    row["train_increase_mb"] = row["peak_mb"] - (row["vm_hwm_mb_after_build"] or
                                                 row["maxrss_mb_after_build"])
    print("MEMORY_JSON " + json.dumps(row))


def run_memory(args, store, cfg, out):
    for run in range(cfg["memory_runs"]):
        for variant in MEMORY_VARIANTS:
            key = f"memory/{variant}/{run}"
            if store.has(key):
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-only", variant,
                   "--memory-steps", str(cfg["memory_steps"]), "--seed", str(args.seed)]
            if args.data:
                cmd += ["--data", args.data]
            if args.cache_dir:
                cmd += ["--cache-dir", args.cache_dir]
            if args.jit:
                cmd.append("--jit")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"memory process for {variant} failed (exit {proc.returncode})")
            row = json.loads(lines[-1].split(" ", 1)[1])
            row.update(kind="memory", run=run, wall_s=time.perf_counter() - t0)
            store.add(key, row)
            print(f"  memory {variant} run {run}: peak RSS {row['peak_mb']:.0f} MB "
                  f"(+{row['train_increase_mb']:.0f} MB during training)", flush=True)


def run_timing(args, store, cfg, x, y):
    todo = [r for r in range(cfg["repeats"]) if not store.has(f"timing/{r:03d}")]
    if not todo:
        return
    import tensorflow as tf

    import qil_keras

    xb, yb = x[:BATCH], y[:BATCH]
    models = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        models[variant] = build(variant, x, args.seed, args.jit)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(cfg["warmup"]):
            models[variant].train_on_batch(xb, yb)
        print(f"  built {variant} in {build_s:.1f} s, {cfg['warmup']} warm-up steps in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    threads = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    for r in todo:
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        row = {"kind": "timing", "repeat": r, "order": list(order), "step_s": {},
               "loadavg": os.getloadavg()[0], "tf_threads": threads}
        for variant in order:
            model = models[variant]
            for _ in range(cfg["warmup_per_block"]):
                model.train_on_batch(xb, yb)
            t0 = time.perf_counter()
            for _ in range(cfg["steps"]):
                loss = model.train_on_batch(xb, yb)
            row["step_s"][variant] = (time.perf_counter() - t0) / cfg["steps"]
            row.setdefault("loss", {})[variant] = float(loss)
        for v in VARIANTS[1:]:
            row[f"{v}_over_float"] = row["step_s"][v] / row["step_s"]["float"]
        store.add(f"timing/{r:03d}", row)
        if not store.has(f"reestimate/{r:03d}"):
            images = np.concatenate([x] * int(np.ceil(2048 / len(x))))[:2048]
            t0 = time.perf_counter()
            qil_keras.reestimate_batchnorm(models["qil"], images)
            store.add(f"reestimate/{r:03d}", {"kind": "reestimate", "repeat": r,
                                              "seconds": time.perf_counter() - t0})
        if r < BY_DEPTH_REPEATS and not store.has(f"reestimate_by_depth/{r:03d}"):
            # the same estimate with one pass per depth (inputs too large for one batch)
            from qil_keras.training import batchnorm

            images = np.concatenate([x] * int(np.ceil(2048 / len(x))))[:2048]
            limit, batchnorm.ONE_PASS_MAX_BYTES = batchnorm.ONE_PASS_MAX_BYTES, 0
            try:
                t0 = time.perf_counter()
                qil_keras.reestimate_batchnorm(models["qil"], images)
                seconds = time.perf_counter() - t0
            finally:
                batchnorm.ONE_PASS_MAX_BYTES = limit
            store.add(f"reestimate_by_depth/{r:03d}", {"kind": "reestimate_by_depth",
                                                       "repeat": r, "seconds": seconds})
        print(f"  repeat {r + 1}/{cfg['repeats']}: " + ", ".join(
            f"{v} {row['step_s'][v] * 1e3:.0f} ms" for v in VARIANTS)
            + f"; QIL/float {row['qil_over_float']:.3f}, tfmot/float {row['tfmot_over_float']:.3f}",
            flush=True)


# The largest activation of ResNet-20 at batch 128 (the stem and stage 1: 7 of its 19
# activation quantizers; stages 2 and 3 have 1/2 and 1/4 of its values).
KERNEL_SHAPE = (BATCH, 32, 32, 16)
# One activation site, forward and backward (the gradient with respect to the input and, where
# the quantizer has them, its variables): what each variant of the step pays per site.
SITES = {"harness": "the timing harness alone (y = x; the loss y·w)",
         "relu": "ReLU (in training, QIL skips the ReLUs its quantizers follow: `QILReLU`)",
         "qil_activation": "QIL activation quantizer (`ops.quantize_activation`, 4 bits)",
         "tfmot_activation": "tfmot 8-bit activation quantizer (`MovingAverageQuantizer`, training)",
         "qil_activation_xla": "the QIL quantizer's arithmetic with its forward and its backward "
                               "each one XLA cluster (`jit_compile=True`; not the package's)"}
# The kernels the QIL activation quantizer runs, one at a time (forward: shift, FakeQuant;
# backward: FakeQuant's gradient mask, then two sums for the gradients of c and d).
KERNELS = {"shift": "forward: z = x − (c − d) (Sub)",
           "fake_quant": "forward: FakeQuantWithMinMaxVars (clip to [0, 2d], rounding)",
           "fake_quant_gradient": "backward: FakeQuantWithMinMaxVarsGradient (mask)",
           "sum": "backward: Σ dy inside (Sum, for ∂c and ∂d)",
           "residual": "backward: rounding residual y − z (Sub)",
           "residual_sum": "backward: Σ dy·(y − z) (Mul + Sum, for ∂d)"}


def xla_activation_quantizer():
    """The arithmetic of ``ops.quantize_activation`` (scalar interval) with its forward and its
    backward each compiled by XLA into fused loops: what a fused kernel would save, on this CPU.
    A measurement only; the package does not use it (XLA may contract multiply-adds, which
    moves rounding ties)."""
    import tensorflow as tf

    from qil_keras.quantization import ops

    @tf.function(jit_compile=True)
    def forward(x, lower, width, step, q):
        k = tf.minimum(tf.floor(tf.clip_by_value(x - lower, 0.0, width) / step + 0.5), q)
        return k * step

    @tf.function(jit_compile=True)
    def backward(dy, x, y, lower, width, d):
        z = x - lower
        top = width * ops._TOP_MARGIN
        dy_in = tf.where((z >= 0.0) & (z <= top), dy, 0.0)
        above = tf.reduce_sum(tf.where(z > top, dy, 0.0))
        inside = tf.reduce_sum(dy_in)
        return dy_in, -inside, inside + 2.0 * above + tf.reduce_sum(dy_in * (y - z)) / d

    @tf.custom_gradient
    def quantize(x, c, d, q):
        width = 2.0 * d
        y = forward(x, c - d, width, width / q, q)

        def grad(dy):
            dx, dc, dd = backward(dy, x, y, c - d, width, d)
            return dx, dc, dd, None
        return y, grad

    def quantize_activation(x, c, d, bits):
        c, d = ops.effective_interval(c, d)
        return quantize(x, c, d, ops.activation_levels(bits))
    return quantize_activation


def kernel_functions():
    """``{name: traced function}`` for every site and kernel on a ``KERNEL_SHAPE`` tensor."""
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from qil_keras.quantization import ops

    rng = np.random.default_rng(0)
    x = tf.constant(np.maximum(rng.standard_normal(KERNEL_SHAPE), 0).astype(np.float32))
    w = tf.constant(rng.standard_normal(KERNEL_SHAPE).astype(np.float32))
    c, d, bits = tf.Variable(1.0), tf.Variable(1.0), tf.Variable(4)
    from qil_keras import keras

    holder = keras.layers.Layer()
    tfmot_quantizer = tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
        num_bits=8, per_axis=False, symmetric=False, narrow_range=False)
    tfmot_vars = tfmot_quantizer.build(KERNEL_SHAPE, "act", holder)

    def site(forward, variables=()):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(forward(x) * w)
            return tape.gradient(loss, [x, *variables])
        return step

    xla_quantize = xla_activation_quantizer()
    width = tf.constant(2.0)
    z = x - 0.25
    functions = {
        "harness": site(lambda v: v),
        "relu": site(tf.nn.relu),
        "qil_activation": site(lambda v: ops.quantize_activation(v, c, d, bits), (c, d)),
        "tfmot_activation": site(lambda v: tfmot_quantizer(v, True, tfmot_vars)),
        "qil_activation_xla": site(lambda v: xla_quantize(v, c, d, bits), (c, d)),
        "shift": tf.function(lambda: x - 0.25),
        "fake_quant": tf.function(lambda: tf.quantization.fake_quant_with_min_max_vars(
            z, 0.0, width, num_bits=4)),
        "fake_quant_gradient": tf.function(
            lambda: tf.raw_ops.FakeQuantWithMinMaxVarsGradient(
                gradients=w, inputs=z, min=0.0, max=width, num_bits=8, narrow_range=False)[0]),
        "sum": tf.function(lambda: tf.reduce_sum(w)),
        "residual": tf.function(lambda: x - z),
        "residual_sum": tf.function(lambda: tf.reduce_sum(w * x)),
    }
    return functions


def run_kernels(store, cfg):
    """Per-kernel cost of one activation site, interleaved like the step timing: each repeat
    times ``kernel_calls`` calls of every function in turn (order rotated)."""
    todo = [r for r in range(cfg["kernel_repeats"]) if not store.has(f"kernels/{r:03d}")]
    if not todo:
        return
    functions = kernel_functions()
    names = list(functions)
    for fn in functions.values():
        for _ in range(3):
            fn()
    for r in todo:
        order = names[r % len(names):] + names[:r % len(names)]
        row = {"kind": "kernels", "repeat": r, "shape": list(KERNEL_SHAPE), "ms": {},
               "loadavg": os.getloadavg()[0]}
        for name in order:
            fn = functions[name]
            t0 = time.perf_counter()
            for _ in range(cfg["kernel_calls"]):
                out = fn()
            (out[0] if isinstance(out, (list, tuple)) else out).numpy()
            row["ms"][name] = 1e3 * (time.perf_counter() - t0) / cfg["kernel_calls"]
        store.add(f"kernels/{r:03d}", row)
    print(f"  kernels: {len(todo)} repeats", flush=True)


def summarize(store):
    rows = store.rows.values()
    timing = [r for r in rows if r["kind"] == "timing"]
    memory = [r for r in rows if r["kind"] == "memory"]
    out = {"step_s": {v: common.summary([r["step_s"][v] for r in timing]) for v in VARIANTS},
           "memory_mb": {}, "targets": TARGETS}
    for v in VARIANTS[1:]:
        out[f"{v}_over_float"] = common.summary([r[f"{v}_over_float"] for r in timing])
    out["qil_frozen_bn_over_qil"] = common.summary(
        [r["step_s"]["qil_frozen_bn"] / r["step_s"]["qil"] for r in timing])
    reestimation = [r for r in rows if r["kind"] == "reestimate"]
    if reestimation:
        out["reestimate_s"] = common.summary([r["seconds"] for r in reestimation])
        epoch_s = EPOCH_STEPS * np.median([t["step_s"]["qil"] for t in timing])
        out["reestimate_over_epoch"] = common.summary(
            [r["seconds"] / epoch_s for r in reestimation])
    by_depth = {r["repeat"]: r["seconds"] for r in rows if r["kind"] == "reestimate_by_depth"}
    if by_depth:
        one_pass = {r["repeat"]: r["seconds"] for r in reestimation}
        out["reestimate_by_depth_s"] = common.summary(list(by_depth.values()))
        out["reestimate_one_pass_over_by_depth"] = common.summary(
            [one_pass[r] / s for r, s in by_depth.items() if r in one_pass])
    med = out["step_s"]
    out["qil_over_float_of_medians"] = med["qil"]["median"] / med["float"]["median"]
    out["tfmot_over_float_of_medians"] = med["tfmot"]["median"] / med["float"]["median"]
    out["qil_over_tfmot"] = common.summary([r["step_s"]["qil"] / r["step_s"]["tfmot"] for r in timing])
    # Parts of the QIL step, in ms and as a share of the float step, per repeat.
    parts = {}
    for label, ablation in PARTS:
        parts[label] = [r["step_s"]["qil"] - r["step_s"][ablation] for r in timing]
    total = [r["step_s"]["qil"] - r["step_s"]["float"] for r in timing]
    parts["rest (8-bit fake quantizers, layer overhead)"] = [
        t - sum(p[i] for p in parts.values()) for i, t in enumerate(total)]
    parts["total QIL − float"] = total
    parts["frozen BatchNorm option (qil_frozen_bn − qil), on top"] = [
        r["step_s"]["qil_frozen_bn"] - r["step_s"]["qil"] for r in timing]
    out["parts_ms"] = {k: common.summary([1e3 * v for v in vals]) for k, vals in parts.items()}
    out["parts_over_float"] = {
        k: common.summary([v / r["step_s"]["float"] for v, r in zip(vals, timing)])
        for k, vals in parts.items()}
    for v in MEMORY_VARIANTS:
        mine = [r for r in memory if r["variant"] == v]
        if mine:
            out["memory_mb"][v] = {
                "peak_rss": common.summary([r["peak_mb"] for r in mine]),
                "ru_maxrss": common.summary([r["maxrss_mb"] for r in mine]),
                "after_build": common.summary([r["vm_hwm_mb_after_build"] or r["maxrss_mb_after_build"]
                                               for r in mine]),
                "train_increase": common.summary([r["train_increase_mb"] for r in mine])}
    kernels = [r for r in rows if r["kind"] == "kernels"]
    if kernels:
        out["kernels_ms"] = {name: common.summary([r["ms"][name] for r in kernels])
                             for name in kernels[0]["ms"]}
        # a site's own cost: its forward and backward minus the harness, per repeat
        out["sites_ms"] = {name: common.summary([r["ms"][name] - r["ms"]["harness"]
                                                 for r in kernels])
                           for name in SITES if name != "harness"}
    out["meets_qil_target"] = out["qil_over_float"]["median"] <= TARGETS["qil_over_float"]
    return out


def write_markdown(store, path):
    s = store.data["summary"]
    st = store.data["settings"]
    table_rows = []
    for v in VARIANTS:
        mem = s["memory_mb"].get(v, {})
        ratio = s.get(f"{v}_over_float")
        table_rows.append({
            "variant": LABELS[v],
            "step": common.fmt_spread(s["step_s"][v], 1e3, 0),
            "iqr": s["step_s"][v]["iqr"] * 1e3,
            "ratio": "1" if ratio is None else common.fmt_spread(ratio),
            "ratio_iqr": None if ratio is None else f"{ratio['q1']:.3f}–{ratio['q3']:.3f}",
            "peak": None if not mem else mem["peak_rss"]["median"],
            "inc": None if not mem else mem["train_increase"]["median"],
        })
    table = common.markdown_table(table_rows, [
        ("variant", "variant"), ("step time, ms: median [min–max]", "step"),
        ("IQR, ms", "iqr", ".0f"), ("step / float step: median [min–max]", "ratio"),
        ("ratio IQR", "ratio_iqr"), ("peak RSS, MB", "peak", ".0f"),
        ("RSS rise in training, MB", "inc", ".0f")])
    parts = common.markdown_table(
        [{"part": k, "ms": common.fmt_spread(s["parts_ms"][k], 1, 1),
          "share": common.fmt_spread(s["parts_over_float"][k])} for k in s["parts_ms"]],
        [("part of the QIL step", "part"), ("ms per step: median [min–max]", "ms"),
         ("/ float step: median [min–max]", "share")])
    kernel_section = ""
    if "kernels_ms" in s:
        sites = common.markdown_table(
            [{"site": SITES[k], "ms": common.fmt_spread(v, 1, 2)} for k, v in s["sites_ms"].items()],
            [("one activation site, forward + backward", "site"),
             ("ms, minus the harness: median [min–max]", "ms")])
        kernels = common.markdown_table(
            [{"kernel": KERNELS[k], "ms": common.fmt_spread(s["kernels_ms"][k], 1, 2)}
             for k in KERNELS],
            [("kernel of the QIL activation quantizer", "kernel"),
             ("ms: median [min–max]", "ms")])
        n = s["kernels_ms"]["harness"]["n"]
        kernel_section = f"""
What one activation site costs, on the largest activation of the step ({'×'.join(map(str, KERNEL_SHAPE))}
float32 values; {n} interleaved repeats of {st['kernel_calls']} calls; the harness, {common.fmt_spread(s['kernels_ms']['harness'], 1, 2)} ms,
is subtracted per repeat):

{sites}

The QIL quantizer's kernels, each alone on a tensor of that shape (TensorFlow's CPU kernels run
one pass over memory each; the quantizer's forward runs two, its backward four):

{kernels}
"""
    q = s["qil_over_float"]
    reestimation_line = (
        f"BatchNorm re-estimation at the end of `fit` and before each validation (2,048 "
        f"images, all in one pass): {common.fmt_spread(s['reestimate_s'], 1, 2)} s, "
        f"{common.fmt_spread(s['reestimate_over_epoch'])} of a {EPOCH_STEPS}-step CIFAR-10 epoch "
        "of QIL steps." if "reestimate_s" in s else "")
    if "reestimate_by_depth_s" in s:
        reestimation_line += (
            f" The same estimate with one pass per depth (what inputs too large for one batch "
            f"get): {common.fmt_spread(s['reestimate_by_depth_s'], 1, 1)} s; one pass / per "
            f"depth: {common.fmt_spread(s['reestimate_one_pass_over_by_depth'])} "
            f"({s['reestimate_by_depth_s']['n']} repeats).")
    text = f"""# Training cost: ResNet-20, batch {BATCH}, CIFAR-10 images

{common.run_header_markdown(store.data['run'])}
- size `{st['size']}`: {st['repeats']} repeats x {st['steps']} timed steps per variant
  ({st['warmup']} warm-up steps per variant first, {st['warmup_per_block']} untimed step(s) before
  each timed block); order rotated every repeat; `jit_compile={st['jit']}`; SGD(0.1, momentum 0.9);
  sparse categorical cross-entropy on logits; `train_on_batch` on one batch of {BATCH} real
  training images; random init weights. Memory: {st['memory_runs']} fresh process(es) per variant,
  {st['memory_steps']} steps each, peak RSS (`VmHWM`, `ru_maxrss` also recorded).
- wall time: {store.data.get('wall_s_total', 'n/a')} s (all runs of this file)

{table}

Ratios are taken within each repeat (same moment, same background load), then
summarized over repeats; the ratio of the median step times is
QIL/float {s['qil_over_float_of_medians']:.3f}, tfmot/float {s['tfmot_over_float_of_medians']:.3f}.
QIL/tfmot: {common.fmt_spread(s['qil_over_tfmot'])}. QIL with frozen BatchNorm statistics
(`bn_freeze_after=200`) / QIL (the default, batch statistics): {common.fmt_spread(s['qil_frozen_bn_over_qil'])}.
{reestimation_line}

Where the QIL step's extra time goes (per repeat: `qil` minus each ablation, which
bypasses one kind of quantizer in an otherwise identical model; "rest" is what is left
of `qil − float`; parts measured this way need not add up exactly, interactions land
in "rest"):

{parts}
{kernel_section}
Target: QIL step <= {TARGETS['qil_over_float']:.2f} x float step: median {q['median']:.3f}
(IQR {q['q1']:.3f}–{q['q3']:.3f}) -> **{'met' if s['meets_qil_target'] else 'not met'}**.
tfmot 8-bit QAT was reported at {TARGETS['tfmot_over_float_reported']:.2f} x float; here
{s['tfmot_over_float']['median']:.3f} (IQR {s['tfmot_over_float']['q1']:.3f}–{s['tfmot_over_float']['q3']:.3f}).
Peak RSS (`VmHWM` of the fresh process; `ru_maxrss` agrees because the processes start
before the parent loads TensorFlow) includes the TensorFlow runtime, the 256 images and their
loading pipeline; "RSS rise in training" is the peak after training minus the peak after
building the model.
"""
    common.write_text(path, text)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_only:
        if args.memory_steps is None:
            args.memory_steps = SIZES[args.size]["memory_steps"]
        return memory_only(args)
    common.check_archive(args.data or common.default_archive())
    cfg = SIZES[args.size]
    out = common.out_dir(args)
    settings = dict(cfg, size=args.size, batch=BATCH, jit=bool(args.jit), seed=args.seed,
                    model="resnet20", weights="random init", qil_bits="4/4 (first/last 8)",
                    optimizer="SGD(0.1, momentum=0.9)", calibration_images=NUM_CALIB)
    json_path = os.path.join(out, NAME + ".json")
    store = common.ResultStore(json_path, common.run_info(argv if argv is not None else sys.argv),
                               settings, fresh=args.fresh)
    print(f"train_cost --size {args.size}: writing {json_path}", flush=True)
    # Memory processes first, while this process is small: Linux carries ru_maxrss over
    # fork + exec, so children of a large parent would inherit its peak.
    run_memory(args, store, cfg, out)
    if any(not store.has(f"timing/{r:03d}") for r in range(cfg["repeats"])):
        x, y = load_batch(args)
        run_timing(args, store, cfg, x, y)
    run_kernels(store, cfg)
    store.set_summary(summarize(store))
    wall = store.finish()
    write_markdown(store, os.path.join(out, NAME + ".md"))
    s = store.data["summary"]
    print(f"QIL/float {common.fmt_spread(s['qil_over_float'])}, tfmot/float "
          f"{common.fmt_spread(s['tfmot_over_float'])}; wall {wall:.0f} s; "
          f"wrote {json_path} and {NAME}.md", flush=True)


if __name__ == "__main__":
    main()
