"""
Title: QIL through the TensorFlow Model Optimization Toolkit
Description: Annotate a tf-keras model with QILQuantizeConfig, apply it with tfmot's
quantize_apply, train the learned intervals with model.fit, and export the result as a verified
integer TFLite file, for projects that already build their quantization with tfmot.

    python examples/tfmot_path.py            # about a minute on 2 CPU cores
    python examples/tfmot_path.py --quick

If you are not on tfmot already, `qil_keras.quantize(model, w_bits, a_bits)` does the same in
one call and knows which tensors the integer file needs quantized (see the quickstart).
"""

import argparse
import os

import qil_keras  # first: it imports TensorFlow with its start-up log hidden
import tensorflow_model_optimization as tfmot
from qil_keras import keras
from qil_keras.data import embedded_mnist

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--out", default=os.path.join("runs", "tfmot_path"))
parser.add_argument("--quick", action="store_true", help="two epochs per step")
args = parser.parse_args()
EPOCHS = 2 if args.quick else 6
keras.utils.set_random_seed(0)
os.makedirs(args.out, exist_ok=True)
(x_train, y_train), (x_test, y_test) = embedded_mnist()   # 4,000 / 1,000 MNIST digits
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# ## A float model, trained first
#
# The usual tfmot flow starts from a trained float model.
def float_cnn():
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="conv1")(inputs)
    h = keras.layers.ReLU(name="relu1")(keras.layers.BatchNormalization(momentum=0.9, name="bn1")(h))
    h = keras.layers.MaxPooling2D(name="pool1")(h)
    h = keras.layers.Conv2D(32, 3, padding="same", name="conv2")(h)
    h = keras.layers.ReLU(name="relu2")(keras.layers.BatchNormalization(momentum=0.9, name="bn2")(h))
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(h))


float_model = float_cnn()
float_model.compile(keras.optimizers.Adam(3e-3), loss, ["accuracy"])
float_model.fit(x_train, y_train, batch_size=64, epochs=EPOCHS, verbose=2)
print(f"float model: {100 * float_model.evaluate(x_test, y_test, verbose=0)[1]:.2f} % top-1")

# ## Annotate
#
# tfmot's way to choose a config per layer: clone the model with a function that wraps the
# layers to quantize in `quantize_annotate_layer`. On a Conv2D or Dense, `QILQuantizeConfig`
# quantizes the kernel with a learned interval (c, d, gamma); on a ReLU, its output. The first
# and last layers stay at 8 bits, as `qil_keras.quantize` keeps them; layers left unannotated
# (BatchNorm, pooling) stay float. Cloning makes new weights, so the trained ones are copied.
BITS = {"conv1": 8, "relu1": 3, "conv2": 3, "relu2": 3, "logits": 8}


def annotate(layer):
    layer = layer.__class__.from_config(layer.get_config())
    if layer.name in BITS:
        config = qil_keras.QILQuantizeConfig(BITS[layer.name], BITS[layer.name])
        return tfmot.quantization.keras.quantize_annotate_layer(layer, config)
    return layer


annotated = keras.models.clone_model(float_model, clone_function=annotate)
annotated.set_weights(float_model.get_weights())

# ## Apply, then set the intervals from the weights and a calibration batch
#
# `qil_keras.quantize_apply` is tfmot's `quantize_apply` with a scheme that leaves the QIL
# configs alone (tfmot's default scheme silently swaps the config of a Conv followed by an
# annotated ReLU), and a check that every one survived. tfmot copies the float weights after
# building the quantizers, so the intervals are initialized afterwards.
with qil_keras.quantize_scope():
    model = qil_keras.quantize_apply(annotated)
qil_keras.initialize_intervals(model, calibration_data=x_train[:256])

# ## Fine-tune weights and intervals together
model.compile(keras.optimizers.Adam(1e-3), loss, ["accuracy"])
print(f"quantized, before training: {100 * model.evaluate(x_test, y_test, verbose=0)[1]:.2f} %")
model.fit(x_train, y_train, batch_size=64, epochs=EPOCHS, verbose=2)
# The tfmot path has no end-of-fit hook: re-estimate BatchNorm's statistics for the final
# weights yourself (qil_keras.quantize's models do this at the end of every fit).
qil_keras.reestimate_batchnorm(model, x_train)
print(f"tfmot-path QIL model: {100 * model.evaluate(x_test, y_test, verbose=0)[1]:.2f} % top-1")

# ## Export
#
# `export_tflite` first copies the tfmot model into native qil_keras layers (`from_tfmot`,
# checked against it), calibrates the 8-bit ranges tfmot leaves out (the logits) on
# `representative_data`, and then writes and verifies the integer file as for any QIL model.
path = os.path.join(args.out, "tfmot_qil_3w3a.tflite")
report = qil_keras.export_tflite(model, path, representative_data=x_train[:512],
                                 validation_data=(x_test, y_test))
print(report.table())
