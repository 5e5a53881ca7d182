"""An ImageNet recipe for a GPU cluster: ``qil-keras train`` commands for ResNet-18 at 4/4, 3/3
and 2/2, the training-step time measured at small scale on this CPU, and the paper's targets
(issue #6, item 6).

Measured here: ResNet-18 (``qil_keras.resnet18``, 224x224, 1000 classes, **random init**) trained
with ``train_on_batch`` at batch ``batch`` on real CIFAR-10 training images upscaled to 224x224 with
ImageNet normalization (``common.cifar_images(style="imagenet")``; CIFAR labels 0-9 used as class
ids) -- the step time does not depend on the image content or the weights. Two variants, compiled
alike (Adam, sparse categorical cross-entropy on logits, ``jit_compile=False``):

* ``float``: ``qil_keras.resnet18()``;
* ``qil``: ``qil_keras.quantize(float, 4, 4, calibration_data=<calibration images>)`` (inner
  layers 4/4, first and last layers 8-bit).

For each variant: the time of ``quantize`` and of the first step (tf.function tracing, paid once
per stage and process), then interleaved timing: each repeat runs ``steps`` timed steps of every
variant in turn (order rotated per repeat). Reported: median step time, images/s, and the
extrapolated time of one ImageNet-1k epoch (1,281,167 training images) **on this CPU** at that
batch. GPU times need a GPU and are not measured here.

Outputs ``imagenet_recipe.json`` and ``imagenet_recipe.md`` (commands, measurements, targets) in
``<out>`` (quick runs: ``<out>/quick/``); resumable per repeat.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

NAME = "imagenet_recipe"
VARIANTS = ("float", "qil")
IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
SIZES = {
    "quick": dict(batch=16, repeats=3, steps=2, warmup=1, calibration_images=32),
    "full": dict(batch=16, repeats=10, steps=4, warmup=2, calibration_images=32),
}
# ResNet-18 top-1 (%) on ImageNet as the paper reports it (Jung et al. 2019, Table 1).
PAPER_TARGETS = {"float": 70.2, "4/4": 70.1, "3/3": 69.2, "2/2": 65.7}

# The recipe (our choices where the paper's own hyper-parameters are not in our notes).
RECIPE = dict(stages="5/5,4/4,3/3,2/2", epochs_per_stage=30, global_batch=256, lr=1e-4,
              float_epochs=90, float_lr=1e-3)


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(variant, x_calib, seed):
    import qil_keras
    from qil_keras import keras

    keras.utils.set_random_seed(seed)
    model = qil_keras.resnet18(num_classes=1000, input_shape=(224, 224, 3))
    quantize_s = None
    if variant == "qil":
        t0 = time.perf_counter()
        model = qil_keras.quantize(model, 4, 4, calibration_data=x_calib)
        quantize_s = time.perf_counter() - t0
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    return model, quantize_s


def measure(args, cfg, store):
    todo = [r for r in range(cfg["repeats"]) if not store.has(f"timing/{r:03d}")]
    need_setup = not all(store.has(f"setup/{v}") for v in VARIANTS)
    if not todo and not need_setup:
        return
    x, y, _ = common.cifar_images(args, max(cfg["batch"], cfg["calibration_images"]), "train",
                                  seed=args.seed, style="imagenet", image_size=224)
    xb, yb = x[:cfg["batch"]], y[:cfg["batch"]]
    models = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        model, quantize_s = build(variant, x[:cfg["calibration_images"]], args.seed)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.train_on_batch(xb, yb)
        first = time.perf_counter() - t0
        for _ in range(cfg["warmup"]):
            model.train_on_batch(xb, yb)
        models[variant] = model
        if not store.has(f"setup/{variant}"):
            store.add(f"setup/{variant}", {"kind": "setup", "variant": variant, "build_s": build_s,
                                           "quantize_s": quantize_s, "first_step_s": first,
                                           "params": int(model.count_params())})
        print(f"  {variant}: built in {build_s:.1f} s (quantize {quantize_s or 0:.1f} s), first step "
              f"(tracing) {first:.1f} s", flush=True)
    for r in todo:
        order = VARIANTS[r % 2:] + VARIANTS[:r % 2]
        row = {"kind": "timing", "repeat": r, "order": list(order), "step_s": {},
               "loadavg": os.getloadavg()[0]}
        for variant in order:
            t0 = time.perf_counter()
            for _ in range(cfg["steps"]):
                models[variant].train_on_batch(xb, yb)
            row["step_s"][variant] = (time.perf_counter() - t0) / cfg["steps"]
        row["qil_over_float"] = row["step_s"]["qil"] / row["step_s"]["float"]
        store.add(f"timing/{r:03d}", row)
        print(f"  repeat {r + 1}/{cfg['repeats']}: float {row['step_s']['float']:.2f} s, QIL "
              f"{row['step_s']['qil']:.2f} s per step of {cfg['batch']}", flush=True)


def summarize(store, cfg):
    timing = [r for r in store.rows.values() if r["kind"] == "timing"]
    setup = {r["variant"]: r for r in store.rows.values() if r["kind"] == "setup"}
    out = {"setup": setup, "step_s": {}, "images_per_s": {}, "cpu_epoch_h": {}}
    for v in VARIANTS:
        s = common.summary([r["step_s"][v] for r in timing])
        out["step_s"][v] = s
        out["images_per_s"][v] = cfg["batch"] / s["median"]
        out["cpu_epoch_h"][v] = IMAGENET_TRAIN / cfg["batch"] * s["median"] / 3600
    out["qil_over_float"] = common.summary([r["qil_over_float"] for r in timing])
    stages = len(RECIPE["stages"].split(","))
    out["cpu_schedule_days"] = {
        "qil_progressive": stages * RECIPE["epochs_per_stage"] * out["cpu_epoch_h"]["qil"] / 24,
        "float": RECIPE["float_epochs"] * out["cpu_epoch_h"]["float"] / 24}
    return out


def commands():
    r = RECIPE
    common_flags = ("--model resnet18 --data imagenet2012 --data-dir $TFDS_DATA_DIR \\\n"
                    "    --manual-dir $IMAGENET_TARS --val-split validation \\\n"
                    f"    --batch-size {r['global_batch']} --strategy multi-worker --seed 0 --out runs/r18_qil")
    prepare = ("python -c \"import tensorflow_datasets as tfds; "
               "tfds.builder('imagenet2012', data_dir='$TFDS_DATA_DIR').download_and_prepare("
               "download_config=tfds.download.DownloadConfig(manual_dir='$IMAGENET_TARS'))\"")
    stage_lists = {"4/4": "5/5,4/4", "3/3": "5/5,4/4,3/3", "2/2": "5/5,4/4,3/3,2/2"}
    qil = {}
    for bits, stages in stage_lists.items():
        extra = (f" \\\n    --float-epochs {r['float_epochs']} --float-lr {r['float_lr']}"
                 if bits == "4/4" else "")
        qil[bits] = (f"qil-keras train {common_flags} \\\n"
                     f"    --stages {stages} --epochs {r['epochs_per_stage']} --lr {r['lr']}{extra}")
    return prepare, qil


def write_markdown(store, path, cfg):
    s = store.data["summary"]
    prepare, qil = commands()
    r = RECIPE
    rows = []
    for v in VARIANTS:
        su = s["setup"].get(v, {})
        rows.append({"variant": {"float": "float ResNet-18", "qil": "QIL 4/4 ResNet-18 (first/last 8-bit)"}[v],
                     "step": common.fmt_spread(s["step_s"][v], 1.0, 2), "ips": s["images_per_s"][v],
                     "epoch": s["cpu_epoch_h"][v], "first": su.get("first_step_s"),
                     "quantize": su.get("quantize_s")})
    table = common.markdown_table(rows, [
        ("variant", "variant"), (f"step time at batch {cfg['batch']}, s: median [min–max]", "step"),
        ("images/s", "ips", ".1f"), ("one ImageNet epoch on this CPU, h (extrapolated)", "epoch", ".0f"),
        ("first step incl. tracing, s", "first", ".1f"), ("quantize(), s", "quantize", ".1f")])
    targets = "\n".join(f"| {k} | {v} |" for k, v in PAPER_TARGETS.items())
    stages = len(r["stages"].split(","))
    text = f"""# ImageNet recipe: QIL ResNet-18 on a GPU cluster

{common.run_header_markdown(store.data['run'])}
- wall time: {store.data.get('wall_s_total', 'n/a')} s (all runs of this file)

## Targets: ResNet-18 top-1 on ImageNet, as the paper reports them

| bits (W/A) | top-1 % |
|---|---|
{targets}

(Jung et al., CVPR 2019; progressive fine-tuning from a pretrained full-precision network, first
and last layers not quantized to low bits.)

## Commands

The schedule is the paper's progressive one, FP → 5/5 → 4/4 → 3/3 → 2/2, each stage starting from
the previous one. `qil-keras train` runs it with one `fit` per stage and keeps every stage's
weights under `--out`; a command whose `--stages` extends an earlier one with the same `--out`
loads the finished stages instead of retraining them, so the three commands below share their
common stages (run them in order, or only the last one, which also produces 4/4 and 3/3).

0. Prepare ImageNet once, on one machine, before starting workers (`imagenet2012` needs
   `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in `$IMAGENET_TARS`; every worker then
   reads the prepared TFRecords from the shared `$TFDS_DATA_DIR`):

```bash
{prepare}
```

1. Every worker runs the same command with its own `TF_CONFIG`, e.g. for worker 0 of 4:

```bash
export TF_CONFIG='{{"cluster": {{"worker": ["host0:12345", "host1:12345", "host2:12345", "host3:12345"]}}, "task": {{"type": "worker", "index": 0}}}}'
```

2. QIL 4/4, 3/3 and 2/2 (progressive). The first command also trains the float ResNet-18
   ({r['float_epochs']} epochs, saved as `runs/r18_qil/float/final.weights.h5`, which the later
   commands load); with trained float weights of `qil_keras.resnet18` at hand, replace
   `--float-epochs ... --float-lr ...` by `--float-weights PATH`.

```bash
# 4/4
{qil['4/4']}
# 3/3 (reuses the 5/5 and 4/4 stages)
{qil['3/3']}
# 2/2 (reuses 5/5, 4/4 and 3/3)
{qil['2/2']}
```

Choices that are ours, not the paper's (its per-stage epochs, optimizer and learning rates are not
in our reference notes): {r['epochs_per_stage']} epochs per stage, global batch {r['global_batch']}
(`--batch-size` is global under `multi-worker`), Adam at {r['lr']} for the QIL stages and
{r['float_lr']} for {r['float_epochs']} float epochs. The CLI trains with constant-rate Adam: it has
no learning-rate schedule, SGD or weight-decay option, so a schedule like the paper's needs the
Python API (`progressive_fit(..., optimizer=lambda i, stage: ...)` with a
`LearningRateSchedule`). Results: `runs/r18_qil/summary.md` (top-1 per stage and pruning), `results.json`, plots.

## Step time measured here (CPU, small scale)

ResNet-18 at 224×224, 1000 classes, random init, batch {cfg['batch']}, inputs are real CIFAR-10
images upscaled to 224×224 (ImageNet normalization); `train_on_batch`, Adam,
`jit_compile=False`; {cfg['repeats']} interleaved repeats × {cfg['steps']} steps per variant after
{cfg['warmup']} warm-up step(s).

{table}

QIL/float step time: {common.fmt_spread(s['qil_over_float'])}. **These are CPU figures from a
2-core machine**, for scale only: one ImageNet epoch ({IMAGENET_TRAIN:,} images) would take about
{s['cpu_epoch_h']['qil']:.0f} h for QIL and {s['cpu_epoch_h']['float']:.0f} h for float here, and the
QIL schedule ({stages} stages × {r['epochs_per_stage']} epochs) about {s['cpu_schedule_days']['qil_progressive']:.0f}
days. Time per epoch on GPUs has to be measured on GPUs (none here); the QIL/float ratio can
differ there, since QIL adds many small element-wise ops per layer. The first-step (tracing) and
`quantize()` times are one-off costs per stage and worker.
"""
    common.write_text(path, text)


def main(argv=None):
    args = parse_args(argv)
    common.check_archive(args.data or common.default_archive())
    cfg = SIZES[args.size]
    out = common.out_dir(args)
    settings = dict(cfg, size=args.size, model="resnet18", input="224x224x3", classes=1000,
                    weights="random init", inputs="CIFAR-10 train images upscaled to 224",
                    jit_compile=False, optimizer="Adam(1e-4)", qil="4/4, first/last 8-bit",
                    seed=args.seed)
    json_path = os.path.join(out, NAME + ".json")
    store = common.ResultStore(json_path, common.run_info(argv if argv is not None else sys.argv),
                               settings, fresh=args.fresh)
    print(f"imagenet_recipe --size {args.size}: writing {json_path}", flush=True)
    measure(args, cfg, store)
    store.set_summary(dict(summarize(store, cfg), recipe=RECIPE, paper_targets=PAPER_TARGETS,
                           commands=dict(prepare=commands()[0], qil=commands()[1])))
    wall = store.finish()
    write_markdown(store, os.path.join(out, NAME + ".md"), cfg)
    s = store.data["summary"]
    print(f"float {s['step_s']['float']['median']:.2f} s/step, QIL {s['step_s']['qil']['median']:.2f} "
          f"s/step (batch {cfg['batch']}); CPU epoch {s['cpu_epoch_h']['qil']:.0f} h (QIL); wall "
          f"{wall:.0f} s; wrote {json_path} and {NAME}.md", flush=True)


if __name__ == "__main__":
    main()
