"""The one place that chooses which Keras qil_keras runs on.

tfmot 0.8.1 supports only tf-keras (Keras 2), so qil_keras is built on
tf-keras. Everything else in the package imports ``keras`` and ``tf`` from
here, and :func:`check_model` turns a Keras 3 or subclassed model into an error
that says what to do.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf", "check_model", "is_keras3_object"]

_KERAS3_HINT = (
    "qil_keras works on tf-keras (Keras 2) models, because tfmot supports only "
    "tf-keras. Build the model with `import tf_keras as keras` (or set "
    "TF_USE_LEGACY_KERAS=1 before importing TensorFlow so that `tf.keras` is "
    "tf-keras), and load saved Keras 3 models with tf_keras after re-saving "
    "them as weights."
)


def is_keras3_object(obj):
    """True when ``obj`` is a Keras 3 layer or model (not tf-keras)."""
    for cls in type(obj).__mro__:
        module = cls.__module__ or ""
        if module == "keras" or module.startswith("keras.src") or module.startswith("keras."):
            return True
    return False


def check_model(model, what="model"):
    """Raise a clear error unless ``model`` is a built tf-keras graph model."""
    if is_keras3_object(model):
        raise TypeError(f"Got a Keras 3 {type(model).__name__}. {_KERAS3_HINT}")
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a tf-keras Sequential or Functional model as {what}, "
            f"got {type(model).__name__}."
        )
    is_sequential = isinstance(model, keras.Sequential)
    if not is_sequential and not getattr(model, "_is_graph_network", False):
        raise TypeError(
            f"{type(model).__name__} is a subclassed model; qil_keras can only "
            "rewrite Sequential or Functional models, whose layer graph is "
            "known. Rebuild it with the functional API (inputs = "
            "keras.Input(...); outputs = ...; keras.Model(inputs, outputs)), or "
            "use qil_keras layers (QILConv2D, QILDense, QILActivation) inside "
            "your subclassed model directly."
        )
    if not model.built or (is_sequential and not getattr(model, "_is_graph_network", False)
                           and getattr(model, "_build_input_shape", None) is None):
        raise ValueError(
            f"{what} is not built: its input shape is unknown. Give the first "
            "layer an input shape (keras.Input(shape=...)) or call "
            "model.build(input_shape) before quantizing."
        )
