"""
Title: CIFAR-10 ResNet-20: progressive QIL, an integer file, a host benchmark
Description: Train a float ResNet-20 on CIFAR-10, fine-tune it with learned quantization
intervals progressively (float -> 4/4 -> 3/3 -> 2/2; --quick: 4/4 -> 2/2), export each stage as a verified integer
TFLite file, and compare the files' accuracy, size and latency on this machine.

Needs the CIFAR-10 images as a folder or archive laid out split/class/*.jpg (for example
`../shared/data/cifar10-jpg.tar.gz`):

    python examples/cifar10_resnet20.py --data ../shared/data/cifar10-jpg.tar.gz
    python examples/cifar10_resnet20.py --data ... --quick      # a minute: tiny subset, 1 epoch

The full setting trains for hours on a CPU; rerun the same command to resume (the float model
and every finished stage are kept in --out).
"""

import argparse
import os

import numpy as np

import qil_keras
from qil_keras import datasets, keras

# ## Settings
#
# `--quick` shrinks everything so that the whole script runs in about a minute: it shows the
# steps, not the accuracy. The full setting is a reasonable CPU budget, not the paper's.
parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--data", default=os.environ.get("QIL_CIFAR10", "cifar10-jpg.tar.gz"),
                    help="CIFAR-10 as split/class/*.jpg (folder or .tar.gz); a relative name is "
                         "also looked up in $QIL_DATA_DIR")
parser.add_argument("--out", default=os.path.join("runs", "cifar10_resnet20"))
parser.add_argument("--quick", action="store_true", help="tiny subset and one epoch per step")
args = parser.parse_args()

PER_CLASS = (50, 20) if args.quick else (None, None)         # train, test images per class
FLOAT_EPOCHS, STAGE_EPOCHS = (1, 1) if args.quick else (40, 10)
BATCH = 32 if args.quick else 128
keras.utils.set_random_seed(0)
os.makedirs(args.out, exist_ok=True)

# ## Data
#
# `load_image_folder` reads `split/class/*.jpg` from a folder or an archive (extracted once),
# checks every image up front, and gives a batched `tf.data` pipeline with CIFAR-10's
# normalization; `training=True` adds the usual pad-4 random crop and flip.
train, info = datasets.load_image_folder(args.data, "train", training=True, style="cifar",
                                         batch_size=BATCH, limit_per_class=PER_CLASS[0])
test, _ = datasets.load_image_folder(args.data, "test", style="cifar", batch_size=256,
                                     class_names=info.class_names, limit_per_class=PER_CLASS[1])
x_test = np.concatenate([x.numpy() for x, _ in test])
y_test = np.concatenate([y.numpy() for _, y in test])
calibration = next(iter(train))[0].numpy()
print(f"classes: {', '.join(info.class_names)}; {len(x_test)} test images")

# ## The float model
#
# `qil_keras.resnet20` is the CIFAR ResNet-20 (He et al. 2016) with 1x1 projection shortcuts and
# every BatchNorm right after a convolution, so that the export can fold it. SGD with momentum
# and a cosine schedule is the standard recipe.
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
float_model = qil_keras.resnet20(num_classes=10)
float_weights = os.path.join(args.out, "float.weights.h5")
if os.path.exists(float_weights):
    float_model.load_weights(float_weights)
else:
    steps = FLOAT_EPOCHS * len(train)
    float_model.compile(keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, steps),
                                             momentum=0.9, nesterov=True), loss, ["accuracy"])
    float_model.fit(train, epochs=FLOAT_EPOCHS, verbose=2)
    float_model.save_weights(float_weights)
float_model.compile(loss=loss, metrics=["accuracy"])
print(f"float ResNet-20: {100 * float_model.evaluate(x_test, y_test, verbose=0)[1]:.2f} % top-1")

# ## Progressive QIL fine-tuning
#
# One `fit` per stage, each starting from the previous stage's weights and intervals. The
# first and last layers stay at 8 bits. Each stage's `fit` ends by re-estimating the BatchNorm
# statistics and snapping the model onto the integer grid of its file, so the accuracy printed
# after each stage is the accuracy the exported file has. With `checkpoint_dir`, rerunning the
# script loads the finished stages instead of training them again.
BITS = (4, 2) if args.quick else (4, 3, 2)
stages = [qil_keras.Stage(bits, bits, epochs=STAGE_EPOCHS) for bits in BITS]
result = qil_keras.progressive_fit(
    float_model, train, stages=stages, validation_data=(x_test, y_test),
    optimizer=lambda index, stage: keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(1e-3, stage.epochs * len(train))),
    calibration_data=calibration, checkpoint_dir=os.path.join(args.out, "stages"), verbose=2)

# ## Export: one verified integer file per stage
#
# `export_tflite` writes int8 activations and INT8 weights (XNNPACK runs every op), runs the
# file on the test images and compares it with the Keras model; a file that disagrees is an
# error, not a warning. The report shows the agreement and each layer's integers.
files = {"float": os.path.join(args.out, "float.tflite"),
         "int8 post-training": os.path.join(args.out, "int8_ptq.tflite")}
with open(files["float"], "wb") as f:
    f.write(qil_keras.convert_float(float_model))
with open(files["int8 post-training"], "wb") as f:
    f.write(qil_keras.convert_int8_ptq(float_model, calibration))
for stage, model in zip(result.stages, result.models):
    name = f"QIL {stage.w_bits}/{stage.a_bits}"
    files[name] = os.path.join(args.out, f"qil_{stage.w_bits}w{stage.a_bits}a.tflite")
    report = qil_keras.export_tflite(model, files[name], validation_data=(x_test, y_test),
                                     class_names=info.class_names)
    print(f"\n{name}: {report.size_bytes:,} bytes, top-1 agreement with Keras "
          f"{100 * report.agreement:.2f} %, Keras {100 * report.keras_accuracy:.2f} %, "
          f"file {100 * report.tflite_accuracy:.2f} %")

# ## Host benchmark
#
# Accuracy, agreement with the float file, batch-1 latency and size of every file, with the
# LiteRT interpreter on this machine (one thread). The same table for a phone comes from
# `qil-keras bench ... --device adb` (see the docs' Android page).
qil_keras.print_benchmark_table(files, x_test, y_test, out_dir=os.path.join(args.out, "bench"),
                                num_runs=10 if args.quick else 50)
