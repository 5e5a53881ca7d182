"""The one place that chooses which Keras qil_keras runs on.

tfmot 0.8.1 supports only tf-keras (Keras 2), so qil_keras is built on
tf-keras. Everything else in the package imports ``keras`` and ``tf`` from
here, and ``check_model`` turns a Keras 3 or subclassed model into an error
that says what to do.

TensorFlow's C++ start-up log (oneDNN, CUDA drivers, CPU features) is captured
when this module imports TensorFlow, so that scripts start with their own
output; ``QIL_KERAS_VERBOSE=1`` lets it through, and
``tensorflow_startup_log`` returns it.
"""

import contextlib
import os
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__all__ = ["keras", "tf", "check_model", "is_keras3_object", "tensorflow_startup_log"]

#: Set to 1 to let TensorFlow print its start-up log (oneDNN, CUDA, CPU features) as it does.
VERBOSE_ENV = "QIL_KERAS_VERBOSE"
_STARTUP_LOG = ""


@contextlib.contextmanager
def _captured_output(fds=(2,)):
    """Send the file descriptors ``fds`` (2: stderr, 1: stdout) to a temporary file for the
    block; yield a list that receives the captured text. TensorFlow's C++ messages go to the
    descriptors directly, past ``sys.stderr``. If the block raises, the captured text is
    written to stderr before the error propagates."""
    text = []
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    with tempfile.TemporaryFile(mode="w+b") as capture:
        for fd in fds:
            os.dup2(capture.fileno(), fd)
        failed = False
        try:
            yield text
        except BaseException:
            failed = True
            raise
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            capture.seek(0)
            text.append(capture.read().decode(errors="replace"))
            if failed:
                sys.stderr.write(text[-1])


def verbose():
    """True when ``QIL_KERAS_VERBOSE`` asks for TensorFlow's own logs."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def quiet_native_logs():
    """Hide what TensorFlow's C++ code prints in the block (the TFLite converter's log lines)
    unless ``verbose``; shown after all if the block raises."""
    if verbose():
        yield
        return
    with _captured_output((1, 2)):
        yield


def _import_tensorflow():
    """Import TensorFlow and tf-keras, and initialize TensorFlow's devices, with the start-up
    log captured (see ``tensorflow_startup_log``); as a plain import when TensorFlow is
    already imported or ``QIL_KERAS_VERBOSE=1``."""
    global _STARTUP_LOG
    if "tensorflow" in sys.modules or verbose():
        import tensorflow
        import tf_keras
        return tensorflow, tf_keras
    with _captured_output() as text:
        import tensorflow
        import tf_keras
        # Device discovery prints the CUDA messages; run it now, inside the capture.
        tensorflow.config.list_physical_devices()
    _STARTUP_LOG = "".join(text)
    return tensorflow, tf_keras


def tensorflow_startup_log():
    """What TensorFlow printed while qil_keras imported it (empty if it printed directly)."""
    return _STARTUP_LOG


tf, keras = _import_tensorflow()

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
        hint = ""
        if isinstance(getattr(model, "final_model", None), keras.Model):
            hint = " (the result of a progressive or distillation run: pass its .final_model)"
        raise TypeError(
            f"Expected a tf-keras Sequential or Functional model as {what}, "
            f"got {type(model).__name__}{hint}."
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
