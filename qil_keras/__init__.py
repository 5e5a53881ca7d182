"""qil_keras: QIL (Quantization Interval Learning) for tf-keras, to integer TFLite."""
from . import ops
from ._keras import keras
from .layers import FakeQuant8, QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D
from .quantizers import QILActivationQuantizer, QILWeightQuantizer

__version__ = "0.1.0"
