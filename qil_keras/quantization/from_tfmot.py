"""``qil_keras.from_tfmot``: a tfmot-path QIL model as the native model the export reads.

A model built with ``qil_keras.tfmot_config.QILQuantizeConfig`` and
tfmot's ``quantize_apply`` holds the same quantizers as one from
``qil_keras.quantize``, inside tfmot's wrappers. This copies it into
native layers: the float weights (kernels, biases, BatchNorm), every QIL
interval (``c``, ``d``, ``γ``) and bit width, and tfmot's 8-bit ranges (the
input ``QuantizeLayer``, output quantizers such as a residual ``Add``'s).
8-bit tensors the native model quantizes and the tfmot model does not (its
logits, float leftovers) get ranges calibrated on ``calibration_data``.
The copy is checked against the tfmot model on that data.

Reference: tfmot's wrapper layout, ``QuantizeWrapperV2`` and
``QuantizeAwareActivation`` (tensorflow_model_optimization 0.8.1).
"""

import numpy as np

from .._keras import keras
from .layers import FakeQuant8, QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D
from .quantize import quantize

__all__ = ["from_tfmot", "is_tfmot_model", "TfmotConversionError"]

_QIL_WEIGHT = (QILConv2D, QILDense, QILDepthwiseConv2D)
# Top-1 agreement the copy must reach with the tfmot model: the copy differs
# only by 8-bit fake-quantization of tensors the tfmot model leaves float
# (its logits), which flips a top-1 only where two logits are within a step.
MIN_AGREEMENT = 0.995
CALIBRATION_EXAMPLES = 1024


class TfmotConversionError(ValueError):
    """The tfmot model cannot be copied into a native QIL model (the message says why)."""


def is_tfmot_model(model):
    """Whether ``model`` has tfmot's quantization wrappers (``QuantizeWrapper*``/``QuantizeLayer``)."""
    return any(type(layer).__name__.startswith(("QuantizeWrapper", "QuantizeLayer"))
               for layer in model.layers)


def _variable(layer, suffix):
    """``layer``'s variable named ``.../<suffix>:0``, or ``None``."""
    found = [w for w in layer.weights if w.name.split("/")[-1] == f"{suffix}:0"]
    return found[0] if found else None


def _unwrap(layer):
    """A fresh float copy of a tfmot-wrapped (or plain) layer, and the layer holding its weights."""
    kind = type(layer).__name__
    if kind == "QuantizeLayer":
        return keras.layers.Activation("linear", name=layer.name), None
    if kind.startswith("QuantizeWrapper"):
        inner = layer.layer
        config = inner.get_config()
        if "activation" in config:
            activation = getattr(inner, "activation", None)
            activation = getattr(activation, "activation", activation)  # QuantizeAwareActivation
            config["activation"] = keras.activations.serialize(activation)
        return type(inner).from_config(config), inner
    return type(layer).from_config(layer.get_config()), layer


def _float_copy(model):
    holders = {}

    def clone(layer):
        copy, holder = _unwrap(layer)
        holders[copy.name] = (layer, holder)
        return copy

    try:
        float_model = keras.models.clone_model(model, clone_function=clone)
    except (ValueError, TypeError) as error:
        raise TfmotConversionError(
            f"could not rebuild the tfmot model {model.name!r} without its wrappers ({error}). "
            "Only Functional and Sequential models are supported.") from None
    for layer in float_model.layers:
        source, holder = holders.get(layer.name, (None, None))
        if holder is None or not layer.weights:
            continue
        if holder is source:
            layer.set_weights(source.get_weights())
            continue
        # A wrapped layer's kernel is tracked by the wrapper (tfmot swaps the layer's
        # attribute for the quantized tensor): look every variable up by its short name.
        values = []
        for weight in layer.weights:
            short = weight.name.split("/")[-1].split(":")[0]
            found = _variable(source, short)  # the wrapper tracks it (holder: fallback)
            found = found if found is not None else _variable(holder, short)
            if found is None:
                raise TfmotConversionError(f"no variable {short!r} in {source.name!r}.")
            values.append(found.numpy())
        layer.set_weights(values)
    return float_model, holders


def _qil_config(layer):
    config = getattr(layer, "quantize_config", None)
    return config if type(config).__name__ == "QILQuantizeConfig" else None


def from_tfmot(model, calibration_data=None):
    """Copy a tfmot-path QIL model into a native one (as ``qil_keras.quantize`` builds it).

    Args:
      model: a tf-keras model from tfmot's ``quantize_apply`` (or
        ``qil_keras.tfmot_config.quantize_apply``) whose Conv2D,
        DepthwiseConv2D and Dense layers and the ReLUs feeding them carry
        ``qil_keras.tfmot_config.QILQuantizeConfig``.
      calibration_data: inputs to calibrate the 8-bit tensors tfmot leaves
        float (the logits) and to check the copy against the tfmot model.

    Returns:
      The native QIL model; ``model.qil_report`` as from ``quantize``.

    Raises:
      TfmotConversionError: when a weight layer or activation that the native
        model quantizes has no QIL quantizer in the tfmot model, or the copy
        disagrees with the tfmot model.
    """
    if not is_tfmot_model(model):
        raise TfmotConversionError(
            f"model {model.name!r} has no tfmot wrappers; pass it to qil_keras.quantize instead.")
    float_model, holders = _float_copy(model)
    wrapped = {name: source for name, (source, _) in holders.items()}

    def bits_of(layer):
        config = _qil_config(wrapped.get(layer.name))
        return (config.w_bits, config.a_bits) if config is not None else None

    data = None if calibration_data is None else np.asarray(calibration_data, np.float32)
    native = quantize(float_model, first_last_bits=None, layer_bits=bits_of)
    missing, uncovered = [], []
    for layer in native.layers:
        if isinstance(layer, _QIL_WEIGHT):
            _copy_weight_quantizer(layer, wrapped[layer.name])
        elif isinstance(layer, QILActivation):
            if not _copy_activation_quantizer(layer, wrapped, native):
                missing.append(layer.name)
        elif isinstance(layer, FakeQuant8):
            if not _copy_range(layer, wrapped, model):
                (missing if data is None else uncovered).append(layer)
    if missing:
        raise TfmotConversionError(
            f"the native model quantizes {[getattr(m, 'name', m) for m in missing]}, which the tfmot model leaves unquantized "
            "or whose 8-bit range it does not hold. Annotate the ReLUs feeding QIL layers with "
            "QILQuantizeConfig, and pass calibration_data to measure 8-bit ranges "
            "(e.g. for the logits).")
    if uncovered:  # after the copy, so the ranges see the copied intervals upstream
        _calibrate_ranges(native, uncovered, data[:CALIBRATION_EXAMPLES])
    if data is not None:
        _check_copy(model, native, data)
    return native


def _calibrate_ranges(model, layers, data):
    """Set the range of each FakeQuant8 in ``layers`` to its input's min/max on ``data``."""
    for layer in layers:
        layer._calibrating = True
    try:
        model(data, training=False)
    finally:
        for layer in layers:
            layer._calibrating = False


def _copy_weight_quantizer(native_layer, source):
    prefix = "depthwise_kernel" if isinstance(native_layer, QILDepthwiseConv2D) else "kernel"
    for key in ("c", "d", "gamma"):
        variable = _variable(source, f"{prefix}_{key}")
        if variable is None:
            raise TfmotConversionError(f"{source.name!r} has no QIL kernel variable {key!r}.")
        native_layer.kernel_quantizer_vars[key].assign(variable.numpy())
    native_layer.set_bits(int(_variable(source, f"{prefix}_bits").numpy()))


def _copy_activation_quantizer(native_layer, wrapped, native):
    """Copy ``c, d`` (and bits) from the tfmot ReLU whose output this QILActivation quantizes."""
    producer = native_layer.name[:-len("_qil_act")] if native_layer.name.endswith(
        "_qil_act") else None
    source = wrapped.get(producer)
    if source is None or _qil_config(source) is None:
        return False
    for prefix in ("output", "post_activation"):
        c, d = _variable(source, f"{prefix}_c"), _variable(source, f"{prefix}_d")
        if c is not None and d is not None:
            native_layer.quantizer_vars["c"].assign(c.numpy())
            native_layer.quantizer_vars["d"].assign(d.numpy())
            native_layer.set_bits(int(_variable(source, f"{prefix}_bits").numpy()))
            return True
    return False


def _copy_range(native_layer, wrapped, model):
    """Copy an 8-bit range tfmot holds for this tensor; ``False`` when it holds none."""
    producer = native_layer.name[:-len("_fq8")] if native_layer.name.endswith("_fq8") else None
    pair = None
    if producer in [layer.name for layer in model._input_layers]:
        consumers = [layer for layer in model.layers if type(layer).__name__ == "QuantizeLayer"]
        if len(consumers) == 1:
            vars_ = consumers[0].quantizer_vars
            pair = (vars_["min_var"], vars_["max_var"])
    elif producer in wrapped:
        low, high = (_variable(wrapped[producer], "output_min"),
                     _variable(wrapped[producer], "output_max"))
        if low is not None and high is not None:
            pair = (low, high)
    if pair is None:
        return False
    native_layer.range_min.assign(float(pair[0].numpy()))
    native_layer.range_max.assign(float(pair[1].numpy()))
    native_layer.num_updates.assign(max(1, int(native_layer.num_updates.numpy())))
    return True


def _check_copy(model, native, data):
    """The copy must compute the tfmot model's function, up to its added 8-bit output grid.

    Passes when every output is within half a step of the native output
    quantizer (the only difference when tfmot leaves just the logits float),
    else when top-1 agreement reaches ``MIN_AGREEMENT``.
    """
    expected = model.predict(data, verbose=0, batch_size=256)
    got = native.predict(data, verbose=0, batch_size=256)
    last = native.layers[-1]
    if isinstance(last, FakeQuant8):
        step = last.quantization_params()[0]
        if np.max(np.abs(got - expected)) <= 0.5 * step * (1 + 1e-4) + 1e-6:
            return
    if expected.ndim == 2 and expected.shape[1] > 1:
        agreement = float(np.mean(expected.argmax(1) == got.argmax(1)))
        if agreement >= MIN_AGREEMENT:
            return
        raise TfmotConversionError(
            f"the native copy agrees with the tfmot model on only {100 * agreement:.2f} % of "
            f"{len(data)} examples (required {100 * MIN_AGREEMENT:.1f} %): a quantizer was "
            "not copied. Please report this with the model summary.")
    raise TfmotConversionError("the native copy's outputs differ from the tfmot model's by more "
                               "than half an output step.")
