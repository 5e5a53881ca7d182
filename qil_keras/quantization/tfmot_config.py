"""QIL quantizers inside a tfmot quantization-aware-training pipeline.

When to use this module
-----------------------
``qil_keras.quantize`` is the recommended path: it rewrites a float model
into QIL layers, places every quantizer the integer export needs, and knows how
to export the result to an integer TFLite file. This module is for users who
already run tfmot's ``quantize_annotate_layer`` / ``quantize_apply`` pipeline
and want QIL quantizers for some layers of it. The model it produces trains
with ``model.fit`` like any tfmot model; ``qil_keras.export_tflite``
exports it after copying it into native layers (``qil_keras.from_tfmot``).

Usage::

    import tensorflow_model_optimization as tfmot
    from qil_keras.tfmot_config import (QILQuantizeConfig, initialize_intervals,
                                        quantize_apply, quantize_scope)

    annotate = tfmot.quantization.keras.quantize_annotate_layer
    x = annotate(keras.layers.Conv2D(16, 3), QILQuantizeConfig(3, 3))(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = annotate(keras.layers.ReLU(), QILQuantizeConfig(3, 3))(x)
    ...
    qat_model = quantize_apply(keras.Model(inputs, outputs))   # or tfmot's, see below
    initialize_intervals(qat_model, calibration_data=x_train[:256])
    qat_model.compile(...); qat_model.fit(...)
    with quantize_scope():
        restored = keras.models.load_model("model.h5")  # not .keras, see "Saving"

What ``QILQuantizeConfig`` quantizes (a declarative table, see
``_KERNEL_LAYERS``):

* the kernel of ``Conv2D`` and ``Dense`` (``kernel``, channel axis -1) and of
  ``DepthwiseConv2D`` (``depthwise_kernel``, channel axes -2, -1) with a
  ``qil_keras.quantizers.QILWeightQuantizer`` at ``w_bits``; the bias
  stays float;
* a ReLU output with a ``qil_keras.quantizers.QILActivationQuantizer``
  at ``a_bits``: a layer whose ``activation`` is relu (``Conv2D(...,
  activation="relu")``, ``Activation("relu")``) through tfmot's
  ``QuantizeAwareActivation`` (variables ``post_activation_c/_d``); a
  ``ReLU`` layer, or an ``activation`` of relu6, through the wrapper's output
  quantizer (variables ``output_c/_d``), because tfmot's
  ``QuantizeAwareActivation`` accepts relu but refuses relu6;
* other activations (softmax, sigmoid, ...) stay float. Layers with neither a
  supported kernel nor a ReLU output are refused with an error naming the layer.

What tfmot 0.8.1's ``quantize_apply`` does around these layers (checked):

* The default scheme (``Default8BitQuantizeScheme``) adds an 8-bit
  ``QuantizeLayer`` (``AllValuesQuantizer``) after every model input that feeds
  an annotated layer. Its range starts at ``[0, 0]`` and grows during training
  steps only, so before the first training step the model's inference output
  is computed from an all-zero input; ``initialize_intervals`` with
  calibration data sets such ranges from the data as well.
* The Conv/Dense + BatchNorm (+ ReLU) layout transforms leave layers with a
  custom ``QuantizeConfig`` alone: nothing is folded, the BatchNormalization
  stays an ordinary float layer between the QIL conv and the QIL ReLU.
* But ``LayerReLUQuantize`` / ``LayerReluActivationQuantize`` (a ``ReLU`` or
  ``Activation("relu")`` layer directly after a Conv2D / DepthwiseConv2D /
  Dense / Add, both annotated) replace the producer's config with tfmot's
  ``NoOpQuantizeConfig``: with tfmot's own ``quantize_apply`` and the default
  scheme, a QIL-annotated ``Conv2D`` directly followed by a QIL-annotated
  ``ReLU`` silently loses its weight quantizer. ``quantize_apply`` here
  uses ``QILQuantizeScheme`` (the default scheme whose layout transforms
  leave QIL-annotated layers alone) and checks afterwards that every
  QIL-annotated layer is wrapped with its QIL config, raising otherwise.
  (Or fuse the ReLU into the layer: ``Conv2D(..., activation="relu")``.)
* A non-annotated layer whose output feeds an annotated layer gets tfmot's
  8-bit output quantizer if tfmot's registry has one for it (``Flatten``,
  ``MaxPooling2D`` have none; ``Add`` or a plain ``Conv2D`` have one).
* ``quantize_annotate_model`` annotates every other layer with tfmot's default
  8-bit configs (and fails on layers tfmot does not know, e.g. a lone
  BatchNormalization): annotate layers one by one instead when only QIL
  quantizers are wanted.

Saving (checked in ``tests/quantization/test_tfmot.py``; load full models inside
``quantize_scope``):

* ``.h5``, SavedModel (``save_format="tf"``) and weights-only
  (``save_weights`` + ``load_weights`` into an identically built and
  ``quantize_apply``-ed model, ``.weights.h5`` or TF checkpoint) reload with
  identical predictions.
* ``.keras`` reloads with identical predictions when every wrapper in the
  model holds a QILQuantizeConfig, but fails for any model with one of tfmot's
  own quantize layers, e.g. the input ``QuantizeLayer`` the default scheme
  adds: ``ValueError: Layer 'quantize_layer' expected 5 variables, but
  received 3 variables during loading. Expected: ['quantize_layer_min:0',
  'quantize_layer_max:0', 'quantize_layer/quantize_layer_min:0',
  'quantize_layer/quantize_layer_max:0', 'quantize_layer/optimizer_step:0']``
  (tfmot's ``QuantizeLayer`` is built twice on load; the same error happens
  with tfmot's own ``quantize_model``; tfmot PR #1123, unmerged).
* QIL's trainable quantizer variables exposed a second tfmot bug
  (``QuantizeWrapperV2`` orders its weights differently after a reload);
  ``QILQuantizeConfig`` works around it, see ``_WrappedWeightQuantizer``.
"""

import functools

import numpy as np
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import (
    quantize_annotate as _tfmot_annotate,
    quantize_aware_activation as _tfmot_qaa,
    quantize_layer as _tfmot_quantize_layer,
    quantize_wrapper as _tfmot_wrapper,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_layout_transform as _tfmot_layout,
    default_8bit_quantize_scheme as _tfmot_scheme,
    default_8bit_transforms as _tfmot_transforms,
)
from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
    model_transformer as _tfmot_model_transformer,
)

from .._keras import keras, tf
from ..data.checks import require_finite
from .layers import QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D
from .quantizers import QILActivationQuantizer, QILWeightQuantizer, check_bits

__all__ = [
    "QILQuantizeConfig",
    "QILQuantizeScheme",
    "quantize_scope",
    "quantize_apply",
    "initialize_intervals",
    "DEFAULT_ACTIVATION_RANGE",
]

_qk = tfmot.quantization.keras
L = keras.layers

# Layer class -> (kernel attribute, channel axes of that kernel). Checked in
# order with isinstance (DepthwiseConv2D is not a Conv2D subclass in tf-keras).
_KERNEL_LAYERS = (
    (L.DepthwiseConv2D, "depthwise_kernel", (-2, -1)),
    (L.Conv2D, "kernel", (-1,)),
    (L.Dense, "kernel", (-1,)),
)
# Subclasses of the classes above that must not be annotated, and why.
_REFUSED_LAYERS = (
    (L.Conv2DTranspose, "its kernel is laid out (h, w, out, in); QILQuantizeConfig "
                        "supports Conv2D, DepthwiseConv2D and Dense kernels only"),
    ((QILConv2D, QILDense, QILDepthwiseConv2D, QILActivation),
     "it is already a qil_keras QIL layer with its own quantizer; annotate the plain "
     "Keras layer instead, or use qil_keras.quantize without tfmot"),
)
_RELU = (keras.activations.relu, keras.activations.get("relu"), tf.nn.relu)
_RELU6 = (keras.activations.get("relu6"), tf.nn.relu6)  # tf-keras has no activations.relu6

DEFAULT_ACTIVATION_RANGE = 6.0  # [0, 6] when no calibration data is given


def _is_one_of(function, functions):
    return any(function is f for f in functions)


def _unwrap_activation(activation):
    """The original activation, also when tfmot has already replaced it."""
    if isinstance(activation, _tfmot_qaa.QuantizeAwareActivation):
        return activation.activation
    return activation


class _WrappedWeightQuantizer(QILWeightQuantizer):
    """QILWeightQuantizer that keeps a QuantizeWrapperV2's weight order stable.

    ``QuantizeWrapperV2.build`` lists the wrapped layer's trainable weights
    first, but only when that layer is already built: true after
    ``quantize_apply``, false when ``load_model`` rebuilds the wrapper from its
    config. tfmot's own quantizer variables are non-trainable, so the order of
    the trainable list does not matter for them; QIL's ``c``, ``d``, ``γ`` are
    trainable and would come before the kernel on reload, so ``.h5`` weights
    were assigned to the wrong variables ("Cannot assign value to variable
    ' quant_conv/kernel_c:0': Shape mismatch"). Building the quantizer first
    puts the wrapped layer's weights in front, as after ``quantize_apply``
    (the same bug is reported in tfmot PR #1123).
    """

    def build(self, tensor_shape, name, layer):
        if isinstance(layer, _tfmot_wrapper.QuantizeWrapperV2):
            own = layer._trainable_weights
            missing = [w for w in layer.layer.trainable_weights if not any(w is v for v in own)]
            own[:0] = missing
        return super().build(tensor_shape, name, layer)


@keras.utils.register_keras_serializable(package="qil_keras")
class QILQuantizeConfig(_qk.QuantizeConfig):
    """tfmot ``QuantizeConfig`` that puts QIL quantizers on a layer.

    Args:
      w_bits: weight bits (2 to 8) for the kernel of Conv2D, DepthwiseConv2D
        and Dense.
      a_bits: activation bits (2 to 8) for a ReLU / ReLU6 output.
      per_channel: one weight interval per output channel.
      train_gamma: whether the weight transformer exponent ``γ`` trains.

    Annotate with ``tfmot.quantization.keras.quantize_annotate_layer(layer,
    QILQuantizeConfig(...))``; see the module docstring for what is quantized.
    """

    def __init__(self, w_bits=4, a_bits=4, per_channel=False, train_gamma=True):
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")
        self.per_channel = bool(per_channel)
        self.train_gamma = bool(train_gamma)

    # -- what a layer gets ---------------------------------------------------

    @staticmethod
    def _kernel_spec(layer):
        for classes, why in _REFUSED_LAYERS:
            if isinstance(layer, classes):
                raise ValueError(
                    f"QILQuantizeConfig cannot quantize layer {layer.name!r} "
                    f"({type(layer).__name__}): {why}. Remove "
                    "quantize_annotate_layer(..., QILQuantizeConfig(...)) from it."
                )
        for cls, attr, axes in _KERNEL_LAYERS:
            if isinstance(layer, cls):
                return attr, axes
        if any(hasattr(layer, attr) for attr in ("kernel", "depthwise_kernel")):
            raise ValueError(
                f"QILQuantizeConfig cannot quantize the kernel of layer {layer.name!r} "
                f"({type(layer).__name__}): it supports Conv2D, DepthwiseConv2D and "
                "Dense kernels only. Remove its quantize_annotate_layer(...) to keep it "
                "float, or annotate it with a tfmot QuantizeConfig of your own."
            )
        return None, None

    @staticmethod
    def _relu_mode(layer):
        """``"activation"``, ``"output"`` or ``None``: where the ReLU is quantized."""
        if isinstance(layer, L.ReLU):
            if float(layer.negative_slope) != 0.0:
                raise ValueError(
                    f"QILQuantizeConfig cannot quantize the output of layer {layer.name!r}: "
                    f"ReLU with negative_slope={float(layer.negative_slope)} has negative "
                    "outputs, and a QIL activation quantizer maps every value below its "
                    "interval to 0. Use negative_slope=0, or remove the annotation."
                )
            return "output"
        activation = _unwrap_activation(getattr(layer, "activation", None))
        if activation is None:
            return None
        if _is_one_of(activation, _RELU):
            return "activation"
        if _is_one_of(activation, _RELU6):
            # tfmot's QuantizeAwareActivation refuses relu6; the layer's output
            # is the activation's output, so the output quantizer is the same.
            return "output"
        return None

    def _plan(self, layer):
        attr, axes = self._kernel_spec(layer)
        mode = self._relu_mode(layer)
        if attr is None and mode is None:
            raise ValueError(
                f"QILQuantizeConfig has nothing to quantize in layer {layer.name!r} "
                f"({type(layer).__name__}): it quantizes the kernel of Conv2D, "
                "DepthwiseConv2D and Dense layers and ReLU/ReLU6 outputs (a ReLU "
                "layer, Activation('relu'), or activation='relu'/'relu6'). Remove "
                "quantize_annotate_layer(..., QILQuantizeConfig(...)) from this layer "
                "(leave it float, or give it a tfmot QuantizeConfig)."
            )
        return attr, axes, mode

    # -- tfmot QuantizeConfig interface --------------------------------------

    def get_weights_and_quantizers(self, layer):
        attr, axes, _ = self._plan(layer)
        if attr is None:
            return []
        quantizer = _WrappedWeightQuantizer(
            self.w_bits, per_channel=self.per_channel, train_gamma=self.train_gamma,
            channel_axes=axes,
        )
        return [(getattr(layer, attr), quantizer)]

    def set_quantize_weights(self, layer, quantize_weights):
        attr, _, _ = self._plan(layer)
        expected = 0 if attr is None else 1
        if len(quantize_weights) != expected:
            raise ValueError(
                f"QILQuantizeConfig for layer {layer.name!r} expected {expected} "
                f"quantized weight(s), got {len(quantize_weights)}."
            )
        if attr is not None:
            setattr(layer, attr, quantize_weights[0])

    def get_activations_and_quantizers(self, layer):
        _, _, mode = self._plan(layer)
        if mode != "activation":
            return []
        return [(_unwrap_activation(layer.activation), QILActivationQuantizer(self.a_bits))]

    def set_quantize_activations(self, layer, quantize_activations):
        _, _, mode = self._plan(layer)
        expected = 1 if mode == "activation" else 0
        if len(quantize_activations) != expected:
            raise ValueError(
                f"QILQuantizeConfig for layer {layer.name!r} expected {expected} "
                f"quantized activation(s), got {len(quantize_activations)}."
            )
        if expected:
            layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        _, _, mode = self._plan(layer)
        return [QILActivationQuantizer(self.a_bits)] if mode == "output" else []

    def get_config(self):
        return {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "per_channel": self.per_channel,
            "train_gamma": self.train_gamma,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"QILQuantizeConfig({args})"


# -- scope, scheme and quantize_apply ----------------------------------------

_OBJECTS = {
    "QILQuantizeConfig": QILQuantizeConfig,
    "QILWeightQuantizer": QILWeightQuantizer,
    "QILActivationQuantizer": QILActivationQuantizer,
}


def quantize_scope(*args):
    """tfmot's ``quantize_scope`` with qil_keras's objects added.

    Use it around ``quantize_apply`` and ``keras.models.load_model`` of a
    tfmot-quantized model; extra dicts of custom objects may be passed.
    """
    return _qk.quantize_scope(*(args + (dict(_OBJECTS),)))


def _has_qil_config(node):
    """True when a matched LayerNode (or any node it matched) is QIL-annotated."""
    if isinstance((node.metadata or {}).get("quantize_config"), QILQuantizeConfig):
        return True
    return any(_has_qil_config(child) for child in node.input_layers)


@functools.lru_cache(maxsize=None)
def _guarded(base):
    """Subclass of the tfmot transform ``base`` that leaves QIL-annotated matches alone.

    tfmot's ModelTransformer tells transforms apart by class name, so the
    subclass keeps the name of ``base``.
    """

    def replacement(self, match_layer):
        if _has_qil_config(match_layer):
            return match_layer
        return base.replacement(self, match_layer)

    return type(base.__name__, (base,), {"replacement": replacement, "__module__": __name__})


# The transform list of tfmot 0.8.1's Default8BitQuantizeLayoutTransform.apply
# (tfmot is pinned to 0.8.1; the test checks the list against tfmot's).
_DEFAULT_TRANSFORMS = (
    "InputLayerQuantize",
    "SeparableConv1DQuantize",
    "SeparableConvQuantize",
    "Conv2DReshapeBatchNormReLUQuantize",
    "Conv2DReshapeBatchNormActivationQuantize",
    "Conv2DBatchNormReLUQuantize",
    "Conv2DBatchNormActivationQuantize",
    "Conv2DReshapeBatchNormQuantize",
    "Conv2DBatchNormQuantize",
    "ConcatTransform6Inputs",
    "ConcatTransform5Inputs",
    "ConcatTransform4Inputs",
    "ConcatTransform3Inputs",
    "ConcatTransform",
    "DenseBatchNormQuantize",
    "DenseBatchNormReLUQuantize",
    "DenseBatchNormActivationQuantize",
    "LayerReLUQuantize",
    "LayerReluActivationQuantize",
)


class _QILLayoutTransform(_tfmot_layout.Default8BitQuantizeLayoutTransform):
    """tfmot's default 8-bit layout transforms, each leaving QIL-annotated layers alone."""

    def apply(self, model, layer_quantize_map):
        transforms = [_guarded(getattr(_tfmot_transforms, name))() for name in _DEFAULT_TRANSFORMS]
        return _tfmot_model_transformer.ModelTransformer(
            model, transforms, set(layer_quantize_map.keys()), layer_quantize_map
        ).transform()


class QILQuantizeScheme(_tfmot_scheme.Default8BitQuantizeScheme):
    """tfmot's ``Default8BitQuantizeScheme`` whose layout transforms never touch a
    layer annotated with ``QILQuantizeConfig``.

    Non-QIL layers are handled exactly as by the default scheme (8-bit input
    ``QuantizeLayer``, 8-bit configs for layers annotated without a config).
    """

    def get_layout_transformer(self):
        return _QILLayoutTransform()


def _annotated_qil_layers(model):
    """Names of the layers of ``model`` annotated with a QILQuantizeConfig."""
    return [layer.layer.name for layer in model.layers
            if isinstance(layer, _tfmot_annotate.QuantizeAnnotate)
            and isinstance(layer.quantize_config, QILQuantizeConfig)]


def quantize_apply(model, scheme=None, quantized_layer_name_prefix="quant_"):
    """tfmot's ``quantize_apply`` with ``QILQuantizeScheme`` and a check.

    Runs inside ``quantize_scope``. Afterwards every layer that was
    annotated with a ``QILQuantizeConfig`` must be a ``QuantizeWrapper``
    holding that config; a RuntimeError names the layers where a layout
    transform of ``scheme`` replaced it.
    """
    scheme = QILQuantizeScheme() if scheme is None else scheme
    annotated = _annotated_qil_layers(model)
    with quantize_scope():
        quantized = _qk.quantize_apply(model, scheme, quantized_layer_name_prefix)
    prefix = quantized_layer_name_prefix or ""
    lost = []
    for name in annotated:
        try:
            layer = quantized.get_layer(prefix + name)
        except ValueError:
            lost.append(f"{name!r} (no layer {prefix + name!r} in the result)")
            continue
        kept = getattr(layer, "quantize_config", None)
        if not isinstance(kept, QILQuantizeConfig):
            lost.append(f"{name!r} (now {type(kept).__name__})")
    if lost:
        raise RuntimeError(
            "quantize_apply replaced the QILQuantizeConfig of layer(s) "
            + ", ".join(lost)
            + f" with the layout transforms of {type(scheme).__name__}, so their QIL "
            "quantizers are missing. Use scheme=None (QILQuantizeScheme), or fuse a "
            "following ReLU into the layer (activation='relu')."
        )
    return quantized


# -- interval initialization ---------------------------------------------------


def _walk_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk_layers(layer)
        else:
            yield layer


class _Site:
    """One activation-side quantizer of a tfmot model: where it is and its variables."""

    def __init__(self, where, quantizer, variables, owner, attr):
        self.where, self.quantizer, self.variables = where, quantizer, variables
        self._owner, self._attr = owner, attr

    def swap(self, stand_in):
        """Make the owner call ``stand_in``; returns a function that undoes it.

        ``object.__setattr__`` bypasses Keras attribute tracking, so the
        owner's tracked objects are the same before and after.
        """
        saved = self._owner.__dict__[self._attr]
        value = [stand_in] if self._attr == "_output_quantizers" else stand_in
        object.__setattr__(self._owner, self._attr, value)
        return lambda: object.__setattr__(self._owner, self._attr, saved)


def _activation_sites(model):
    """Every activation-side quantizer: QuantizeAwareActivation, output, QuantizeLayer."""
    for layer in _walk_layers(model):
        if isinstance(layer, _tfmot_wrapper.QuantizeWrapper):
            for qaa in getattr(layer, "_quantize_activations", []):
                for kind in ("pre_activation", "post_activation"):
                    variables = getattr(qaa, f"_{kind}_vars", None)
                    if variables is not None:
                        yield _Site(f"{layer.name}/{kind}", qaa.quantizer, variables, qaa,
                                    "quantizer")
            if getattr(layer, "_output_quantizers", None):
                yield _Site(f"{layer.name}/output", layer._output_quantizers[0],
                            layer._output_quantizer_vars, layer, "_output_quantizers")
        elif isinstance(layer, _tfmot_quantize_layer.QuantizeLayer) and layer.quantizer:
            yield _Site(f"{layer.name}/input", layer.quantizer, layer.quantizer_vars, layer,
                        "quantizer")


def _has_range_vars(variables):
    return (isinstance(variables, dict) and "min_var" in variables and "max_var" in variables
            and variables["min_var"].shape.rank == 0 and variables["max_var"].shape.rank == 0)


class _Calibrating:
    """Stands in for a quantizer during one eager forward pass.

    A QIL activation quantizer sets its interval from its input
    (``QILActivationQuantizer.initialize``); a tfmot min/max quantizer gets the
    input's range widened to include 0 (what ``AllValuesQuantizer`` records on
    a training step). Then the quantizer runs in inference mode, so later
    layers are calibrated on already-quantized inputs, as in
    ``qil_keras.quantize``.
    """

    def __init__(self, quantizer, where, sources):
        self.quantizer, self.where, self.sources = quantizer, where, sources

    def __call__(self, inputs, training, weights, **kwargs):
        if not tf.executing_eagerly():
            raise RuntimeError("initialize_intervals must run the model eagerly; do not "
                               "call it inside a tf.function.")
        values = inputs.numpy()
        if isinstance(self.quantizer, QILActivationQuantizer):
            self.quantizer.initialize(weights, values)
            self.sources[self.where] = "calibration batch"
        elif _has_range_vars(weights):
            weights["min_var"].assign(min(0.0, float(values.min())))
            weights["max_var"].assign(max(0.0, float(values.max())))
            self.sources[self.where] = "calibration batch (tfmot min/max range)"
        return self.quantizer(inputs, False, weights, **kwargs)


def _calibration_inputs(model, data):
    if isinstance(data, tf.data.Dataset):
        data = next(iter(data))
        if isinstance(data, (tuple, list)) and len(model.inputs) == 1:
            data = data[0]
    arrays = list(data) if isinstance(data, (list, tuple)) else [data]
    if len(arrays) != len(model.inputs):
        raise ValueError(f"calibration_data has {len(arrays)} inputs but the model has "
                         f"{len(model.inputs)}; pass one array per model input (the inputs only: "
                         "x, not (x, y)).")
    arrays = [require_finite(np.asarray(a, np.float32), "calibration_data") for a in arrays]
    if any(a.shape[0] == 0 for a in arrays):
        raise ValueError("calibration_data is empty; pass at least one example.")
    return arrays if len(arrays) > 1 else arrays[0]


def initialize_intervals(model, calibration_data=None):
    """Initialize the QIL intervals of a model made by tfmot's ``quantize_apply``.

    ``quantize_apply`` copies the float weights but creates every interval at
    ``c = d = 0.5``. This sets:

    * each QIL weight quantizer to the MSE-optimal range of its float kernel
      (``c = d``, ``γ = 1``, see ``qil_keras.init``);
    * with ``calibration_data`` (a batch of inputs: an array, a list of arrays
      for several inputs, or a ``tf.data.Dataset`` whose first batch is used),
      each QIL activation quantizer to the MSE-optimal range of its input in
      one eager inference pass, and tfmot's own min/max activation quantizers
      (the 8-bit input ``QuantizeLayer``) to the observed range; without it,
      each QIL activation interval to ``[0, 6]`` (tfmot's quantizers are left
      alone).

    Returns a dict ``{"layer/what": how it was initialized}``.
    """
    wrappers = [lyr for lyr in _walk_layers(model)
                if isinstance(lyr, _tfmot_wrapper.QuantizeWrapper)]
    if not wrappers:
        raise ValueError(
            f"{getattr(model, 'name', model)!r} has no tfmot QuantizeWrapper layers. Call "
            "initialize_intervals on the model returned by quantize_apply (models made by "
            "qil_keras.quantize are initialized by quantize itself)."
        )
    sources = {}
    for layer in wrappers:
        for weight, quantizer, variables in layer._weight_vars:
            if isinstance(quantizer, QILWeightQuantizer):
                quantizer.initialize(variables, weight.numpy())
                sources[f"{layer.name}/{layer._weight_name(weight.name)}"] = (
                    "MSE-optimal range of the float kernel")
    sites = list(_activation_sites(model))
    if calibration_data is None:
        half = np.float32(DEFAULT_ACTIVATION_RANGE / 2)
        for site in sites:
            if isinstance(site.quantizer, QILActivationQuantizer):
                site.variables["c"].assign(half)
                site.variables["d"].assign(half)
                sources[site.where] = (f"default [0, {DEFAULT_ACTIVATION_RANGE:g}]; pass "
                                       "calibration_data for a data-driven start")
        return sources
    inputs = _calibration_inputs(model, calibration_data)
    undo = []
    try:
        for site in sites:
            undo.append(site.swap(_Calibrating(site.quantizer, site.where, sources)))
        model(inputs, training=False)
    finally:
        for restore in reversed(undo):
            restore()
    return sources
