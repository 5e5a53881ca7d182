"""``qil_keras.export_tflite``: a QIL model as a fully integer ``.tflite`` file, verified.

Pipeline: ``qil_keras.lowering.lower`` writes the inference graph (BN
folded, learned grids as FakeQuant ranges), ``tf.lite.TFLiteConverter``
makes it integer (int8 activations, INT4/INT8 weights, int32 biases), the
weight integers are read back from the flatbuffer
(``qil_keras.tflite_inspect``), the file is run with the LiteRT
interpreter on the given data and compared with the Keras model, and a
``qil_keras`` metadata record (``qil_keras.tflite_metadata``) is stored
in the file. A file that disagrees with its Keras model raises
``ExportVerificationError``.
"""

import dataclasses
import gzip
import os
import warnings

import numpy as np

from .._keras import check_model, keras, quiet_native_logs, tf
from ..quantization.layers import FakeQuant8, QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D
from ..deployment.harness import dequantize_output, quantize_input, tensor_spec
from .divergence import first_divergence
from .integer_reference import (UnsupportedOpError, compare_outputs_with_xnnpack,
                                compare_with_interpreter, kernel_differences)
from .lowering import MAX_POOLED_TAPS, LoweringError, input_signature, lower
from ..quantization.quantize import _calibrate, copy_model, untie_inputs
from ..quantization.from_tfmot import TfmotConversionError, from_tfmot, is_tfmot_model
from ..data.checks import require_finite
from .snap import snap_to_integer
from .tflite_inspect import float_compute_ops, weight_tensors
from .tflite_metadata import add_metadata, read_metadata, strip_names

__all__ = ["export_tflite", "ExportReport", "ExportError", "ExportVerificationError",
           "WeightLayerReport", "convert_float", "convert_int8_ptq", "size_table",
           "run_tflite", "DEFAULT_MIN_AGREEMENT"]

# 99.5 %: on 1,000+ images, a sound export disagrees only where two logits tie
# within the 8-bit logit step (measured 99.8-100 % on the test models); a
# broken one (a wrong scale, a missed fold, a lost zero) drops far below.
DEFAULT_MIN_AGREEMENT = 0.995
_STORAGE = ("auto", "int4", "int8")
_RESOLVER_BUILTIN = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
_KERNELS = (None, "xnnpack", "builtin")


class ExportError(ValueError):
    """The model cannot be exported as an exact integer model (the message says why)."""


class ExportVerificationError(ExportError):
    """The exported file disagrees with its Keras model; ``.report`` holds the figures."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class WeightLayerReport:
    """One weight layer as stored in the file, next to the Keras model's figures."""

    layer: str
    op: str
    w_bits: int
    storage: str             # file type: INT4 / INT8
    distinct_values: int     # distinct integers in the file
    zero_fraction: float     # zeros in the file
    keras_zero_fraction: float
    bytes: int               # bytes of the stored weight buffer
    calibrated: bool = False
    rounding: str = "single"     # requantization: "single" (XNNPACK's fp32) or "double" (builtin)


@dataclasses.dataclass
class ExportReport:
    """What ``export_tflite`` wrote and how well it agrees with the Keras model."""

    path: str | None
    num_examples: int
    agreement: float | None          # top-1 agreement with the Keras model
    max_abs_diff: float | None       # max |TFLite - Keras| over the outputs
    output_step: float | None        # scale of the int8 output tensor
    keras_accuracy: float | None
    tflite_accuracy: float | None
    weight_layers: list
    activations: list
    size_bytes: int
    size_gzip_bytes: int
    op_resolver: str
    options: dict
    model_bytes: bytes = dataclasses.field(repr=False, default=b"")
    snap: dict | None = None   # what snap_to_integer moved, and agreement before it
    # The builtin kernels against qil_keras.IntegerReference on every tensor (verify=True)
    integer_reference: str | None = None
    # The file under the default XNNPACK delegate against IntegerReference(kernels="xnnpack"),
    # outputs only (verify=True, not for sparse files)
    xnnpack_reference: str | None = None
    # The kernel sets ("builtin", "xnnpack") under which the file equals the reference exactly
    references_exact: tuple = ()
    # Ops whose builtin and XNNPACK arithmetic give different values from the same inputs
    # (qil_keras.kernel_differences): [(op index, op, values differing, values, max levels)]
    kernel_differences: list | None = None
    # Where the file and the Keras model part (qil_keras.first_divergence), when the
    # verification refuses the file
    first_divergence: str | None = None
    # Set where agreement fell below min_agreement by rounding at level boundaries only, in a
    # file equal to the integer reference (the export then does not raise; see _verify)
    agreement_note: str | None = None
    # The Keras model the file was made from: with snap, a snapped copy of the caller's model
    # (which export_tflite leaves unchanged); it computes what the file computes.
    keras_model: object = dataclasses.field(repr=False, default=None, compare=False)

    @property
    def max_abs_diff_steps(self):
        if self.max_abs_diff is None or not self.output_step:
            return None
        return self.max_abs_diff / self.output_step

    def to_dict(self):
        # asdict deep-copies every field: leave the file and the Keras model out first
        d = dataclasses.asdict(dataclasses.replace(self, model_bytes=b"", keras_model=None))
        d.pop("model_bytes")
        d.pop("keras_model")
        d["max_abs_diff_steps"] = self.max_abs_diff_steps
        return d

    def table(self):
        """Markdown: the verification summary and one row per weight layer."""
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.2f} %"
        lines = [
            "| check | value |", "|---|---|",
            f"| examples compared | {self.num_examples} |",
            f"| top-1 agreement with Keras | {pct(self.agreement)} |",
            "| max output difference | "
            + ("n/a" if self.max_abs_diff_steps is None
               else f"{self.max_abs_diff_steps:.2f} output steps ({self.max_abs_diff:.3g})") + " |",
        ]
        if self.keras_accuracy is not None:
            lines.append(f"| top-1 accuracy Keras / TFLite | {pct(self.keras_accuracy)} / "
                         f"{pct(self.tflite_accuracy)} |")
        if self.agreement_note is not None:
            lines.append(f"| agreement below the threshold | {self.agreement_note} |")
        if self.integer_reference is not None:
            lines.append(f"| builtin kernels against the integer reference | "
                         f"{self.integer_reference} |")
        if self.xnnpack_reference is not None:
            lines.append(f"| XNNPACK against the integer reference (outputs) | "
                         f"{self.xnnpack_reference} |")
        if self.kernel_differences is not None:
            differing = ", ".join(f"op {i} {op} ({count}/{total}, up to {levels:g} levels)"
                                  for i, op, count, total, levels in self.kernel_differences)
            lines.append(f"| ops where the builtin kernels and XNNPACK differ | "
                         f"{differing or 'none'} |")
        if self.snap is not None:
            before = self.snap.get("agreement_before_snap")
            lines.append(f"| biases snapped to the int32 grid | largest move "
                         f"{self.snap['largest_bias_move_in_units']:.2f} unit; agreement with the "
                         f"model before the snap {pct(before)}; Keras top-1 before the snap "
                         f"{pct(self.snap.get('keras_accuracy_before_snap'))} |")
            moves = self.snap.get("step_moves") or {}
            biases = self.snap.get("bias_tie_moves") or {}
            scales = self.snap.get("scale_moves") or {}
            if scales:
                lines.append(f"| BatchNorm γ moved to rational multipliers (one file for both "
                             f"kernel sets) | {len(scales)} layer(s), largest by "
                             f"{100 * max(scales.values()):.3f} % |")
            if moves or biases or self.snap.get("ties_left"):
                largest = max((abs(f) for f in moves.values()), default=0.0)
                lines.append(
                    f"| sums kept off rounding ties | {len(moves)} QIL step(s) after adds moved "
                    f"(largest by {100 * largest:.4f} %), biases of {len(biases)} layer(s) moved "
                    f"(largest by {max(biases.values(), default=0)} unit(s)); not cleared: "
                    f"{', '.join(self.snap.get('ties_left') or []) or 'none'} |")
            dependent = self.snap.get("kernel_dependent") or {}
            if dependent:
                lines.append(
                    "| guarded layers with kernel-dependent channels | " + ", ".join(
                        f"{name} ({count})" for name, count in dependent.items()) + " |")
        lines += [f"| file size | {self.size_bytes:,} B (gzip {self.size_gzip_bytes:,} B) |",
                  f"| interpreter | {self.op_resolver} |", "",
                  "| layer | op | bits | storage | distinct ints | zeros (file) | zeros (Keras) "
                  "| bytes | rounding |", "|---|---|---|---|---|---|---|---|---|"]
        for w in self.weight_layers:
            bits = f"{w.w_bits}" + (" (calibrated)" if w.calibrated else "")
            lines.append(f"| {w.layer} | {w.op} | {bits} | {w.storage} | {w.distinct_values} | "
                         f"{100 * w.zero_fraction:.1f} % | {100 * w.keras_zero_fraction:.1f} % | "
                         f"{w.bytes:,} | {_rounding_label(w)} |")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def _rounding_label(row):
    return "one rounding" if row.rounding == "single" else "two (builtin kernels), bias offset"


# ---------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------

def _as_arrays(data, limit, where, labels_used=False):
    """``data`` (array, (x, y), or tf.data of x / (x, y) batches) -> (x, y or None), at most ``limit``."""
    if data is None:
        return None, None
    if isinstance(data, tf.data.Dataset):
        xs, ys, n = [], [], 0
        for batch in data:
            x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
            xs.append(np.asarray(x))
            if y is not None:
                ys.append(np.asarray(y))
            n += len(xs[-1])
            if limit and n >= limit:
                break
        x = np.concatenate(xs)
        y = np.concatenate(ys) if ys else None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and np.ndim(data[0]) > 1:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    else:
        x, y = np.asarray(data), None
    if y is not None and labels_used:   # before the limit: a count mismatch is an error
        _check_labels(x, y, where)
    if limit:
        x = x[:limit]
        y = None if y is None else y[:limit]
    if x.size == 0:
        raise ExportError(f"{where} is empty.")
    return require_finite(x.astype(np.float32), where, ExportError), y


def _check_labels(x, y, where):
    """Labels are integer class indices, one per example (top-1 accuracy is scored with them)."""
    if y.ndim > 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise ExportError(
            f"{where}: labels must be integer class indices of shape (N,), got shape "
            f"{y.shape}; for one-hot labels pass y.argmax(axis=1).")
    if len(y) != len(x):
        raise ExportError(f"{where}: {len(x)} inputs but {len(y)} labels; pass (x, y) with one "
                          "label per input.")


def _check_shape(model, x, where):
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(x.shape[1:]) != expected:
        raise ExportError(
            f"{where} has examples of shape {tuple(x.shape[1:])} but the model input expects "
            f"{expected}. Pass a batch of the same preprocessed inputs the model was trained on.")


# ---------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------

def _converter(concrete, module, *, sparse=False, input_type="float32", output_type="float32"):
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if sparse:
        converter.optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    for name, value in (("input", input_type), ("output", output_type)):
        if value not in ("float32", "int8"):
            raise ValueError(f"{name}_type must be 'float32' or 'int8', got {value!r}.")
        if value == "int8":
            setattr(converter, f"inference_{name}_type", tf.int8)
    return converter


def _convert(converter):
    with warnings.catch_warnings():
        # "Statistics for quantized inputs were expected": the FakeQuant ranges are the statistics.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        with quiet_native_logs():  # the converter's C++ log lines; shown if it fails
            return bytes(converter.convert())


def _inference_converter(model):
    """A ``TFLiteConverter`` for ``model(inputs, training=False)``, traced once.

    What ``TFLiteConverter.from_keras_model`` converts, with the same ``serving_default``
    signature (the Keras input and output names as its keys, a dynamic batch), but without
    first writing the whole Keras SavedModel, which traces every layer's call functions (most
    of ``from_keras_model``'s time on MobileNetV2 in a development run). The module holds the model's weights
    as variables, which the converter freezes as it does for a SavedModel; the files differ
    only in the conversion metadata's model type (``tests/integer/test_export.py::
    test_float_and_ptq_files_are_those_of_from_keras_model``)."""
    specs = input_signature(model)
    names = list(model.output_names)

    def inference(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(names, outputs))

    module = tf.Module()
    module.model_weights = list(model.weights)  # saved with the function, then frozen
    # autograph on, as from_keras_model traces: a user's layer may branch on tensors
    module.inference = tf.function(inference, input_signature=specs)
    return tf.lite.TFLiteConverter.from_concrete_functions(
        [module.inference.get_concrete_function()], module)


def convert_float(model):
    """The float32 ``.tflite`` bytes of a float tf-keras model (the size and accuracy baseline)."""
    check_model(model)
    return _convert(_inference_converter(model))


def convert_int8_ptq(model, representative_data, *, num_calibration=256):
    """Post-training full-integer int8 ``.tflite`` bytes of a float tf-keras model.

    The converter's own calibration (``representative_dataset``) on up to
    ``num_calibration`` examples; float input and output.
    """
    check_model(model)
    x, _ = _as_arrays(representative_data, num_calibration, "representative_data")
    converter = _inference_converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i:i + 1]] for i in range(len(x)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return _convert(converter)


def run_tflite(model_bytes, x, *, op_resolver=None, num_threads=1, batch_size=256):
    """Outputs of a ``.tflite`` model on ``x`` (float, or quantized for int8 inputs), dequantized."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if op_resolver is None:
        meta = read_metadata(model_bytes) or {}
        op_resolver = meta.get("interpreter", {}).get("op_resolver", "AUTO")
    interpreter = Interpreter(model_content=bytes(model_bytes), num_threads=num_threads,
                              experimental_op_resolver_type=getattr(OpResolverType, op_resolver))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    outputs, size = [], None
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        if size != len(chunk):
            interpreter.resize_tensor_input(inp["index"], (len(chunk),) + tuple(x.shape[1:]))
            interpreter.allocate_tensors()
            size = len(chunk)
        interpreter.set_tensor(inp["index"], quantize_input(chunk, tensor_spec(inp)))
        interpreter.invoke()
        y = dequantize_output(interpreter.get_tensor(out["index"]), tensor_spec(out))
        outputs.append(np.array(y))
    return np.concatenate(outputs)


def _output_step(model_bytes):
    """Scale of the int8 tensor the model's output is (or is dequantized from)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytes(model_bytes))
    graph = obj.subgraphs[0]
    index = graph.outputs[0]
    for op in graph.operators:
        code = obj.operatorCodes[op.opcodeIndex]
        if index in list(op.outputs) and max(code.builtinCode, code.deprecatedBuiltinCode) == \
                schema.BuiltinOperator.DEQUANTIZE:
            index = op.inputs[0]  # the step of the int8 tensor it dequantizes
    quant = graph.tensors[index].quantization
    if quant is None or quant.scale is None or len(quant.scale) == 0:
        return None
    return float(quant.scale[0])


def _keras_zero_fractions(model):
    fractions = {}
    for layer in model.layers:
        if isinstance(layer, (QILConv2D, QILDense, QILDepthwiseConv2D)):
            fractions[layer.name] = float(np.mean(layer.integer_levels() == 0))
    return fractions


def _measure_float_ranges(model, sources, x):
    """8-bit ranges (min, max) of the given Keras tensors on ``x`` (post-training calibration)."""
    tensors = [s for s in sources if s is not None]
    ranges = {}
    if tensors:
        probe = keras.Model(model.inputs, tensors)
        values = probe.predict(x, verbose=0, batch_size=256)
        values = values if isinstance(values, list) else [values]
        for tensor, value in zip(tensors, values):
            ranges[id(tensor)] = (float(np.min(value)), float(np.max(value)))
    return ranges


def _check_fixed_input(model):
    """The input's shape is known but for the batch: one file, one input shape."""
    shape = tuple(model.inputs[0].shape)
    if None in shape[1:]:
        raise ExportError(
            f"The model input has shape {shape}, with dimensions left unknown: an integer file "
            "is written for one input shape (its pooling, padding and verification depend on "
            "it). Quantize the float model called on an input of fixed shape: inputs = "
            "keras.Input((H, W, C)); qil_keras.quantize(keras.Model(inputs, "
            "float_model(inputs)), ...) (the nested model is inlined), or build it with "
            "input_shape set.")


def _check_exportable(model):
    """QIL layers, one input and output, trained 8-bit ranges (``check_model`` ran already)."""
    if not any(isinstance(layer, (QILConv2D, QILDense, QILDepthwiseConv2D, QILActivation,
                                  FakeQuant8)) for layer in model.layers):
        raise ExportError("This model has no QIL layers. Call qil_keras.quantize(model, ...) "
                          "first, or use qil_keras.convert_int8_ptq for a post-training int8 "
                          "model.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError("export_tflite supports models with one input and one output; "
                          f"this one has {len(model.inputs)} and {len(model.outputs)}.")
    unset = _unset_ranges(model)
    if unset:
        raise ExportError(
            f"FakeQuant8 {unset[0]!r} has no 8-bit range yet (never trained or calibrated)"
            + (f", nor {len(unset) - 1} other(s)" if len(unset) > 1 else "")
            + ". Train the model, pass calibration_data to qil_keras.quantize, or pass "
            "representative_data to export_tflite to measure the ranges on it.")


def _unset_ranges(model):
    """Names of the FakeQuant8 layers whose 8-bit range was never set."""
    return [layer.name for layer in model.layers
            if isinstance(layer, FakeQuant8) and int(layer.num_updates.numpy()) == 0]


def export_tflite(model, path=None, *, representative_data=None, validation_data=None,
                  weight_storage="int8", snap=True, sparse=False, kernels=None,
                  input_type="float32",
                  output_type="float32", calibrate_float=False, verify=True,
                  min_agreement=DEFAULT_MIN_AGREEMENT, max_examples=2000, strip=True,
                  class_names=None, preprocessing=None):
    """Export a QIL model (from ``qil_keras.quantize``) as a fully integer ``.tflite``.

    Args:
      model: the QIL tf-keras model (the ResNet/AlexNet builders' models after
        ``quantize``, or any model ``quantize`` produces), or a tfmot-path
        model with ``qil_keras.tfmot_config.QILQuantizeConfig``, which
        is first copied into native layers (``qil_keras.from_tfmot``;
        the snap and the verification then apply to that copy, and the
        report's ``snap`` says the copy was made).
      path: where to write the file (``None``: only return the bytes in the report).
      representative_data: inputs (array, ``(x, y)``, or a ``tf.data`` of
        batches) for post-training calibration of float leftovers and of
        8-bit ranges that were never trained (on the exported copy; named in
        ``report.options["calibrated_ranges"]``) and, when ``validation_data``
        is not given, for the verification.
      validation_data: ``(x, y)`` or inputs to compare the file with the Keras
        model on (top-1 agreement, output difference, and accuracies when
        labels are given: integer class indices, shape ``(N,)``); at most
        ``max_examples`` are used.
      weight_storage: ``"int8"`` (default: INT8 everywhere; XNNPACK runs every
        op, the fastest file), or ``"int4"`` (INT4 for every layer of ≤ 4
        bits, INT8 above: the smallest file; XNNPACK takes INT4 weights only in
        FULLY_CONNECTED, so INT4 convolutions run on LiteRT's builtin kernels);
        ``"auto"`` is the same as ``"int4"``. The biases are written for the
        rounding of the kernels that run each op (see ``qil_keras.lowering``).
      snap: first move the folded biases and post-add thresholds of a copy
        of the model (by less than half an integer unit) to values the file
        holds exactly (``qil_keras.snap_to_integer``); the caller's model
        is left unchanged; and widen the input quantizer's range by a step or
        two where the data sits on its rounding ties (``qil_keras.quantize.untie_inputs``,
        which ``quantize`` already applies to its calibration data;
        ``report.snap["input_ties"]``). The report gives the moves, the
        agreement with the model before them, and the snapped copy
        (``report.keras_model``), which computes what the file computes.
      sparse: encode weight tensors with ≥ 30 % zeros sparsely
        (``Optimize.EXPERIMENTAL_SPARSITY``); the file then needs the builtin
        kernels without the default XNNPACK delegate, which the metadata says
        (INT8 storage only: the converter cannot sparse-encode INT4 tensors).
      kernels: ``"xnnpack"`` (default without ``sparse``: the interpreter's
        default delegate) or ``"builtin"`` (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``;
        default and required with ``sparse``): the kernels the file is written
        and verified for, recorded in the metadata. They round differently, so
        a file verified for one can disagree slightly under the other.
      input_type, output_type: ``"float32"`` (quantize/dequantize inside the
        model) or ``"int8"``.
      calibrate_float: give tensors and weight layers that have no learned
        8-bit range (float leftovers) a range measured on
        ``representative_data``, instead of refusing the model.
      verify: run the file and compare it with the Keras model (needs data), and
        check every tensor of the file under LiteRT's builtin kernels against
        ``qil_keras.IntegerReference`` on 8 examples (a difference raises
        ``ExportVerificationError`` naming the op; files with ops outside
        the reference say so in ``report.integer_reference``).
      min_agreement: top-1 agreement below which ``ExportVerificationError``
        is raised (default 99.5 %).
      strip: drop tensor names from the file (smaller; names are kept in the
        returned report). The ``serving_default`` signature stays, with the
        Keras input and output names as its keys, for signature runners.
      class_names, preprocessing: stored in the metadata for apps and the
        harness (``preprocessing``: a ``qil_keras.datasets.Preprocessing``
        or a dict with ``scale`` and ``offset``).

    Returns:
      ``ExportReport`` (``report.model_bytes`` holds the file).
    """
    check_model(model)  # tf-keras, Functional or Sequential
    _check_fixed_input(model)
    kernels = _check_options(weight_storage, kernels, sparse)
    x_rep, _ = _as_arrays(representative_data, max_examples, "representative_data")
    x_val, y_val = _as_arrays(validation_data, max_examples, "validation_data", labels_used=True)
    for x, where in ((x_rep, "representative_data"), (x_val, "validation_data")):
        if x is not None:
            _check_shape(model, x, where)
    if x_val is None:
        x_val = x_rep
    if verify and x_val is None:
        raise ExportError("export_tflite verifies the file against the Keras model and needs "
                          "examples: pass representative_data= or validation_data= (or "
                          "verify=False to skip the check).")
    # 1. The model to export: native layers, on a copy whenever something will change it.
    model, converted, calibrated_ranges = _model_to_export(model, x_rep, x_val, snap)
    # 2. The inference graph, with the model snapped onto the file's integer grid.
    graph = _lowered(model, x_rep, x_val, weight_storage=weight_storage, kernels=kernels,
                     calibrate_float=calibrate_float, snap=snap)
    if sparse and any(plan.storage == "int4" for plan in graph.lowering.weight_plans):
        raise ExportError(
            "sparse=True works with INT8 weight storage only (the TFLite converter aborts when "
            "it sparse-encodes INT4 tensors): use weight_storage='int8' with sparse=True, or "
            "INT4 storage without it.")
    # 3. The file: converted, sparse-encoded, stripped, with its metadata record.
    options = dict(weight_storage=weight_storage, snap=bool(snap), sparse=bool(sparse),
                   kernels=kernels, converted_from_tfmot=converted,
                   input_type=input_type,
                   output_type=output_type, calibrate_float=bool(calibrate_float),
                   calibrated_ranges=calibrated_ranges)
    named, final, layers, op_resolver = _file(
        model, graph, options, strip=strip, class_names=class_names,
        preprocessing=preprocessing)
    report = ExportReport(path, 0, None, None, _output_step(named), None, None, layers,
                          graph.lowering.activations, len(final), len(gzip.compress(final)),
                          op_resolver, options, final, keras_model=model)
    if graph.snapped is not None:
        snapped = graph.snapped
        report.snap = dict(largest_bias_move_in_units=snapped.largest_bias_move,
                           threshold_moves=snapped.threshold_moves,
                           not_snapped=snapped.not_snapped,
                           step_moves=snapped.step_moves, near_ties=snapped.near_ties,
                           ties_left=snapped.ties_left, bias_tie_moves=snapped.bias_tie_moves,
                           kernel_dependent=snapped.kernel_dependent,
                           scale_moves=snapped.scale_moves, input_ties=graph.input_moves)
    # 4. The checks: against the Keras model, the integer reference, the dense encoding.
    if verify:
        _verify_file(model, named, final, x_val, y_val, report, graph, min_agreement, sparse)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(final)
    return report


def _check_options(weight_storage, kernels, sparse):
    """Refuse unknown settings; return the kernels the file is written for."""
    if weight_storage not in _STORAGE:
        raise ValueError(f"weight_storage must be one of {_STORAGE}, got {weight_storage!r}.")
    if kernels not in _KERNELS:
        raise ValueError(f"kernels must be 'xnnpack' or 'builtin' (or None), got {kernels!r}.")
    if sparse and kernels == "xnnpack":
        raise ExportError("sparse=True needs kernels='builtin': sparse-encoded int8 weights fail "
                          "to prepare under the XNNPACK delegate.")
    return kernels or ("builtin" if sparse else "xnnpack")


def _model_to_export(model, x_rep, x_val, snap):
    """``(model, converted, calibrated_ranges)``: a tfmot-path model copied into native layers
    (checked against it); otherwise a copy of the caller's model whenever the snap or a
    calibration will change it (the caller's model is never modified), with 8-bit ranges that
    were never trained measured on the representative data."""
    if is_tfmot_model(model):
        try:
            model = from_tfmot(model, calibration_data=x_rep if x_rep is not None else x_val)
        except TfmotConversionError as error:
            raise ExportError(f"tfmot-path model: {error}") from None
        _check_exportable(model)
        return model, True, []
    unset = _unset_ranges(model) if x_rep is not None else []
    if snap or unset:
        model = copy_model(model)
    if unset:
        _calibrate(model, [x_rep], [model.get_layer(name) for name in unset])
    _check_exportable(model)
    return model, False, unset


@dataclasses.dataclass
class _Graph:
    """The lowered inference graph of the model to export, and what the snap did to it."""

    concrete: object
    module: object
    lowering: object
    ranges: dict | None
    snapped: object = None       # SnapReport, when snapped
    before: np.ndarray | None = None   # the model's outputs before the snap
    input_moves: dict = dataclasses.field(default_factory=dict)


def _lowered(model, x_rep, x_val, *, weight_storage, kernels, calibrate_float, snap):
    """Lower ``model`` (measuring 8-bit ranges for float leftovers if ``calibrate_float``), then
    snap it onto the file's integer grid and lower it again. Lowering errors become
    ``ExportError``."""
    try:
        concrete, module, lowering = lower(model, weight_storage=weight_storage, kernels=kernels,
                                           collect_float=calibrate_float)
        ranges = None
        if lowering.float_tensors:
            if x_rep is None and x_val is None:
                raise ExportError("calibrate_float=True needs representative_data to measure "
                                  "8-bit ranges on.")
            ranges = _measure_float_ranges(model, [s for s, _, _ in lowering.float_tensors],
                                           x_rep if x_rep is not None else x_val)
            ranges.update({("weights", w.split("'")[1]): None
                           for s, w, kind in lowering.float_tensors if kind == "weights"})
            concrete, module, lowering = lower(model, weight_storage=weight_storage,
                                               kernels=kernels, float_ranges=ranges)
        graph = _Graph(concrete, module, lowering, ranges)
        if snap:
            graph.before = (model.predict(x_val, verbose=0, batch_size=256)
                            if x_val is not None else None)
            x_ties = x_rep if x_rep is not None else x_val
            graph.input_moves = untie_inputs(model, x_ties) if x_ties is not None else {}
            graph.snapped = snap_to_integer(
                model, weight_storage=weight_storage, float_ranges=ranges, kernels=kernels,
                lowering=None if graph.input_moves else lowering)  # else the input range moved
            graph.concrete, graph.module, graph.lowering = lower(
                model, weight_storage=weight_storage, kernels=kernels, float_ranges=ranges)
    except LoweringError as error:
        raise ExportError(str(error)) from None
    return graph


def _file(model, graph, options, *, strip, class_names, preprocessing):
    """``(named, final, layers, op_resolver)``: the converted file with tensor names, the file
    as written (sparse-encoded, stripped, with the ``qil_keras`` metadata record), the per-layer
    weight report and the op resolver the file needs."""
    input_type, output_type = options["input_type"], options["output_type"]
    sparse, kernels = options["sparse"], options["kernels"]
    named = _convert(_converter(graph.concrete, graph.module, input_type=input_type,
                                output_type=output_type))
    floating = float_compute_ops(named)
    if floating:
        raise ExportError(
            "the converted file is not fully integer: ops "
            + ", ".join(f"{i} ({name})" for i, name in floating[:8])
            + " compute in float32 between its QUANTIZE and its outputs (the converter found "
            "no int8 grid for a tensor the lowering left without one). Please report the model "
            "with qil_report; meanwhile export_tflite has no integer file for it.")
    layers = _weight_report(model, graph.lowering, named)
    final = named
    if sparse:
        final = _convert(_converter(graph.concrete, graph.module, sparse=True,
                                    input_type=input_type, output_type=output_type))
        for row, stored in zip(layers, weight_tensors(final)):
            row.bytes = stored.stored_bytes
    if strip:
        final = strip_names(final)
    op_resolver = _RESOLVER_BUILTIN if kernels == "builtin" else "AUTO"
    record = dict(
        interpreter=dict(op_resolver=op_resolver, reason=(
            "sparse-encoded int8 weights fail to prepare under the default XNNPACK delegate"
            if sparse else "biases written for the rounding of the builtin kernels"
            if kernels == "builtin" else "runs with the default kernels (XNNPACK)")),
        class_names=list(class_names) if class_names is not None else None,
        preprocessing=_preprocessing_dict(preprocessing),
        input=dict(shape=[None] + list(model.inputs[0].shape[1:]), dtype=input_type),
        output=dict(shape=[None] + list(model.outputs[0].shape[1:]), dtype=output_type),
        weight_layers=_table(
            ("name", "op", "w_bits", "storage", "c", "d", "gamma"),
            [(w.layer, w.op, w.w_bits, w.storage, *_interval(model, w.layer)) for w in layers]),
        activations=_table(
            ("name", "a_bits", "c", "d", "step", "levels"),
            [(a["name"], a["a_bits"], a["c"], a["d"], a["step"], a["levels"])
             for a in graph.lowering.activations]),
        options=options, model_name=model.name)
    return named, add_metadata(final, record), layers, op_resolver


def _verify_file(model, named, final, x_val, y_val, report, graph, min_agreement, sparse):
    """Run the file on ``x_val``: agreement with the Keras model (refused below
    ``min_agreement``), every tensor against the integer reference, the sparse encoding
    against the dense one; also the agreement and accuracy the model had before the snap."""
    if graph.snapped is not None:
        got = run_tflite(final, x_val)
        before = graph.before
        report.snap["agreement_before_snap"] = float(np.mean(got.argmax(1) == before.argmax(1))) \
            if before.ndim == 2 and before.shape[1] > 1 else None
        if y_val is not None and before.ndim == 2:
            report.snap["keras_accuracy_before_snap"] = float(
                np.mean(before.argmax(1) == np.asarray(y_val).reshape(-1)))
    # The file against the integer reference of its kernels first: the agreement check below
    # accepts rounding at level boundaries only in a file known to compute what it should.
    _check_integer_references(named, x_val, report, sparse)
    if sparse:  # the sparse encoding must compute exactly what the dense one does
        dense = run_tflite(named, x_val[:256], op_resolver=_RESOLVER_BUILTIN)
        sparse_out = run_tflite(final, x_val[:256])
        if not np.array_equal(dense, sparse_out):
            raise ExportVerificationError(
                "the sparse-encoded file computes different outputs from the dense one", report)
    # where the file parts from Keras is located in the dense file (equal to the sparse one):
    # the integer reference reads dense tensors only
    _verify(model, final, x_val, y_val, report, min_agreement, located_in=named)


def _preprocessing_dict(preprocessing):
    if preprocessing is None:
        return None
    if hasattr(preprocessing, "to_dict"):
        return preprocessing.to_dict()
    return dict(preprocessing)


def _significant(value, digits=6):
    """Floats (or lists of them) rounded to ``digits`` significant digits, for compact JSON."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_significant(v, digits) for v in np.asarray(value).reshape(-1).tolist()]
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.{digits}g}")
    return value


def _table(columns, rows):
    """Compact JSON table: ``{"columns": [...], "rows": [[...], ...]}`` (metadata stays small)."""
    return {"columns": list(columns), "rows": [[_significant(v) for v in row] for row in rows]}


def _interval(model, name):
    """The learned ``(c, d, γ)`` of a QIL weight layer (lists when per channel), or Nones."""
    try:
        variables = getattr(model.get_layer(name), "kernel_quantizer_vars", None)
    except ValueError:
        variables = None
    if not variables:
        return (None, None, None)
    return tuple(np.asarray(variables[key].numpy()) for key in ("c", "d", "gamma"))


def _channel_shape(per_channel, plan):
    if plan.op == "DEPTHWISE_CONV_2D":
        return per_channel.reshape(plan.levels.shape[-2:])
    return per_channel.reshape((1,) * (plan.levels.ndim - 1) + (-1,))


def _weight_report(model, lowering, model_bytes):
    stored = weight_tensors(model_bytes)
    keras_zeros = _keras_zero_fractions(model)
    # The lowering emits each layer's ops under the name scope "<layer name>/"; layer names may
    # hold "/" themselves (every tf-keras MobileNetV3 layer does): the longest name that
    # prefixes a tensor's scope owns it.
    names = sorted((plan.name for plan in lowering.weight_plans), key=len, reverse=True)
    by_name = {}
    for tensor in stored:
        scope = tensor.output_name.split(";")[0]
        owner = next((name for name in names if scope.startswith(name + "/")), None)
        if owner is not None:
            by_name.setdefault(owner, tensor)
    rows = []
    for plan in lowering.weight_plans:
        tensor = by_name.get(plan.name)
        if tensor is None:
            raise ExportError(f"weight layer {plan.name!r} was not found in the converted file "
                              f"(ops: {[t.output_name for t in stored]}).")
        # Levels in the file must be exactly the folded Keras levels (sign-flipped
        # per channel where the BN scale is negative); a depthwise kernel is
        # stored as (1, kh, kw, channels) and a dense one as (out, in).
        expected = plan.levels * _channel_shape(plan.multiplier, plan)
        if plan.op == "DEPTHWISE_CONV_2D":
            expected = expected.reshape((1,) + expected.shape[:2] + (-1,))
        elif plan.op == "FULLY_CONNECTED" and tensor.op == "FULLY_CONNECTED":
            expected = expected.T
        else:
            expected = np.moveaxis(expected.reshape((1, 1) * (expected.ndim == 2)
                                                    + expected.shape), -1, 0)
        if (tensor.values is None or tensor.values.shape != expected.shape
                or not np.array_equal(tensor.values, expected)):
            raise ExportError(
                f"weight layer {plan.name!r}: the integers in the file differ from the Keras "
                "model's levels (the converter did not keep the grid).")
        rows.append(WeightLayerReport(
            plan.name, tensor.op, plan.w_bits, tensor.dtype, tensor.distinct_values,
            tensor.zero_fraction, keras_zeros.get(plan.name, tensor.zero_fraction),
            tensor.stored_bytes, plan.calibrated, plan.rounding))
    return rows


_REFERENCE_EXAMPLES = 8
_XNNPACK_EXAMPLES = 32   # outputs only: the delegate keeps no intermediate tensors


def _check_reference(field, kernels, compare, model_bytes, x, report, what, hint):
    """``compare(model_bytes, x)`` (a ``TensorComparison`` against the integer reference)
    into ``report.<field>``; a difference is an error naming the op. False where the
    reference does not compute one of the file's ops (the report says so)."""
    try:
        comparison = compare(model_bytes, x)
    except UnsupportedOpError as error:
        setattr(report, field, f"not checked: {error}")
        return False
    setattr(report, field, comparison.message())
    if not comparison.exact:
        raise ExportVerificationError(
            f"{what} and the integer reference disagree: {comparison.message()}. {hint}", report)
    report.references_exact += (kernels,)
    return True


def _check_integer_references(model_bytes, x, report, sparse):
    """Every tensor of the file under LiteRT's builtin kernels, and its outputs under the
    default XNNPACK delegate (not for sparse files, which XNNPACK does not load), against
    the integer reference of each; then the ops whose two kernel sets disagree on the same
    inputs (reported: the file is kernel-dependent there)."""
    _check_reference("integer_reference", "builtin", compare_with_interpreter, model_bytes,
                     x[:_REFERENCE_EXAMPLES], report, "the file's builtin kernels",
                     "This is a bug in qil_keras' model of the kernels or in the converter; "
                     "please report it with the model summary.")
    if not sparse and _check_reference(
            "xnnpack_reference", "xnnpack", compare_outputs_with_xnnpack, model_bytes,
            x[:_XNNPACK_EXAMPLES], report, "the file under XNNPACK",
            "This is a gap in qil_keras' model of XNNPACK (or an XNNPACK version it was not "
            "measured on); please report it with the model summary and `pip show "
            "ai-edge-litert`."):
        report.kernel_differences = kernel_differences(model_bytes, x[:_REFERENCE_EXAMPLES])


def _verify(model, model_bytes, x, y, report, min_agreement, located_in=None):
    expected = model.predict(x, verbose=0, batch_size=256)
    got = run_tflite(model_bytes, x)
    report.num_examples = len(x)
    report.max_abs_diff = float(np.max(np.abs(got - expected)))
    if expected.ndim == 2 and expected.shape[1] > 1:
        report.agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
        if y is not None:
            labels = np.asarray(y).reshape(-1)
            report.keras_accuracy = float(np.mean(expected.argmax(1) == labels))
            report.tflite_accuracy = float(np.mean(got.argmax(1) == labels))
    for row in report.weight_layers:
        if abs(row.zero_fraction - row.keras_zero_fraction) > 0 and not row.calibrated:
            raise ExportVerificationError(
                f"layer {row.layer!r}: {100 * row.zero_fraction:.2f} % zeros in the file against "
                f"{100 * row.keras_zero_fraction:.2f} % in the Keras model.", report)
    if report.agreement is not None and report.agreement < min_agreement:
        parted = np.flatnonzero(got.argmax(1) != expected.argmax(1))[:_DIVERGENCE_EXAMPLES]
        found = (_divergence(model, located_in or model_bytes, x[parted], report)
                 if len(parted) else None)
        if found is not None and _boundary_rounding(found, report):
            report.agreement_note = (
                f"top-1 agreement {100 * report.agreement:.2f} % is below "
                f"{100 * min_agreement:.1f} % because Keras' float32 arithmetic rounds values at "
                f"level boundaries the other way ({found.message()}); the file equals the "
                "integer reference of its kernels, so its accuracy is the deployed one")
            return
        where = report.first_divergence   # set by _divergence; None when nothing parted
        if (found is not None and found.op in _BUILTIN_OWN_ROUNDING
                and report.op_resolver == _RESOLVER_BUILTIN):
            advice = (f"The builtin kernels round {found.op} their own way (fixed point, two "
                      "roundings), which Keras' float32 graph does not follow: a known kernel "
                      "difference (docs/export.md, 'Known gaps'), not a wrong file. Export for "
                      "XNNPACK (the default, without sparse=True, whose files run on the builtin "
                      "kernels) where the app runs it, or lower min_agreement if you accept the "
                      "difference."
                      + (" A global average pool over more than "
                         f"{MAX_POOLED_TAPS} positions stays a MEAN in files for the builtin "
                         "kernels (smaller ones become a depthwise conv that follows Keras)."
                         if found.op == "MEAN" else ""))
        else:
            advice = ("This is a bug or an unsupported pattern: please report it with the "
                      "model summary. Lower min_agreement only if you accept the difference.")
        raise ExportVerificationError(
            f"the exported model agrees with the Keras model on only "
            f"{100 * report.agreement:.2f} % of {len(x)} examples (required: "
            f"{100 * min_agreement:.1f} %; max output difference {report.max_abs_diff:.4g}). "
            + (f"On the examples where they part, {where}. " if where else "") + advice, report)


# Ops whose builtin int8 kernels requantize in a way no Keras parameter reproduces (docs/export.md,
# 'Known gaps'): where a builtin-kernel file first parts from Keras at one of them, the
# verification error says so instead of asking for a bug report.
_BUILTIN_OWN_ROUNDING = ("MEAN", "MUL", "LEAKY_RELU")


_DIVERGENCE_EXAMPLES = 16


def _divergence(model, model_bytes, x, report):
    """``first_divergence`` of the file (with the arithmetic of the kernels it was verified
    under) on ``x``; its message is stored in ``report.first_divergence``."""
    kernels = "builtin" if report.op_resolver == _RESOLVER_BUILTIN else "xnnpack"
    try:
        found = first_divergence(model, model_bytes, x, kernels=kernels,
                                 boundary_distances=True)
    except UnsupportedOpError as error:
        report.first_divergence = f"not located: {error}"
        return None
    report.first_divergence = (found.message() if found else
                               "no quantized tensor differs; the outputs part after the last")
    return found


# Where Keras and the file part by rounding only: one level, on at most this share of the
# first differing tensor's values (a wrong lowering moves many values, or by more than a level)
_BOUNDARY_SHARE = 1e-3


def _boundary_rounding(found, report):
    """Do Keras and the file part by float32 rounding at level boundaries, in a file checked
    against the integer reference of the kernels it ran on (REFERENCE §5: a wrong lowering
    differs on many values, rounding on boundary values)?

    By one level, and either on at most ``_BOUNDARY_SHARE`` of the tensor's values or, where
    the Keras values that differ were measured (a ``FakeQuant8`` tensor), with every one of
    them within ``NEAR_BOUNDARY`` steps of a rounding boundary: a small tensor (a
    squeeze-excite MEAN has one value per channel) exceeds the share with one value per
    example, and a wrong lowering moves values that lie far from boundaries (a bias a fraction
    of a step off, found on DenseNet121 at 2/2 in a development run, moved values that lay
    well inside their levels)."""
    if found.kernels not in report.references_exact or found.max_levels > 1:
        return False
    all_near = found.near_boundary is not None and found.near_boundary == found.values
    return found.values <= _BOUNDARY_SHARE * found.total or all_near


def size_table(qil_model, representative_data, *, float_model=None, variants=None):
    """Raw and gzip sizes of the float, post-training int8 and QIL files of a network.

    ``float_model`` (default: none, rows skipped) gives the float and PTQ int8
    rows; QIL rows cover ``variants``: ``(weight_storage, sparse)`` pairs
    (default: int8, int4 (auto), int8 + sparse). Returns a list of dicts
    ``{"model", "bytes", "gzip_bytes", "ratio_to_float"}``.
    """
    rows = []
    if float_model is not None:
        rows.append(("float32", convert_float(float_model)))
        rows.append(("int8 post-training", convert_int8_ptq(float_model, representative_data)))
    for storage, sparse in variants or (("int8", False), ("auto", False), ("int8", True)):
        report = export_tflite(qil_model, representative_data=representative_data,
                               weight_storage=storage, sparse=sparse, verify=False, snap=False)
        label = f"QIL {'int4' if storage == 'auto' else storage} weights" + (
            " + sparse" if sparse else "")
        rows.append((label, report.model_bytes))
    base = len(rows[0][1]) if float_model is not None else None
    return [dict(model=label, bytes=len(data), gzip_bytes=len(gzip.compress(data)),
                 ratio_to_float=(len(data) / base if base else None)) for label, data in rows]


def size_markdown(rows):
    """Markdown table of ``size_table`` rows."""
    lines = ["| file | bytes | gzip bytes | × float |", "|---|---|---|---|"]
    for row in rows:
        ratio = "" if row["ratio_to_float"] is None else f"{row['ratio_to_float']:.3f}"
        lines.append(f"| {row['model']} | {row['bytes']:,} | {row['gzip_bytes']:,} | {ratio} |")
    return "\n".join(lines)
