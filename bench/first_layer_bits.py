"""One file for both CPU kernel sets: the first conv's weights at 4 bits instead of 8.

The default file (``first_last_bits=8``) is kernel-dependent at its first convolution: with
8-bit weights on the 8-bit input image, the sums reach every integer, so whatever the scales,
some land in the band where XNNPACK (one float32 rounding) and LiteRT's builtin kernels (two
fixed-point roundings) round apart (docs/export.md, "Known gaps"). With 2- to 4-bit weights the
snap that ends ``fit`` moves the layer's ``γ`` so that each channel's multiplier is a fraction
whose sums a bias keeps off both kernel sets' ties, as it does for the inner layers. This
measures what quantizing the first conv's weights at 4 bits (``layer_bits={"conv1": (4, 8)}``,
its 8-bit input unchanged) does to the file under the two kernel sets and to accuracy.

The CIFAR-10 study's float ResNet-20 (``bench/cifar_study.py``, its committed weights) is
quantized at ``bits`` with the first conv's weights at 8 (the default) or 4 bits, fine-tuned for
``epochs`` epochs as the study's rows are (SGD, Nesterov momentum 0.9, cosine decay from 0.01
over the run, intervals at 0.01x; seed 0, the same batches for both arms) and exported with
default settings (INT8 storage, written for XNNPACK). Per row: Keras top-1 and the file's top-1
under each kernel set on the 10,000 test images, top-1 agreement between the kernel sets and
with Keras, and the ops whose two arithmetics differ from the same inputs
(``qil_keras.kernel_differences``, first ``kdiff_images`` test images). One seed: an accuracy
difference between the arms smaller than the study's seed spread (0.1-0.3 points) is noise.

Outputs: ``first_layer_bits.json``, ``first_layer_bits.md`` (quick runs under ``<out>/quick/``).
Resumable per row.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "first_layer_bits"
FIRST_LAYER = "conv1"
SIZES = {
    "quick": dict(bits=[2], first_bits=[8, 4], epochs=1, steps=20, test_images=1000,
                  kdiff_images=100, seed=0),
    "full": dict(bits=[2, 4], first_bits=[8, 4], epochs=3, steps=None, test_images=10000,
                 kdiff_images=500, seed=0),
}


def run(bits, first_bits, args, cfg, data):
    """One row: quantize, fine-tune, export, measure."""
    import cifar_study
    import qil_keras
    from qil_keras import keras
    from qil_keras.integer.export import export_tflite, run_tflite

    study = cifar_study.SIZES["full"]
    train, (x_test, y_test), steps_per_epoch = data
    keras.utils.set_random_seed(cfg["seed"])
    base = cifar_study._load_float(args, study, args.out)
    layer_bits = None if first_bits == 8 else {FIRST_LAYER: (first_bits, 8)}
    model = qil_keras.quantize(base, bits, bits, calibration_data=next(iter(train))[0][:256],
                               layer_bits=layer_bits)
    steps = cfg["steps"] or steps_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(study["row_lr"], steps * cfg["epochs"])
    optimizer = qil_keras.qil_optimizer(
        model, keras.optimizers.SGD(schedule, momentum=study["momentum"], nesterov=True),
        interval_lr_multiplier=study["interval_lr_multiplier"])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(train.take(steps), epochs=cfg["epochs"], verbose=2)
    fit_s = time.perf_counter() - t0
    keras_pred = model.predict(x_test, batch_size=256, verbose=0).argmax(1)
    report = export_tflite(model, validation_data=(x_test[:1000], y_test[:1000]))
    pred = {label: run_tflite(report.model_bytes, x_test, op_resolver=resolver).argmax(1)
            for label, resolver in (("xnnpack", "AUTO"),
                                    ("builtin", "BUILTIN_WITHOUT_DEFAULT_DELEGATES"))}
    differing = qil_keras.kernel_differences(report.model_bytes, x_test[:cfg["kdiff_images"]])
    return {"bits": bits, "first_bits": first_bits, "epochs": cfg["epochs"], "steps": steps,
            "fit_s": fit_s,
            "keras_top1": float(np.mean(keras_pred == y_test)),
            "file_top1_xnnpack": float(np.mean(pred["xnnpack"] == y_test)),
            "file_top1_builtin": float(np.mean(pred["builtin"] == y_test)),
            "agreement_xnnpack_builtin": float(np.mean(pred["xnnpack"] == pred["builtin"])),
            "agreement_keras_xnnpack": float(np.mean(keras_pred == pred["xnnpack"])),
            "agreement_keras_builtin": float(np.mean(keras_pred == pred["builtin"])),
            "kernel_differences": [[int(i), name, int(n), int(size), float(levels)]
                                   for i, name, n, size, levels in differing],
            "test_images": int(len(y_test))}


def differing_ops(row):
    """``"CONV_2D #1 802/16384000, MEAN #31 ..."``: the ops whose kernel sets differ."""
    return ", ".join(f"{name} #{i} {n}/{size}" for i, name, n, size, _ in
                     row["kernel_differences"]) or "none"


def write_markdown(store, path):
    rows = [dict(r, bits=f"{r['bits']}/{r['bits']}", ops=differing_ops(r))
            for r in store.rows.values()]
    for r in rows:
        for key in ("keras_top1", "file_top1_xnnpack", "file_top1_builtin",
                    "agreement_xnnpack_builtin", "agreement_keras_xnnpack",
                    "agreement_keras_builtin"):
            r[key] = 100 * r[key]
    cfg = store.data["settings"]
    lines = [f"# {NAME}: the first conv's weights at 4 bits, for one file under both kernel sets",
             "", common.run_header_markdown(store.data["run"]), "",
             f"The CIFAR-10 study's float ResNet-20, fine-tuned {cfg['epochs']} epoch(s) per row "
             f"(seed {cfg['seed']}); {cfg['test_images']:,} test images; ops compared on the "
             f"first {cfg['kdiff_images']} (values differing / values).", "",
             common.markdown_table(rows, [
                 ("bits", "bits"), ("first conv weight bits", "first_bits"),
                 ("Keras top-1 %", "keras_top1", ".2f"),
                 ("file XNNPACK %", "file_top1_xnnpack", ".2f"),
                 ("file builtin %", "file_top1_builtin", ".2f"),
                 ("top-1 agreement XNNPACK vs builtin %", "agreement_xnnpack_builtin", ".2f"),
                 ("Keras vs XNNPACK %", "agreement_keras_xnnpack", ".2f"),
                 ("Keras vs builtin %", "agreement_keras_builtin", ".2f"),
                 ("ops whose kernel sets differ", "ops")]), ""]
    common.write_text(path, "\n".join(lines))


def main(argv=None):
    args = common.base_parser(__doc__.split("\n")[0], NAME).parse_args(argv)
    cfg = SIZES[args.size]
    out, store = common.open_store(args, NAME, cfg, argv)
    import cifar_study

    study_args = cifar_study.full_size_args(args)
    data = None
    for bits in cfg["bits"]:
        for first_bits in cfg["first_bits"]:
            key = f"{bits}/first{first_bits}"
            if store.has(key):
                continue
            if data is None:
                train, _, (x_test, y_test), steps_per_epoch = cifar_study.datasets(
                    study_args, cifar_study.SIZES["full"])
                n = cfg["test_images"]
                data = (train, (x_test[:n], y_test[:n]), steps_per_epoch)
            store.add(key, run(bits, first_bits, study_args, cfg, data))
            row = store.get(key)
            print(f"{key}: Keras {row['keras_top1']:.4f}, XNNPACK vs builtin "
                  f"{row['agreement_xnnpack_builtin']:.4f} ({differing_ops(row)})", flush=True)
            write_markdown(store, os.path.join(out, f"{NAME}.md"))
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
