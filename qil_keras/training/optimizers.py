"""An optimizer that gives the QIL intervals their own learning rate.

QIL trains the quantization intervals (``c``, ``d`` and the weight exponent
``γ``) with the task loss, together with the network weights, and the paper
trains them with a learning rate of their own. Scaling their gradients does
not do that for adaptive optimizers (Adam's step is invariant to the gradient
scale), so ``IntervalOptimizer`` holds two optimizers of the same kind:

* the user's optimizer, for the network weights (kernels, biases, BatchNorm);
* a clone of it (``type(opt).from_config(opt.get_config())``) for the interval
  variables, whose learning rate is the user's times ``interval_lr_multiplier``
  (a ``ScaledSchedule`` of the user's learning-rate variable or
  ``LearningRateSchedule``, so callbacks that change the user's learning rate
  change both) and which has no weight decay.

Usage::

    opt = qil_keras.qil_optimizer(model, keras.optimizers.Adam(1e-3),
                                  interval_lr_multiplier=10.0)
    model.compile(opt, loss, metrics=["accuracy"])
    model.fit(...)

``train_weights=False`` trains the intervals only: the other variables are
never handed to an optimizer, so they stay bit-identical (BatchNorm moving
statistics, which no optimizer updates, still follow the data in
``fit``).

Saving and loading
------------------
The interval variables belong to the model, so an optimizer's config cannot
name them: ``IntervalOptimizer.from_config`` (``load_model`` of ``.keras``,
``.h5`` and SavedModel files) makes an optimizer whose interval variables are
not known yet. Attach them before training::

    model = keras.models.load_model("model.keras")
    qil_keras.attach_interval_variables(model)   # restores the optimizer state too
    model.fit(...)

Until then the optimizer keeps the state it was asked to load (``.keras``,
``.h5``; like any tf-keras optimizer it keeps none in a SavedModel) and refuses
to apply gradients (a RuntimeError says what to call). ``tf.train.Checkpoint``
(and ``save_weights`` / ``ModelCheckpoint(save_weights_only=True)`` in the TF
format) restores the optimizer state when it is built: the checkpoint has the
two inner optimizers under ``_weights_optimizer`` and ``_interval_optimizer``.

Under ``tf.distribute`` the gradients are all-reduced once by the wrapper and
the inner optimizers apply them with ``skip_gradients_aggregation=True``.
``global_clipnorm`` of the user's optimizer clips all gradients together (as
without the wrapper); ``clipnorm`` and ``clipvalue`` clip each variable.
DTensor (``mesh=``) and the legacy optimizers are not supported.
"""

import logging
import math

import numpy as np
from tensorflow_model_optimization.python.core.quantization.keras import (
    quantize_wrapper as _tfmot_wrapper,
)

from .._keras import keras, tf
from ..quantization.layers import QILActivation, _QILKernelMixin
from ..quantization.quantizers import QILActivationQuantizer, QILWeightQuantizer

__all__ = [
    "IntervalOptimizer",
    "ScaledSchedule",
    "interval_variables",
    "qil_optimizer",
    "attach_interval_variables",
    "build_optimizer",
]

_LOG = logging.getLogger(__name__)
# Methods that store Python lists/dicts on the optimizer: without this, tf's
# automatic tracking would make them checkpoint dependencies.
_untracked = tf.__internal__.tracking.no_automatic_dependency_tracking
_Schedule = keras.optimizers.schedules.LearningRateSchedule
_WEIGHT_KEYS = ("c", "d", "gamma")
_ACTIVATION_KEYS = ("c", "d")


# -- finding the interval variables ---------------------------------------------


def _quantizer_vars(quantizer, variables):
    """The interval variables in a quantizer's variable dict (none for other quantizers)."""
    if isinstance(quantizer, QILWeightQuantizer):
        keys = _WEIGHT_KEYS
    elif isinstance(quantizer, QILActivationQuantizer):
        keys = _ACTIVATION_KEYS
    else:
        return []
    return [variables[k] for k in keys if isinstance(variables, dict) and k in variables]


def _layer_interval_vars(layer):
    if isinstance(layer, _QILKernelMixin) and layer.built:
        yield from _quantizer_vars(layer.kernel_quantizer, layer.kernel_quantizer_vars)
    elif isinstance(layer, QILActivation) and layer.built:
        yield from _quantizer_vars(layer.quantizer, layer.quantizer_vars)
    elif isinstance(layer, _tfmot_wrapper.QuantizeWrapper) and layer.built:
        for _, quantizer, variables in getattr(layer, "_weight_vars", []):
            yield from _quantizer_vars(quantizer, variables)
        for activation in getattr(layer, "_quantize_activations", []):
            for kind in ("_pre_activation_vars", "_post_activation_vars"):
                variables = getattr(activation, kind, None)
                if variables is not None:
                    yield from _quantizer_vars(activation.quantizer, variables)
        if getattr(layer, "_output_quantizers", None):
            yield from _quantizer_vars(layer._output_quantizers[0],
                                       layer._output_quantizer_vars)


def _all_layers(model_or_layers):
    if isinstance(model_or_layers, keras.layers.Layer):
        roots = [model_or_layers]
    else:
        roots = list(model_or_layers)
    for root in roots:
        if not isinstance(root, keras.layers.Layer):
            raise TypeError(
                "interval_variables expects a tf-keras model, a layer, or a list of "
                f"them; got {type(root).__name__}."
            )
        # Every nested layer: models in models, a QuantizeWrapper's inner layer.
        yield from root._flatten_layers(include_self=True, recursive=True)


def interval_variables(model_or_layers):
    """The QIL interval variables of a model, a layer, or a list of them.

    Returns a list, in layer order, without duplicates: ``c``, ``d`` and ``γ``
    of every QIL weight quantizer (``QILConv2D``, ``QILDepthwiseConv2D``,
    ``QILDense``, and tfmot ``QuantizeWrapper`` layers holding a
    ``QILWeightQuantizer``), and ``c``, ``d`` of every QIL activation
    quantizer (``QILActivation``, and a ``QuantizeWrapper``'s activation or
    output quantizer that is a ``QILActivationQuantizer``). The variables are
    found through the layers' quantizer dicts (by object, not by name); ``γ``
    is listed also when it does not train (``train_gamma=False``). Layers
    that are not built yet have no variables; nested models are searched.
    """
    found, seen = [], set()
    for layer in _all_layers(model_or_layers):
        for variable in _layer_interval_vars(layer):
            if _key(variable) not in seen:
                seen.add(_key(variable))
                found.append(variable)
    return found


def _key(variable):
    """Identity of a variable; a replica's component maps to its distributed variable."""
    if hasattr(variable, "_distributed_container"):
        variable = variable._distributed_container()
    return id(variable)


# -- learning rate ----------------------------------------------------------------


@keras.utils.register_keras_serializable(package="qil_keras")
class ScaledSchedule(_Schedule):
    """Learning rate ``factor * base``: ``base`` is a schedule, a variable or a float.

    A ``LearningRateSchedule`` is called with the step; a ``tf.Variable`` (an
    optimizer's learning-rate variable) is read at every call, so assigning
    it (``LearningRateScheduler``, ``ReduceLROnPlateau``) also changes this
    schedule. ``get_config`` stores a variable's current value.
    """

    def __init__(self, schedule, factor):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        if isinstance(self.schedule, _Schedule):
            base = self.schedule(step)
        else:
            base = self.schedule
        base = tf.convert_to_tensor(base)
        if not base.dtype.is_floating:
            base = tf.cast(base, keras.backend.floatx())
        return base * tf.cast(self.factor, base.dtype)

    def get_config(self):
        if isinstance(self.schedule, _Schedule):
            schedule = keras.optimizers.schedules.serialize(self.schedule)
        else:
            schedule = float(np.asarray(keras.backend.get_value(self.schedule)))
        return {"schedule": schedule, "factor": self.factor}


class _CallableList(list):
    """A list that returns itself when called (``optimizer.variables()`` works too)."""

    def __call__(self):
        return self


# -- the optimizer --------------------------------------------------------------------


@keras.utils.register_keras_serializable(package="qil_keras")
class IntervalOptimizer(keras.optimizers.Optimizer):
    """Trains QIL interval variables with their own learning rate.

    Args:
      optimizer: a tf-keras optimizer (``keras.optimizers.SGD``, ``Adam``,
        ``AdamW``, ...; not a legacy one). It updates every variable that is
        not an interval variable. It must not have been used on other
        variables.
      interval_variables: the interval variables (see
        ``interval_variables``), a callable returning them (called when
        the optimizer is built, for models built later), or ``None`` to set
        them later with ``set_interval_variables`` (what ``from_config``
        does).
      interval_lr_multiplier: the intervals' learning rate is the
        optimizer's times this (``0`` freezes the intervals: they are not
        updated at all).
      train_weights: ``False`` trains the intervals only; the other variables
        are not updated at all.

    The interval optimizer is ``type(optimizer).from_config(...)`` of the
    user's config with ``learning_rate=ScaledSchedule(lr, multiplier)`` and
    no weight decay; both keep the same ``iterations`` count.

    The class reads in its sections: construction (the two optimizers); the
    interval variables (given, or a callable resolved at ``build`` for models
    built later); building and applying (``apply_gradients`` all-reduces and
    clips all gradients once, then hands the intervals to one optimizer and the
    rest to the other, counting a skipped step where a group has none); state
    (``.keras`` slots ``w<i>``/``i<i>``, ``.h5`` flat lists, state loaded before
    the intervals are known kept until ``build``); config.
    """

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def __init__(self, optimizer, interval_variables=None, interval_lr_multiplier=1.0,
                 train_weights=True, name="IntervalOptimizer"):
        if isinstance(optimizer, IntervalOptimizer):
            raise TypeError("IntervalOptimizer cannot wrap another IntervalOptimizer.")
        if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
            raise TypeError(
                "Pass the optimizer without its LossScaleOptimizer: under a mixed "
                "precision policy model.compile wraps the IntervalOptimizer itself."
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "IntervalOptimizer needs a tf-keras optimizer such as "
                "keras.optimizers.Adam(...) (not a legacy optimizer from "
                f"keras.optimizers.legacy, not a Keras 3 one); got {type(optimizer).__name__}."
            )
        if optimizer._mesh or optimizer._run_with_dtensor:
            raise ValueError("IntervalOptimizer does not support DTensor optimizers (mesh=...).")
        multiplier = float(interval_lr_multiplier)
        if not math.isfinite(multiplier) or multiplier < 0:
            raise ValueError(
                "interval_lr_multiplier must be a finite number >= 0, got "
                f"{interval_lr_multiplier!r}."
            )
        self.name = name
        self._multiplier = multiplier
        self._train_weights = bool(train_weights)
        self._qil_built = False
        self._interval_list = None  # list of variables once known
        self._interval_keys = None
        self._interval_source = None  # a callable giving them, resolved at build
        self._pending_var_list = None  # build() called before the intervals were known
        self._pending_state = None  # loaded state waiting for build()
        self._distribution_strategy = optimizer._distribution_strategy
        self._mesh = None
        self._run_with_dtensor = False
        if interval_variables is not None:
            self._set_intervals(interval_variables)

        # The two optimizers are the checkpoint dependencies (explicitly: the
        # attributes of this __init__ are not tracked automatically).
        with tf.name_scope("interval_optimizer"):
            interval_optimizer = self._make_interval_optimizer(optimizer, multiplier)
        self._track_trackable(optimizer, name="_weights_optimizer")
        self._track_trackable(interval_optimizer, name="_interval_optimizer")
        self._weights_optimizer = optimizer
        self._interval_optimizer = interval_optimizer

    @staticmethod
    def _make_interval_optimizer(optimizer, multiplier):
        config = optimizer.get_config()
        config["learning_rate"] = ScaledSchedule(optimizer._learning_rate, multiplier)
        config["name"] = f"{config.get('name') or type(optimizer).__name__}_intervals"
        config["global_clipnorm"] = None  # applied by the wrapper to all gradients
        try:
            clone = type(optimizer).from_config(config)
        except Exception as error:
            raise TypeError(
                f"IntervalOptimizer clones the optimizer with "
                f"{type(optimizer).__name__}.from_config(optimizer.get_config()), which "
                f"failed: {error}. Give the optimizer class a working get_config/from_config."
            ) from error
        # No weight decay for intervals (AdamW refuses weight_decay=None in its
        # constructor; the base class skips weight decay when it is None).
        clone.weight_decay = None
        return clone

    # -- interval variables ---------------------------------------------------

    @_untracked
    def _set_intervals(self, variables):
        if callable(variables) and not isinstance(variables, tf.Variable):
            self._interval_source = variables
            self._interval_list = self._interval_keys = None
            return
        variables = list(variables)
        for v in variables:
            if not isinstance(v, tf.Variable):
                raise TypeError(
                    "interval_variables must be tf.Variables (see "
                    f"qil_keras.interval_variables(model)); got {type(v).__name__}."
                )
        self._interval_list = variables
        self._interval_keys = frozenset(_key(v) for v in variables)
        self._interval_source = None

    def _resolve(self):
        if self._interval_keys is None and self._interval_source is not None:
            self._set_intervals(self._interval_source())
        return self._interval_keys is not None

    @property
    def interval_variables(self):
        """The interval variables (``None`` while they are not known).

        With a callable, its current answer until the optimizer is built
        (building fixes the list).
        """
        if self._interval_list is not None:
            return list(self._interval_list)
        if self._interval_source is not None:
            return list(self._interval_source())
        return None

    @_untracked
    def set_interval_variables(self, variables):
        """Set the interval variables (a list, or a callable returning it).

        Needed after ``from_config`` (e.g. ``load_model``): if the optimizer
        was asked to build or to load a state meanwhile, it builds now and
        restores that state. Once built, only the same variables are accepted.
        """
        if self._qil_built:
            keys = frozenset(_key(v) for v in (variables() if callable(variables) else variables))
            if keys != self._interval_keys:
                raise ValueError(
                    "This IntervalOptimizer is already built with other interval "
                    "variables; make a new optimizer instead."
                )
            return
        self._set_intervals(variables)
        if self._pending_var_list is not None:
            with tf.init_scope():
                self.build(self._pending_var_list)

    def _split(self, items, get=lambda item: item):
        intervals = [x for x in items if _key(get(x)) in self._interval_keys]
        others = [x for x in items if _key(get(x)) not in self._interval_keys]
        return intervals, others

    # -- properties ---------------------------------------------------------------

    @property
    def weights_optimizer(self):
        """The user's optimizer (updates every non-interval variable)."""
        return self._weights_optimizer

    @property
    def interval_optimizer(self):
        """The clone that updates the interval variables."""
        return self._interval_optimizer

    @property
    def interval_lr_multiplier(self):
        return self._multiplier

    @property
    def train_weights(self):
        return self._train_weights

    @property
    def iterations(self):
        return self._weights_optimizer.iterations

    @property
    def learning_rate(self):
        """The weights' learning rate (the intervals': this times the multiplier)."""
        return self._weights_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self._weights_optimizer.learning_rate = learning_rate
        if isinstance(learning_rate, _Schedule):
            self._interval_optimizer._learning_rate = ScaledSchedule(
                learning_rate, self._multiplier)
        # A number is assigned to the weights' learning-rate variable, which
        # the interval optimizer's ScaledSchedule reads.

    @property
    def interval_learning_rate(self):
        """The intervals' learning rate at the current step (a tensor)."""
        opt = self._interval_optimizer
        return opt._learning_rate(opt.iterations)

    @property
    def variables(self):
        """The weights optimizer's variables, then the interval optimizer's."""
        return _CallableList(list(self._weights_optimizer.variables)
                             + list(self._interval_optimizer.variables))

    @property
    def use_ema(self):
        return self._weights_optimizer.use_ema

    @property
    def _built(self):  # read by keras.callbacks.BackupAndRestore
        return self._qil_built

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        if save_type == "savedmodel":
            # A SavedModel revives every optimizer node as a RestoredOptimizer,
            # whose step counter (attribute and first entry of its variable
            # list) needs a value; tf-keras does not restore optimizer state
            # from a SavedModel, so the step count is all this node keeps.
            iterations = self._weights_optimizer.iterations
            if self.__dict__.get("_saved_model_variables") is None:
                object.__setattr__(self, "_saved_model_variables",
                                   tf.__internal__.tracking.wrap([iterations]))
            return {"_iterations": iterations, "_variables": self._saved_model_variables}
        return super()._trackable_children(save_type, **kwargs)

    def __dir__(self):
        # Keras' .keras saving walks dir(optimizer) for nested optimizers; the
        # inner optimizers' state is saved by save_own_variables below, which
        # can wait for the interval variables on load.
        hidden = {"_weights_optimizer", "_interval_optimizer", "weights_optimizer",
                  "interval_optimizer"}
        return [name for name in super().__dir__() if name not in hidden]

    # -- building and applying ------------------------------------------------

    @_untracked
    def build(self, var_list):
        """Build both optimizers: intervals to one, the rest to the other.

        Before the interval variables are known (after ``from_config``) this
        only remembers ``var_list``; ``set_interval_variables`` builds.
        """
        if self._qil_built:
            return
        var_list = list(var_list)
        if not self._resolve():
            self._pending_var_list = var_list
            return
        intervals, others = self._split(var_list)
        weights_list = others if self._train_weights else []
        self._weights_optimizer.build(weights_list)
        self._interval_optimizer.build(intervals)
        for opt, group in ((self._weights_optimizer, weights_list),
                           (self._interval_optimizer, intervals)):
            unknown = [v.name for v in group if opt._var_key(v) not in opt._index_dict]
            if unknown:
                raise ValueError(
                    f"The optimizer {opt.name!r} was already built for other variables "
                    f"and cannot update {unknown}. Pass a fresh optimizer to "
                    "IntervalOptimizer, e.g. type(opt).from_config(opt.get_config())."
                )
        self._qil_built = True
        self._pending_var_list = None
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._assign_state(state)

    def _no_intervals_error(self):
        return RuntimeError(
            "This IntervalOptimizer does not know its interval variables (it was made "
            "by from_config, e.g. by load_model). Call "
            "qil_keras.attach_interval_variables(model), or "
            "optimizer.set_interval_variables(qil_keras.interval_variables(model)), "
            "before training."
        )

    @staticmethod
    def _skip_step(opt):
        """Count a step without updating anything (keeps both counters equal)."""

        def increment(strategy):
            opt.iterations.assign_add(1, read_value=False)

        tf.__internal__.distribute.interim.maybe_merge_call(
            increment, opt._distribution_strategy)

    def aggregate_gradients(self, grads_and_vars):
        return self._weights_optimizer.aggregate_gradients(grads_and_vars)

    def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False,
                        **kwargs):
        """Split ``grads_and_vars`` into intervals and the rest; apply each.

        The gradients are all-reduced here once (unless
        ``skip_gradients_aggregation``) and global-norm clipped all together
        (the user's ``global_clipnorm``); the inner optimizers apply them
        without aggregating again.
        """
        grads_and_vars = list(grads_and_vars)
        if not grads_and_vars:
            return self.iterations
        aggregate = kwargs.pop("experimental_aggregate_gradients", True)
        with tf.init_scope():
            self.build([v for _, v in grads_and_vars])
        if not self._qil_built:
            raise self._no_intervals_error()
        # Only the gradients of what trains take part (in all-reduce and clipping).
        intervals, others = self._split(grads_and_vars, get=lambda pair: pair[1])
        grads_and_vars = ((others if self._train_weights else [])
                          + (intervals if self._multiplier != 0 else []))
        if all(g is None for g, _ in grads_and_vars):
            if self._train_weights or not intervals:
                raise ValueError(
                    "No gradients provided for any variable: "
                    f"{[v.name for _, v in grads_and_vars]}.")
            self._skip_step(self._weights_optimizer)  # nothing trains this step
            self._skip_step(self._interval_optimizer)
            return self.iterations
        if aggregate and not skip_gradients_aggregation:
            grads_and_vars = self.aggregate_gradients(grads_and_vars)
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        clip = self._weights_optimizer.global_clipnorm
        if clip is not None:
            grads, variables = zip(*grads_and_vars)
            grads, _ = tf.clip_by_global_norm(list(grads), clip)
            grads_and_vars = list(zip(grads, variables))
        intervals, others = self._split(grads_and_vars, get=lambda pair: pair[1])
        with tf.name_scope(name or self.name):
            if others:
                self._weights_optimizer.apply_gradients(
                    others, skip_gradients_aggregation=True)
            else:
                self._skip_step(self._weights_optimizer)
            if intervals:
                self._interval_optimizer.apply_gradients(
                    intervals, skip_gradients_aggregation=True)
            else:
                self._skip_step(self._interval_optimizer)
        return self.iterations

    def update_step(self, gradient, variable):
        raise NotImplementedError("IntervalOptimizer delegates updates to its inner optimizers.")

    def finalize_variable_values(self, var_list):
        if not self._qil_built:
            return
        intervals, others = self._split(list(var_list))
        if self._train_weights:
            self._weights_optimizer.finalize_variable_values(others)
        self._interval_optimizer.finalize_variable_values(intervals)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exclude variables of the network from the weights optimizer's weight decay.

        (Interval variables never get weight decay.)
        """
        self._weights_optimizer.exclude_from_weight_decay(var_list, var_names)

    # -- state -------------------------------------------------------------------------

    def _state_from(self, weights, intervals):
        return {"weights": [np.asarray(w) for w in weights],
                "intervals": [np.asarray(w) for w in intervals]}

    def _assign_state(self, state):
        if "flat" in state:
            state = self._split_flat(state["flat"])
        for key, opt in (("weights", self._weights_optimizer),
                         ("intervals", self._interval_optimizer)):
            values, variables = state[key], opt.variables
            if len(values) != len(variables):
                _LOG.warning(
                    "Skipping the state of %s: it has %d variables, the saved one %d "
                    "(saved before it was built, or for other variables).",
                    opt.name, len(variables), len(values))
                continue
            for variable, value in zip(variables, values):
                if tuple(variable.shape) != np.shape(value):
                    raise ValueError(
                        f"Optimizer variable {variable.name} has shape {variable.shape}, "
                        f"the saved value {np.shape(value)}."
                    )
                variable.assign(value)

    def save_own_variables(self, store):
        """``.keras`` saving: ``w<i>`` weights optimizer, ``i<i>`` interval optimizer."""
        if self._pending_state is not None:
            state = self._pending_state  # loaded, not attached yet: keep it
            if "flat" in state:  # from .h5: where the two optimizers split is not known
                _LOG.warning("Not saving the optimizer state loaded from .h5: call "
                             "attach_interval_variables(model) before saving.")
                return
        else:
            state = self._state_from([v.numpy() for v in self._weights_optimizer.variables],
                                     [v.numpy() for v in self._interval_optimizer.variables])
        for prefix, key in (("w", "weights"), ("i", "intervals")):
            for i, value in enumerate(state[key]):
                store[f"{prefix}{i}"] = value

    @_untracked
    def load_own_variables(self, store):
        keys = list(store.keys())

        def values(prefix):
            count = sum(1 for k in keys if k.startswith(prefix) and k[1:].isdigit())
            return [np.asarray(store[f"{prefix}{i}"]) for i in range(count)]

        state = self._state_from(values("w"), values("i"))
        if self._qil_built:
            self._assign_state(state)
        else:
            self._pending_state = state

    @_untracked
    def set_weights(self, weights):
        """Set the state from a list ordered as ``variables`` (``.h5`` loading)."""
        weights = [np.asarray(w) for w in weights]
        if not self._qil_built:
            self._pending_state = {"flat": weights}
            return
        self._assign_state(self._split_flat(weights))

    def _split_flat(self, weights):
        n = len(self._weights_optimizer.variables)
        if len(weights) != n + len(self._interval_optimizer.variables):
            raise ValueError(
                f"Expected {n + len(self._interval_optimizer.variables)} optimizer "
                f"weights, got {len(weights)}."
            )
        return self._state_from(weights[:n], weights[n:])

    # -- config ---------------------------------------------------------------------

    def get_config(self):
        return {
            "optimizer": keras.optimizers.serialize(self._weights_optimizer),
            "interval_lr_multiplier": self._multiplier,
            "train_weights": self._train_weights,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The optimizer without its interval variables: see ``set_interval_variables``."""
        config = dict(config)
        inner = config.pop("optimizer")
        if not isinstance(inner, keras.optimizers.Optimizer):
            inner = keras.optimizers.deserialize(
                inner, custom_objects=custom_objects, use_legacy_optimizer=False)
        return cls(inner, None, **config)


# -- conveniences -------------------------------------------------------------------------


def build_optimizer(model, variables=None):
    """Create ``model.optimizer``'s slot variables now, for ``variables`` (default: the model's
    trainable variables).

    The first ``fit`` after ``compile`` otherwise creates them inside its ``tf.function``, which
    TensorFlow then traces twice; building first makes it trace once
    (``tests/training/test_model_fit.py``). Optimizers other than tf-keras ones (a LossScaleOptimizer, say)
    are left to build themselves.
    """
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, (keras.optimizers.Optimizer, IntervalOptimizer)):
        return
    with model.distribute_strategy.scope():
        optimizer.build(list(model.trainable_variables if variables is None else variables))


def qil_optimizer(model, optimizer, interval_lr_multiplier=1.0, train_weights=True):
    """An ``IntervalOptimizer`` for the interval variables of ``model``.

    For a model that is not built yet the variables are looked up when the
    optimizer is built (first training step).
    """
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"qil_optimizer expects a tf-keras model, got {type(model).__name__}.")
    if model.built:
        found = interval_variables(model)
        if not found:
            raise ValueError(
                f"Model {model.name!r} has no QIL interval variables (no QIL layers or "
                "QIL-quantized tfmot wrappers); use the optimizer directly."
            )
        source = found
    else:
        source = lambda: interval_variables(model)  # noqa: E731
    return IntervalOptimizer(optimizer, source, interval_lr_multiplier=interval_lr_multiplier,
                             train_weights=train_weights)


def attach_interval_variables(model):
    """Give ``model.optimizer`` (an IntervalOptimizer) the interval variables of ``model``.

    Call it after ``keras.models.load_model`` (the saved config cannot name the
    variables); the optimizer then builds and restores the loaded state.
    Also drops ``model.train_function`` so that the next ``fit`` traces anew
    (needed when a ``fit`` failed before the variables were attached).
    Returns the IntervalOptimizer.
    """
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if not isinstance(optimizer, IntervalOptimizer):
        raise TypeError(
            f"model.optimizer is {type(optimizer).__name__}, not an IntervalOptimizer."
        )
    optimizer.set_interval_variables(interval_variables(model))
    # A fit() before attaching failed while tracing the train function; a
    # fresh trace avoids tf.function's "Creating variables on a non-first call".
    model.train_function = None
    return optimizer
