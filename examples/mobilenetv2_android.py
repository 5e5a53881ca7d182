"""
Title: A MobileNetV2 taken to an Android-ready integer file
Description: Quantize a Keras Applications MobileNetV2 with QIL, fine-tune it, export a fully
integer TFLite file with its serving signature and metadata, and compare its size and latency
with the float and post-training int8 files of the same network.

    python examples/mobilenetv2_android.py --data ../shared/data/cifar10-jpg.tar.gz
    python examples/mobilenetv2_android.py --data ... --quick     # a couple of minutes

MobileNetV2 (alpha 0.35) runs on 32x32 CIFAR-10 images here so that a CPU trains it in
minutes; on a phone you would use 224x224 inputs and ImageNet weights, with the same calls.
"""

import argparse
import os

import numpy as np

import qil_keras
from qil_keras import datasets, keras

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--data", default=os.environ.get("QIL_CIFAR10", "cifar10-jpg.tar.gz"),
                    help="CIFAR-10 as split/class/*.jpg (folder or .tar.gz)")
parser.add_argument("--bits", type=int, default=8, help="weight and activation bits")
parser.add_argument("--out", default=os.path.join("runs", "mobilenetv2_android"))
parser.add_argument("--quick", action="store_true", help="tiny subset and one epoch per step")
args = parser.parse_args()

PER_CLASS = (50, 20) if args.quick else (1000, 100)
FLOAT_EPOCHS, QIL_EPOCHS = (1, 1) if args.quick else (8, 2)
keras.utils.set_random_seed(0)
os.makedirs(args.out, exist_ok=True)

# ## Data, with MobileNet's preprocessing
#
# MobileNets expect pixels mapped to [-1, 1] (`x / 127.5 - 1`). That puts every pixel exactly
# halfway between two int8 input levels; `quantize(..., calibration_data=...)` widens the input
# range by a step so that no kernel rounds a pixel differently from Keras.
def arrays(split, per_class, class_names=None):
    ds, info = datasets.load_image_folder(args.data, split, batch_size=256, style="none",
                                          limit_per_class=per_class, class_names=class_names)
    x = np.concatenate([x.numpy() for x, _ in ds]) * 2.0 - 1.0   # [0, 1] -> [-1, 1]
    y = np.concatenate([y.numpy() for _, y in ds])
    return x.astype(np.float32), y, info


x_train, y_train, info = arrays("train", PER_CLASS[0])
x_test, y_test, _ = arrays("test", PER_CLASS[1], info.class_names)
print(f"{len(x_train)} training and {len(x_test)} test images")

# ## The float model
#
# Keras Applications' MobileNetV2, untrained, 10 logits. Every layer of it quantizes: the
# depthwise and 1x1 convolutions get QIL weights, ReLU6 outputs QIL activations, the linear
# bottlenecks and residual adds 8-bit quantizers.
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
float_model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None,
                                              classes=10, classifier_activation=None)
float_model.compile(keras.optimizers.Adam(2e-3), loss, ["accuracy"])
float_model.fit(x_train, y_train, batch_size=64, epochs=FLOAT_EPOCHS, verbose=2)

# ## Quantize and fine-tune
model = qil_keras.quantize(float_model, args.bits, args.bits, calibration_data=x_train[:256])
print(model.qil_report)                  # every layer: what quantize did, bits, reason
model.compile(keras.optimizers.Adam(5e-4), loss, ["accuracy"])
model.fit(x_train, y_train, batch_size=64, epochs=QIL_EPOCHS, verbose=2)

# ## Export with the signature an app uses
#
# The file keeps a `serving_default` signature keyed by the Keras input and output names, and a
# metadata record with the class names and the preprocessing (`x = pixel * scale + offset`), so
# an app needs nothing else from this script.
path = os.path.join(args.out, f"mobilenetv2_qil_{args.bits}w{args.bits}a.tflite")
report = qil_keras.export_tflite(model, path, validation_data=(x_test, y_test),
                                 class_names=info.class_names,
                                 preprocessing={"scale": 1 / 127.5, "offset": -1.0})
print(report.table())

from ai_edge_litert.interpreter import Interpreter  # noqa: E402 (after the export, for the reader)

signatures = Interpreter(model_path=path).get_signature_list()
print(f"signatures: {signatures}")
print(f"metadata: {qil_keras.read_metadata(path)}")

# ## Size and latency against the float and post-training int8 files
files = {"float": os.path.join(args.out, "mobilenetv2_float.tflite"),
         "int8 post-training": os.path.join(args.out, "mobilenetv2_int8_ptq.tflite"),
         f"QIL {args.bits}/{args.bits}": path}
with open(files["float"], "wb") as f:
    f.write(qil_keras.convert_float(float_model))
with open(files["int8 post-training"], "wb") as f:
    f.write(qil_keras.convert_int8_ptq(float_model, x_train[:256]))
qil_keras.print_benchmark_table(files, x_test, y_test, out_dir=os.path.join(args.out, "bench"),
                                num_runs=10 if args.quick else 50)
print("Next: copy the file into the app's assets and load it with the signature runner "
      "(docs: Deploying on Android), or measure it on a phone with "
      "`qil-keras bench ... --device adb`.")
