"""The moment between the last epoch's training and its validation, as a callback hook.

tf-keras' ``evaluate`` (which ``fit`` runs for validation) makes its test function *before* it
calls ``on_test_begin``, and holds on to it for the whole run. Work done in ``on_test_begin``
that a traced step reads only when it is traced (an input quantizer's ``extra_steps``, which
the fit-end snap may widen: ``qil_keras.quantize.untie_inputs``) therefore reaches the
next validation, not this one. ``LastEpochCallback`` runs its ``before_last_validation`` at
the end of the last epoch's last training batch instead, where ``fit`` knows the number of
steps; where it does not (a dataset of unknown length), at ``on_test_begin`` as before.
"""

from .._keras import keras

__all__ = ["LastEpochCallback"]


class LastEpochCallback(keras.callbacks.Callback):
    """Calls ``before_last_validation()`` once the last epoch's training steps are done,
    before that epoch's validation function is made; a subclass that overrides
    ``on_epoch_begin`` or ``on_train_batch_end`` calls ``super()``'s."""

    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # the batch hook leaves the step's logs as tensors
        self._epoch = None

    def before_last_validation(self):
        raise NotImplementedError

    def in_last_epoch(self):
        """Whether ``fit`` is running its last epoch (``False`` outside ``fit``)."""
        epochs = (self.params or {}).get("epochs")
        return self._epoch is not None and epochs is not None and self._epoch == epochs - 1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # with steps_per_execution > 1 Keras reports the last step of each execution; the
        # last one is steps - 1
        steps = (self.params or {}).get("steps")
        if steps and batch == steps - 1 and self.in_last_epoch():
            self.before_last_validation()

    def on_train_end(self, logs=None):
        self._epoch = None
