"""Which ops make an exported file kernel-dependent (issue #15, "one file, every CPU path").

For every layer pattern of ``tests/integer/test_layer_coverage.py`` (the layers of MobileNet
V1-V3, EfficientNet, ResNet50V2, DenseNet and Inception), trained as that test trains it
(2,000 real MNIST digits at 14x14, 4 float epochs, then ``quantize`` at b/b and one QAT
epoch), the default export (written for XNNPACK) is run on the 500 test digits:

* under LiteRT's default XNNPACK delegate, against ``IntegerReference(kernels="xnnpack")``
  (``compare_outputs_with_xnnpack``: every output value, in levels);
* op by op, with the builtin kernels' arithmetic and with XNNPACK's from the same input
  tensors (``kernel_differences``): the ops whose two arithmetics give different values, how
  many values and by how many levels;
* end to end: top-1 agreement of the file under XNNPACK with the file under the builtin
  kernels (both from the interpreter), and of each with the Keras model.

Outputs: ``<out>/kernel_dependence.json`` and ``.md`` (``--size quick``: 3 patterns, 2/2 only,
under ``<out>/quick/``). No timing: the figures are counts, so a loaded machine does not
change them.
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import numpy as np  # noqa: E402

NAME = "kernel_dependence"
SIZES = {"quick": dict(patterns=["separable", "hard_swish", "inception_concat"], bits=[2],
                       test=200),
         "full": dict(patterns=None, bits=[4, 2], test=500)}
BUILTIN = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"


def _patterns():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "tests", "integer"))
    import test_layer_coverage   # the layer table's patterns, shared with the test

    return test_layer_coverage


def run_row(patterns, entry, bits, digits, test):
    import qil_keras
    from qil_keras import keras
    from qil_keras.integer.export import run_tflite

    (x, y), (xt, yt) = digits
    xt, yt = xt[:test], yt[:test]
    model, scale = patterns._train(entry, digits)
    x, xt = x * scale, xt * scale
    keras.utils.set_random_seed(1)
    q = qil_keras.quantize(model, bits, bits, calibration_data=x[:256])
    q.compile(keras.optimizers.Adam(1e-3), patterns.LOSS)
    q.fit(x, y, batch_size=64, epochs=1, verbose=0)
    report = qil_keras.export_tflite(q, representative_data=x[:256], verify=False)
    keras_out = report.keras_model.predict(xt, verbose=0)
    xnnpack = run_tflite(report.model_bytes, xt, op_resolver="AUTO")
    builtin = run_tflite(report.model_bytes, xt, op_resolver=BUILTIN)
    comparison = qil_keras.compare_outputs_with_xnnpack(report.model_bytes, xt)
    rows = qil_keras.kernel_differences(report.model_bytes, xt)
    agree = lambda a, b: float(np.mean(a.argmax(1) == b.argmax(1)))  # noqa: E731
    return {
        "pattern": entry.__name__, "bits": bits, "test_images": int(len(xt)),
        "xnnpack_reference": comparison.message(), "xnnpack_reference_exact": comparison.exact,
        "ops_differing": [{"op_index": i, "op": op, "values": count, "of": total,
                           "max_levels": levels} for i, op, count, total, levels in rows],
        "agreement_xnnpack_builtin": agree(xnnpack, builtin),
        "agreement_keras_xnnpack": agree(keras_out, xnnpack),
        "agreement_keras_builtin": agree(keras_out, builtin),
        "top1_keras": float(np.mean(keras_out.argmax(1) == yt)),
        "top1_xnnpack": float(np.mean(xnnpack.argmax(1) == yt)),
        "top1_builtin": float(np.mean(builtin.argmax(1) == yt)),
    }


def write_markdown(store, path):
    rows = list(store.rows.values())
    lines = [common.run_header_markdown(store.data["run"]), "",
             "Default export (written for XNNPACK), layer-coverage patterns trained on 2,000 "
             "MNIST digits (14x14), evaluated on the test digits. `ops differing`: op (values "
             "whose builtin and XNNPACK arithmetic differ from the same inputs / values, largest "
             "difference in levels).", ""]
    table = []
    for row in rows:
        ops = "; ".join(f"{d['op']} {d['values']}/{d['of']} (≤{d['max_levels']:g})"
                        for d in row["ops_differing"]) or "none"
        table.append({"pattern": row["pattern"], "bits": f"{row['bits']}/{row['bits']}",
                      "xnnpack": "exact" if row["xnnpack_reference_exact"] else "differs",
                      "xb": 100 * row["agreement_xnnpack_builtin"],
                      "kx": 100 * row["agreement_keras_xnnpack"],
                      "kb": 100 * row["agreement_keras_builtin"], "ops": ops})
    lines.append(common.markdown_table(table, [
        ("pattern", None), ("bits", None), ("file under XNNPACK vs reference", "xnnpack"),
        ("top-1 agreement XNNPACK vs builtin %", "xb", ".1f"),
        ("Keras vs XNNPACK %", "kx", ".1f"), ("Keras vs builtin %", "kb", ".1f"),
        ("ops differing", "ops")]))
    totals = collections.Counter()
    for row in rows:
        for d in row["ops_differing"]:
            totals[d["op"]] += 1
    if totals:
        lines += ["", "Rows in which each op type differs: " + ", ".join(
            f"{op} {n}" for op, n in totals.most_common()) + f" (of {len(rows)} rows)."]
    common.write_text(path, "\n".join(lines) + "\n")


def main(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], NAME)
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    out, store = common.open_store(args, NAME, cfg, argv)
    patterns = _patterns()
    from qil_keras.data import embedded_mnist

    (x, y), (xt, yt) = embedded_mnist()

    def half(images):
        return images.reshape(-1, 14, 2, 14, 2, 1).mean(axis=(2, 4)).astype(np.float32)

    digits = (half(x[:2000]), y[:2000]), (half(xt[:500]), yt[:500])
    entries = [e for e in patterns.ENTRIES if cfg["patterns"] is None
               or e.__name__ in cfg["patterns"]]
    for entry in entries:
        for bits in cfg["bits"]:
            key = f"{entry.__name__}/{bits}"
            if store.has(key):
                continue
            store.add(key, run_row(patterns, entry, bits, digits, cfg["test"]))
            print(key, store.get(key)["agreement_xnnpack_builtin"],
                  [d["op"] for d in store.get(key)["ops_differing"]], flush=True)
            write_markdown(store, os.path.join(out, f"{NAME}.md"))
    store.finish()
    write_markdown(store, os.path.join(out, f"{NAME}.md"))


if __name__ == "__main__":
    main()
