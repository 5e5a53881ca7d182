"""``qil_keras.tflite_inspect``: read a ``.tflite`` file's weight integers through the LiteRT schema.

The interpreter's ``get_tensor_details()`` reports INT4 tensors as int8 and
cannot show how they are stored, so the exporter's checks read the
flatbuffer itself (``ai_edge_litert.schema_py_generated``): each CONV_2D,
DEPTHWISE_CONV_2D and FULLY_CONNECTED op's weight tensor, its true type, its
buffer (INT4 packs two values per byte, the first in the low nibble), its
per-channel scales and zero points, and its sparsity encoding if any.
"""

import dataclasses

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

__all__ = ["WeightTensor", "weight_tensors", "operator_names", "unpack_int4",
           "float_compute_ops"]

_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_FLOAT32 = schema.TensorType.FLOAT32


@dataclasses.dataclass
class WeightTensor:
    """One weight tensor as stored in the file."""

    op_index: int
    op: str                 # CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED
    output_name: str        # name of the op's output tensor ("" if names were stripped)
    dtype: str              # schema type: INT4, INT8, FLOAT32...
    shape: tuple
    stored_bytes: int       # bytes of the buffer (packed / sparse-encoded as stored)
    values: np.ndarray      # the integers (dense, tensor shape); None if sparse-encoded
    scales: np.ndarray
    zero_points: np.ndarray
    sparse: bool

    @property
    def distinct_values(self):
        return None if self.values is None else int(np.unique(self.values).size)

    @property
    def zero_fraction(self):
        return None if self.values is None else float(np.mean(self.values == 0))


def unpack_int4(data, count):
    """Signed 4-bit values packed two per byte (low nibble first) -> int8 array of ``count``."""
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    nibbles = np.empty(raw.size * 2, dtype=np.int16)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    nibbles = nibbles[:count]
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def _op_name(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    return _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


def _name(tensor):
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else (name or "")


def _decode(model, tensor):
    dtype = _TYPE_NAMES.get(tensor.type, str(tensor.type))
    shape = tuple(int(n) for n in tensor.shape)
    data = model.buffers[tensor.buffer].data
    data = b"" if data is None else bytes(bytearray(data))
    sparse = tensor.sparsity is not None
    count = int(np.prod(shape))
    values = None
    if not sparse and data:
        if dtype == "INT4":
            values = unpack_int4(data, count).reshape(shape)
        elif dtype == "INT8":
            values = np.frombuffer(data, np.int8).reshape(shape)
        elif dtype == "FLOAT32":
            values = np.frombuffer(data, np.float32).reshape(shape)
    quant = tensor.quantization
    scales = np.asarray(quant.scale if quant is not None and quant.scale is not None else [])
    zeros = np.asarray(quant.zeroPoint if quant is not None and quant.zeroPoint is not None
                       else [])
    return dtype, shape, len(data), values, scales, zeros, sparse


def operator_names(model_bytes):
    """Builtin op names of the main subgraph, in execution order."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytes(model_bytes))
    return [_op_name(model, op) for op in model.subgraphs[0].operators]


def float_compute_ops(model_bytes):
    """``[(op_index, op_name)]`` of the ops that compute in float32 between the file's first
    QUANTIZE and its outputs: what a fully integer file has none of (float preprocessing before
    the QUANTIZE and DEQUANTIZE ops that write a graph output are allowed)."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytes(model_bytes))
    graph = model.subgraphs[0]
    outputs = {int(i) for i in graph.outputs}
    found = []
    # an integer input (input_type="int8") has no QUANTIZE: every op then counts
    quantized = all(graph.tensors[int(t)].type != _FLOAT32 for t in graph.inputs)
    for index, op in enumerate(graph.operators):
        name = _op_name(model, op)
        if name == "QUANTIZE" and not quantized:
            quantized = True
            continue
        if not quantized:
            continue
        writes_float = any(graph.tensors[int(t)].type == _FLOAT32 for t in op.outputs)
        if writes_float and not (name == "DEQUANTIZE" and
                                 all(int(t) in outputs for t in op.outputs)):
            found.append((index, name))
    return found


def weight_tensors(model_bytes):
    """Every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED weight tensor, in op order."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytes(model_bytes))
    graph = model.subgraphs[0]
    found = []
    for index, op in enumerate(graph.operators):
        name = _op_name(model, op)
        if name not in _WEIGHT_OPS:
            continue
        weight_index = op.inputs[1]
        producer = next((other for other in graph.operators
                         if weight_index in list(other.outputs)), None)
        if producer is not None and _op_name(model, producer) == "DENSIFY":
            weight_index = producer.inputs[0]  # sparse-encoded constant, densified at load
        weight = graph.tensors[weight_index]
        dtype, shape, nbytes, values, scales, zeros, sparse = _decode(model, weight)
        found.append(WeightTensor(index, name, _name(graph.tensors[op.outputs[0]]), dtype, shape,
                                  nbytes, values, scales, zeros, sparse))
    return found
