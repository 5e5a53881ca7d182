"""qil_keras: QIL (Quantization Interval Learning) for tf-keras, to integer TFLite.

QIL (Jung et al., CVPR 2019, arXiv:1808.05779) learns, per layer, the interval
of weights and activations that a low-bit quantizer keeps, jointly with the
network, by the task loss.

Public API::

    qil_keras.quantize(model, w_bits, a_bits, ...)   # float model -> QIL model
    qil_keras.set_bits(model, w_bits, a_bits)         # change bits, keep intervals
    qil_keras.quantized_weights(model)                # integer levels and scales
    qil_keras.QILConv2D / QILDepthwiseConv2D / QILDense / QILActivation / FakeQuant8
    qil_keras.QILWeightQuantizer / QILActivationQuantizer   # tfmot Quantizers
    qil_keras.QILQuantizeConfig, qil_keras.quantize_scope   # tfmot QuantizeConfig path
"""

from . import ops
from ._keras import keras
from .inspection import QuantizedWeights, quantized_weights
from .layers import FakeQuant8, QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D
from .quantize import LAYER_ROLES, quantize, set_bits
from .quantizers import QILActivationQuantizer, QILWeightQuantizer
from .report import QuantizationReport, ReportRow

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
    "QILWeightQuantizer",
    "QILActivationQuantizer",
    "ops",
    "keras",
]
