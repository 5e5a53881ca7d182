"""The model classes ``qil_keras.quantize`` returns: ``fit`` leaves the model as the file computes.

``QILModel`` (functional) and ``QILSequential`` are ``keras.Model`` subclasses whose
``fit`` ends with two steps, so that what the user evaluates after training is what the
integer file will compute:

1. BatchNorm re-estimation (``qil_keras.batchnorm.reestimate_batchnorm``): the moving
   statistics are set from the final weights on up to ``reestimate_images`` training inputs
   (also before each validation run inside ``fit``). Low-bit weights oscillate, so the moving
   averages of training describe no single set of weights (Nagel et al., ICML 2022, §4.1).
2. The snap onto the integer grid (``qil_keras.snap_to_integer``, with the export's
   defaults: XNNPACK rounding and INT8 weight storage, or ``snap_storage = "int4"``): biases move by at most half an int32
   unit, post-add thresholds onto their branch's step, and the tie guard's moves. A deep
   network's predictions depend on such sub-unit moves: each flips a few roundings, and the
   one-level differences spread layer by layer (on MobileNetV2 α 0.35 at 8/8 the unsnapped
   model and its snapped copy disagreed on a few per cent of top-1 predictions: issue #15, a
   development run; an export reports it for your model as ``report.snap["agreement_before_snap"]``).
   Snapped at the end of ``fit``, the model's ``evaluate`` is the file's accuracy rather
   than a neighbour's. ``snap_after_fit = False`` turns it off; a model the exporter cannot
   lower (a layer left in float) is not snapped, and ``model.fit_snap`` says why.

Before training, ``fit`` creates the optimizer's and the compiled metrics' variables
(``build_before_tracing``), which tf-keras would create inside the first train step, making
``tf.function`` trace the step twice: the first ``fit`` traces it once, and trains exactly as
``keras.Model.fit`` does (``tests/training/test_model_fit.py``).

Imports: ``qil_keras.batchnorm``; ``qil_keras.snap`` at the end of ``fit``.
"""

import inspect
import logging

from .._keras import keras, tf
from ..quantization.quantizers import width_changes
from .batchnorm import (DEFAULT_REESTIMATE_IMAGES, BatchNormReestimation, _fit_inputs,
                        _input_batches, _reestimated_by_fit)
from .last_epoch import LastEpochCallback

__all__ = ["QILModel", "QILSequential", "IntegerSnap", "PrunedLayerCheck",
           "build_before_tracing", "drop_traced_steps", "end_of_fit_callbacks",
           "fully_pruned_layers", "snap_after_fit", "untie_after_fit"]

_LOG = logging.getLogger(__name__)


def _sample(data, images=DEFAULT_REESTIMATE_IMAGES):
    """Up to ``images`` inputs of ``data`` as one array (nested arrays for several inputs)."""
    import numpy as np

    batches = list(_input_batches(data, 256, images))
    return tf.nest.map_structure(lambda *parts: np.concatenate([np.asarray(p) for p in parts]),
                                 *batches)


def untie_after_fit(model, data):
    """Widen the model-input quantizers on which training left some of ``data``'s inputs on a
    rounding tie (``qil_keras.quantize.untie_inputs``, as the export does on its copy);
    ``data``: training inputs (arrays, dataset or Sequence) or ``None`` (nothing done)."""
    from ..quantization.quantize import untie_inputs

    data = _fit_inputs(data)
    return untie_inputs(model, _sample(data)) if data is not None else {}


def snap_after_fit(model, data=None):
    """Snap ``model`` onto the integer grid as the export's defaults will (in place).

    With ``data`` (training inputs), first widen the model-input quantizers whose training moved
    their range so that some input now sits on a rounding tie (``qil_keras.quantize.
    untie_inputs``, as the export does on its copy). Returns the
    ``qil_keras.snap.SnapReport``, or the reason it was not snapped (a model without QIL
    layers, or one the exporter cannot lower); also kept as ``model.fit_snap``.
    """
    from ..integer.lowering import LoweringError
    from ..integer.snap import snap_to_integer

    if not any(hasattr(layer, "quantizer_vars") or hasattr(layer, "kernel_quantizer_vars")
               for layer in model.layers):
        result = "not snapped: no QIL layers"
    else:
        try:
            untie_after_fit(model, data)
            result = snap_to_integer(model, weight_storage=getattr(model, "snap_storage", "int8"))
        except LoweringError as error:
            result = f"not snapped: the exporter cannot lower this model ({error})"
    model.fit_snap = result
    return result


class IntegerSnap(LastEpochCallback):
    """Snaps the model (``snap_after_fit``) before the last epoch's validation, so that
    the last validation metrics are the snapped model's, or at the end of ``fit`` when there is
    no validation. Put it after a ``qil_keras.batchnorm.BatchNormReestimation``.

    The snap is done as soon as the last epoch's training steps are done
    (``LastEpochCallback``): the validation's test function is made before ``on_test_begin``
    and reads an input quantizer's ``extra_steps``, which the snap may widen, when it is
    traced. Where ``fit`` does not know its number of steps, at the last ``on_test_begin``.

    Args:
      data: training inputs, to widen input ties (see ``snap_after_fit``); or ``None``.
      model: the model to snap; default the model ``fit`` trains.
    """

    def __init__(self, data=None, *, model=None):
        super().__init__()
        self.data, self.target = data, model
        self._done = False

    def snap(self):
        snap_after_fit(self.target or self.model, self.data)
        self._done = True

    def before_last_validation(self):
        self.snap()

    def on_train_begin(self, logs=None):
        self._done = False

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._done = False

    def on_test_begin(self, logs=None):
        if self.in_last_epoch() and not self._done:
            self.snap()

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if not self._done:
            self.snap()


def fully_pruned_layers(model):
    """Names of the QIL weight layers of ``model`` whose weights are all at level 0: such a
    layer outputs its bias only, whatever its input, and no interval gradient reaches it
    again (every weight lies below the interval)."""
    from ..quantization.inspection import quantized_weights

    return [name for name, weights in quantized_weights(model).items()
            if not weights.levels.any()]


class PrunedLayerCheck(keras.callbacks.Callback):
    """Logs a warning at the end of ``fit`` naming every QIL weight layer pruned to all
    zeros (``fully_pruned_layers``): training has cut the layer out of the network. Kept as
    ``self.pruned``."""

    def __init__(self, model=None):
        super().__init__()
        self.target, self.pruned = model, []

    def on_train_end(self, logs=None):
        self.pruned = fully_pruned_layers(self.target or self.model)
        if self.pruned:
            _LOG.warning(
                "Training pruned every weight of %s to zero: these layers now output their "
                "bias only. Their pruning threshold rose above all their weights (a learning "
                "rate too large for the intervals: try a smaller interval_lr_multiplier, see "
                "qil_keras.qil_optimizer), or start again from the float model.",
                ", ".join(repr(name) for name in self.pruned))


def end_of_fit_callbacks(model, x, callbacks=None):
    """``callbacks`` plus what ends the ``fit`` of a quantized ``model`` on inputs ``x``: a
    ``qil_keras.batchnorm.BatchNormReestimation`` (where ``model.reestimate_images`` is
    set and a BatchNorm trains with batch statistics), then an ``IntegerSnap`` (where
    ``model.snap_after_fit``) and a ``PrunedLayerCheck``, each unless ``callbacks`` has one.
    All act on ``model``, also when another model's ``fit`` trains it (distillation). Inputs that cannot be read twice
    (a Python generator) are refused with the fix named."""
    callbacks = list(callbacks or [])
    inputs = _fit_inputs(x)
    images = getattr(model, "reestimate_images", 0)
    if (images and any(_reestimated_by_fit(layer) for layer in model.layers)
            and not any(isinstance(c, BatchNormReestimation) for c in callbacks)):
        if inputs is None:
            raise TypeError(
                "The fit of a quantized model re-estimates BatchNorm statistics from the "
                "training inputs after training and cannot read them twice from a "
                f"{type(x).__name__}. Pass arrays, a tf.data.Dataset or a "
                "keras.utils.Sequence, or set model.reestimate_images = 0 and call "
                "qil_keras.reestimate_batchnorm(model, data) yourself after fit.")
        callbacks.append(BatchNormReestimation(inputs, max_images=images, model=model,
                                               only_training=True))
    if (getattr(model, "snap_after_fit", False)
            and not any(isinstance(c, IntegerSnap) for c in callbacks)):
        callbacks.append(IntegerSnap(inputs, model=model))  # after the re-estimation: it moves β
    if not any(isinstance(c, PrunedLayerCheck) for c in callbacks):
        callbacks.append(PrunedLayerCheck(model=model))
    return callbacks


def build_before_tracing(model, x, y=None):
    """Create the optimizer's slots and the compiled loss's and metrics' variables of ``model``
    before its first ``fit`` traces the train step.

    ``tf.function`` traces a function twice when its first call creates variables (once to
    create them, once without), and tf-keras creates these in the first train step, so the
    first ``fit`` of a model pays two traces; a QIL model's step (two Adam slots for each
    weight and each interval variable) is costly to trace. Built here, the step is traced
    once; the variables are the ones Keras would create. Applies to a compiled single-output
    model with a ``keras.optimizers.Optimizer``, whose targets are an array or tensor ``y``
    or the second element of a ``tf.data.Dataset``'s batches; otherwise Keras builds them as
    usual. Returns whether it built them."""
    import numpy as np

    optimizer = getattr(model, "optimizer", None)
    if (not isinstance(optimizer, keras.optimizers.Optimizer)
            or getattr(optimizer, "_built", False)
            or len(getattr(model, "outputs", None) or []) != 1
            or getattr(model, "compiled_loss", None) is None
            or getattr(model, "compiled_metrics", None) is None):
        return False
    if y is not None:
        if not isinstance(y, (np.ndarray, tf.Tensor)):
            return False
        target = tf.TensorSpec((None,) + tuple(y.shape[1:]), tf.as_dtype(y.dtype))
    elif isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        if not (isinstance(spec, tuple) and len(spec) >= 2
                and isinstance(spec[1], tf.TensorSpec)):
            return False
        target = spec[1]
    else:
        return False
    output = model.outputs[0]
    with model.distribute_strategy.scope():
        with tf.name_scope(optimizer.name or "optimizer"):  # as apply_gradients names them
            optimizer.build(model.trainable_variables)
        model.compiled_loss.build(output)
        model.compiled_metrics.build(output, target)
    return True


def drop_traced_steps(model):
    """Give ``model`` fresh train, test and predict steps in place of those it has traced: a
    traced step holds what was read when it was traced (the bit widths,
    ``ops.bits_when_traced``; an input quantizer's ``extra_steps``). A fresh
    ``tf.function`` rather than ``None``, so that a ``fit`` under way (its loop reads
    ``model.train_function`` at every step) traces the new one at its next step."""
    for kind in ("train", "test", "predict"):
        if getattr(model, f"{kind}_function", None) is not None:
            getattr(model, f"make_{kind}_function")(force=True)


class DeployableFit:
    """``fit`` that ends with BatchNorm re-estimation and the integer snap (mixin of
    ``QILModel`` and ``QILSequential``; see the module docstring).

    Re-estimation applies to trainable BatchNorm layers in batch-statistics mode; frozen ones
    (``bn_freeze_after``, ``trainable=False``) keep theirs. A ``BatchNormReestimation`` among
    the callbacks replaces the default one. Inputs that cannot be read twice (a Python
    generator) are refused with the fix named.
    """

    #: training inputs read by the re-estimation after ``fit`` (0 or ``None``: none)
    reestimate_images = DEFAULT_REESTIMATE_IMAGES
    #: whether ``fit`` ends by snapping the model onto the integer grid
    snap_after_fit = True
    #: the weight storage of the file the snap prepares for (``"int8"``, the export's default,
    #: or ``"int4"``): the bias unit depends on it, so an INT4 file of a model snapped for INT8
    #: is snapped again by the export
    snap_storage = "int8"

    def fit(self, x=None, y=None, *args, **kwargs):
        bound = inspect.signature(keras.Model.fit).bind(self, x, y, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        arguments.update(arguments.pop("kwargs", {}))
        arguments["callbacks"] = end_of_fit_callbacks(self, arguments.get("x"),
                                                      arguments.get("callbacks"))
        build_before_tracing(self, arguments.get("x"), arguments.get("y"))
        return super().fit(**arguments)

    def load_weights(self, *args, **kwargs):
        """``keras.Model.load_weights``, then fresh steps: the weights may hold other bit
        widths, which a step reads when it is traced (``ops.bits_when_traced``)."""
        status = super().load_weights(*args, **kwargs)
        drop_traced_steps(self)
        return status

    # A traced step holds the bit widths it was traced with: a step is made again when a
    # layer's own set_bits has changed a width since it was made (quantizers.width_changes).
    def _widths_moved(self, kind):
        now, attribute = width_changes(), f"_width_changes_at_{kind}_function"
        moved = getattr(self, attribute, now) != now
        setattr(self, attribute, now)
        return moved

    def make_train_function(self, force=False):
        return super().make_train_function(force=self._widths_moved("train") or force)

    def make_test_function(self, force=False):
        return super().make_test_function(force=self._widths_moved("test") or force)

    def make_predict_function(self, force=False):
        return super().make_predict_function(force=self._widths_moved("predict") or force)


@keras.utils.register_keras_serializable(package="qil_keras")
class QILModel(DeployableFit, keras.Model):
    """The functional model ``qil_keras.quantize`` returns: a ``keras.Model`` whose
    ``fit`` ends with BatchNorm re-estimation and the integer snap (``DeployableFit``)."""


@keras.utils.register_keras_serializable(package="qil_keras")
class QILSequential(DeployableFit, keras.Sequential):
    """The Sequential model ``qil_keras.quantize`` returns for a Sequential input."""


# tf-keras' HDF5 format writes a model's bare class name (``model.__class__.__name__``), not its
# registered ``qil_keras>`` name, so ``load_model("model.h5")`` looks the models up as
# ``QILModel`` / ``QILSequential``; the layers inside carry their registered names.
for _model_class in (QILModel, QILSequential):
    keras.utils.get_custom_objects().setdefault(_model_class.__name__, _model_class)
