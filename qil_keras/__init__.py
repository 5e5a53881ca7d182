"""qil_keras: QIL (Quantization Interval Learning) for tf-keras, to integer TFLite.

QIL (Jung et al., CVPR 2019, arXiv:1808.05779) learns, per layer, the interval
of weights and activations that a low-bit quantizer keeps, jointly with the
network, by the task loss.

Public API::

    qil_keras.quantize(model, w_bits, a_bits, ...)   # float model -> QIL model
    qil_keras.set_bits(model, w_bits, a_bits)         # change bits, keep intervals
    qil_keras.quantized_weights(model)                # integer levels and scales
    qil_keras.QILConv2D / QILDepthwiseConv2D / QILDense / QILActivation / FakeQuant8 / SwishInt8
    qil_keras.QILWeightQuantizer / QILActivationQuantizer   # tfmot Quantizers
    qil_keras.QILQuantizeConfig, qil_keras.quantize_scope   # tfmot QuantizeConfig path
    qil_keras.progressive_fit(float_model, x, y, stages=[(4, 4), (2, 2)], ...)
    qil_keras.resnet18 / resnet34 / alexnet / resnet20 / small_cnn   # model builders
    qil_keras.export_tflite(qil_model, "m.tflite", validation_data=(x, y))  # integer TFLite
    qil_keras.benchmark_models(["m.tflite", ...], (x, y))   # host / adb harness
"""

from . import analysis, datasets, models, ops
from ._keras import keras
from .analysis import (IntervalHistory, IntervalThresholds, PruningRatios, interval_thresholds,
                       plot_activation_histograms, plot_interval_history, plot_pruning_ratios,
                       plot_weight_histograms, pruning_ratios, save_analysis)
from .batchnorm import (BatchNormReestimation, QILBatchNormalization, reestimate_batchnorm,
                        restart_batchnorm_statistics)
from .model import QILModel, QILSequential
from .distill import quantize_with_distillation
from .inspection import QuantizedWeights, quantized_weights
from .layers import FakeQuant8, QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D, SwishInt8
from .models import alexnet, resnet18, resnet20, resnet34, small_cnn, small_mobilenet
from .optimizers import (IntervalOptimizer, ScaledSchedule, attach_interval_variables,
                         build_optimizer, interval_variables, qil_optimizer)
from .progressive import ProgressiveResult, Stage, move_to_stage, progressive_fit
from .quantize import LAYER_ROLES, quantize, set_bits
from .quantizers import QILActivationQuantizer, QILWeightQuantizer
from .report import QuantizationReport, ReportRow
from . import adb, harness
from .adb import AdbBackend, AdbError
from .export import (ExportError, ExportReport, ExportVerificationError, convert_float,
                     convert_int8_ptq, export_tflite, size_table)
from .integer_reference import IntegerReference, compare_with_interpreter
from .harness import (BenchmarkResult, ModelResult, benchmark_models, print_benchmark_table,
                      write_results)
from .from_tfmot import TfmotConversionError, from_tfmot
from .snap import SnapReport, snap_to_integer
from .tflite_metadata import read_metadata
from .tfmot_config import QILQuantizeConfig, initialize_intervals, quantize_apply, quantize_scope

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
    "compare_with_interpreter",
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
