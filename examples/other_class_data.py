"""
Title: Quantizing with data of other classes
Description: The QIL paper notes that the intervals can be learned without the training data
of the classes the model must recognize. Here a float CNN knows all ten MNIST digits; it is
quantized to 2/2 by distillation on images of the digits 5-9 only (no labels), and then
evaluated on the digits 0-4 it never saw during quantization.

    python examples/other_class_data.py            # about two minutes on 2 CPU cores
    python examples/other_class_data.py --quick
"""

import argparse

import qil_keras
from qil_keras import keras
from qil_keras.data import embedded_mnist

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--bits", type=int, default=2, help="weight and activation bits")
parser.add_argument("--quick", action="store_true", help="fewer epochs")
args = parser.parse_args()
FLOAT_EPOCHS, QIL_EPOCHS = (2, 1) if args.quick else (6, 4)
keras.utils.set_random_seed(0)

(x_train, y_train), (x_test, y_test) = embedded_mnist()   # 4,000 / 1,000 digits
seen = x_test[y_test <= 4], y_test[y_test <= 4]           # what we evaluate on
other_images = x_train[y_train >= 5]                       # what quantization may use
print(f"{len(other_images)} training images of the digits 5-9 to quantize with; "
      f"{len(seen[0])} test images of the digits 0-4 to evaluate on")

# ## The float model knows all ten digits
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
float_model = qil_keras.small_cnn(input_shape=(28, 28, 1), num_classes=10)
float_model.compile(keras.optimizers.Adam(3e-3), loss, ["accuracy"])
float_model.fit(x_train, y_train, batch_size=64, epochs=FLOAT_EPOCHS, verbose=2)


def top1(model, data):
    model.compile(loss=loss, metrics=["accuracy"])
    return 100 * model.evaluate(*data, verbose=0)[1]


results = {"float": top1(float_model, seen)}

# ## Quantized, intervals from a calibration batch only (no training)
#
# The baseline a user gets without any quantization-aware training: the intervals start at
# the MSE-optimal range of each layer's weights and at the range of a calibration batch.
untrained = qil_keras.quantize(float_model, args.bits, args.bits, calibration_data=other_images[:256])
results[f"QIL {args.bits}/{args.bits}, no training"] = top1(untrained, seen)

# ## Distillation on images of other classes
#
# `quantize_with_distillation` trains the quantized model (weights and intervals) to reproduce
# the float model's outputs on whatever images it is given; labels are not used. Its `fit`
# ends like any QIL model's: BatchNorm re-estimated, weights on the file's integer grid.
result = qil_keras.quantize_with_distillation(
    float_model, other_images, stages=[(args.bits, args.bits)], epochs_per_stage=QIL_EPOCHS,
    batch_size=64, optimizer=keras.optimizers.Adam(1e-3), verbose=2)
results[f"QIL {args.bits}/{args.bits}, distilled on digits 5-9"] = top1(result.final_model, seen)

print("\nTop-1 on the test digits 0-4")
for name, accuracy in results.items():
    print(f"  {name:<36} {accuracy:6.2f} %")
