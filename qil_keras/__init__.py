"""qil_keras: QIL (Quantization Interval Learning) for tf-keras, to integer TFLite.

QIL (Jung et al., CVPR 2019, arXiv:1808.05779) learns, per layer, the interval
of weights and activations that a low-bit quantizer keeps, jointly with the
network, by the task loss.

Public API::

    qil_keras.quantize(model, w_bits, a_bits, ...)   # float model -> QIL model
    qil_keras.set_bits(model, w_bits, a_bits)         # change bits, keep intervals
    qil_keras.quantized_weights(model)                # integer levels and scales
    qil_keras.QILConv2D / QILDepthwiseConv2D / QILDense / QILActivation / QILReLU / FakeQuant8 / SwishInt8
    qil_keras.QILWeightQuantizer / QILActivationQuantizer   # tfmot Quantizers
    qil_keras.QILQuantizeConfig, qil_keras.quantize_scope   # tfmot QuantizeConfig path
    qil_keras.progressive_fit(float_model, x, y, stages=[(4, 4), (2, 2)], ...)
    qil_keras.resnet18 / resnet34 / alexnet / resnet20 / small_cnn   # model builders
    qil_keras.export_tflite(qil_model, "m.tflite", validation_data=(x, y))  # integer TFLite
    qil_keras.benchmark_models(["m.tflite", ...], (x, y))   # host / adb harness

Layout (each subpackage's docstring says what it owns and what it may import):
``quantization`` (maths, quantizers, layers, ``quantize``), ``training`` (model classes,
BatchNorm, optimizers, schedules, analysis), ``integer`` (lowering, snap, export, integer
reference), ``deployment`` (host and adb harness), ``data``; ``models`` (builders), ``cli`` and
``_keras`` (the one module that picks tf-keras) sit at the top. The flat module paths of
earlier versions (``qil_keras.layers``, ``qil_keras.export``...) remain importable.
"""

import sys as _sys

from ._keras import keras
from . import models
from .data import datasets
from .deployment import adb, harness
from .deployment.adb import AdbBackend, AdbError
from .deployment.harness import (BenchmarkResult, ModelResult, benchmark_models,
                                 print_benchmark_table, write_results)
from .integer.export import (ExportError, ExportReport, ExportVerificationError, convert_float,
                             convert_int8_ptq, export_tflite, size_table)
from .integer.divergence import Divergence, TensorDivergence, divergence_profile, first_divergence
from .integer.integer_reference import (IntegerReference, UnsupportedOpError,
                                        compare_outputs_with_xnnpack, compare_with_interpreter,
                                        kernel_differences)
from .integer.snap import SnapReport, snap_to_integer
from .integer.tflite_metadata import read_metadata
from .models import alexnet, resnet18, resnet20, resnet34, small_cnn, small_mobilenet
from .quantization import ops
from .quantization.from_tfmot import TfmotConversionError, from_tfmot
from .quantization.inspection import QuantizedWeights, quantized_weights
from .quantization.layers import (FakeQuant8, QILActivation, QILConv2D, QILDense,
                                  QILDepthwiseConv2D, QILReLU, SwishInt8)
from .quantization.quantize import LAYER_ROLES, quantize, set_bits
from .quantization.quantizers import QILActivationQuantizer, QILWeightQuantizer
from .quantization.report import QuantizationReport, ReportRow
from .quantization.tfmot_config import (QILQuantizeConfig, initialize_intervals, quantize_apply,
                                        quantize_scope)
from .training import analysis
from .training.analysis import (IntervalHistory, IntervalThresholds, PruningRatios,
                                interval_thresholds, plot_activation_histograms,
                                plot_interval_history, plot_pruning_ratios,
                                plot_weight_histograms, pruning_ratios, save_analysis)
from .training.batchnorm import (BatchNormReestimation, QILBatchNormalization,
                                 reestimate_batchnorm, restart_batchnorm_statistics)
from .training.distill import quantize_with_distillation
from .training.model import QILModel, QILSequential
from .training.optimizers import (IntervalOptimizer, ScaledSchedule, attach_interval_variables,
                                  build_optimizer, interval_variables, qil_optimizer)
from .training.progressive import ProgressiveResult, Stage, move_to_stage, progressive_fit


def _keep_old_module_paths():
    """The modules lived flat in ``qil_keras/`` before the subpackages; their old paths
    (``qil_keras.layers``, ``qil_keras.export``...) stay importable as aliases."""
    import importlib

    moved = {
        "quantization": ("ops", "quantizers", "layers", "init", "quantize", "report",
                         "inspection", "tfmot_config", "from_tfmot"),
        "training": ("model", "batchnorm", "optimizers", "progressive", "distill", "analysis"),
        "integer": ("lowering", "snap", "ties", "export", "integer_reference", "tflite_inspect",
                    "tflite_metadata"),
        "deployment": ("harness", "adb", "bench_cli", "provenance"),
        "data": ("datasets",),
    }
    package = _sys.modules[__name__]
    for subpackage, names in moved.items():
        for name in names:
            module = importlib.import_module(f"{__name__}.{subpackage}.{name}")
            _sys.modules.setdefault(f"{__name__}.{name}", module)
            if not hasattr(package, name):
                setattr(package, name, module)


_keep_old_module_paths()

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "set_bits",
    "quantized_weights",
    "QuantizedWeights",
    "QuantizationReport",
    "ReportRow",
    "LAYER_ROLES",
    "QILConv2D",
    "QILDepthwiseConv2D",
    "QILDense",
    "QILActivation",
    "QILReLU",
    "FakeQuant8",
    "SwishInt8",
    "QILBatchNormalization",
    "restart_batchnorm_statistics",
    "reestimate_batchnorm",
    "BatchNormReestimation",
    "QILModel",
    "QILSequential",
    "QILWeightQuantizer",
    "QILActivationQuantizer",
    "QILQuantizeConfig",
    "quantize_scope",
    "quantize_apply",
    "initialize_intervals",
    "progressive_fit",
    "move_to_stage",
    "IntervalOptimizer",
    "ScaledSchedule",
    "interval_variables",
    "qil_optimizer",
    "attach_interval_variables",
    "build_optimizer",
    "datasets",
    "Stage",
    "ProgressiveResult",
    "quantize_with_distillation",
    "pruning_ratios",
    "interval_thresholds",
    "PruningRatios",
    "IntervalThresholds",
    "IntervalHistory",
    "plot_weight_histograms",
    "plot_activation_histograms",
    "plot_pruning_ratios",
    "plot_interval_history",
    "save_analysis",
    "analysis",
    "models",
    "small_cnn",
    "small_mobilenet",
    "resnet20",
    "resnet18",
    "resnet34",
    "alexnet",
    "ops",
    "keras",
    "export_tflite",
    "from_tfmot",
    "TfmotConversionError",
    "ExportReport",
    "ExportError",
    "ExportVerificationError",
    "convert_float",
    "convert_int8_ptq",
    "size_table",
    "IntegerReference",
    "UnsupportedOpError",
    "compare_with_interpreter",
    "compare_outputs_with_xnnpack",
    "kernel_differences",
    "first_divergence",
    "Divergence",
    "divergence_profile",
    "TensorDivergence",
    "read_metadata",
    "snap_to_integer",
    "SnapReport",
    "benchmark_models",
    "print_benchmark_table",
    "write_results",
    "BenchmarkResult",
    "ModelResult",
    "AdbBackend",
    "AdbError",
    "harness",
    "adb",
]
