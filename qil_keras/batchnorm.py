"""BatchNormalization for quantization-aware training: batch statistics first, then frozen.

Low-bit weights jump between levels from one step to the next, and BatchNorm's moving
statistics (an average over past steps) then lag behind the statistics of the current weights.
A model trained with batch statistics but evaluated with moving ones loses accuracy in
inference mode, and loses more the longer it trains (issue #16 measured 88 % training-mode
against 64 % inference-mode top-1 on the training images of a 2/2 net).

:class:`QILBatchNormalization` follows Jacob et al., "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, §3.2: for the first
``freeze_after`` training steps it is an ordinary BatchNormalization (normalizes with the batch
statistics and updates the moving ones); from then on it normalizes with the moving statistics in
training too and stops updating them, so that training optimizes the very function that runs in
inference and in the integer file (where BatchNorm is folded into the conv with its moving
statistics). ``γ`` and ``β`` keep training. Over the last ``freeze_ramp`` steps before the freeze
the output blends linearly from the batch-normalized to the moving-normalized one, so that the
freeze does not change the function in one step (see DEFAULT_FREEZE_RAMP: on the quickstart CNN
at 2/2 with SGD + momentum an abrupt freeze sent the epoch's training loss from 0.26 to 2.45). :func:`qil_keras.set_bits` restarts the count when a
layer's bits change (a progressive stage re-estimates the statistics of its new grid, then
freezes them again).

The step count is a non-trainable int32 variable (checkpointed with the model; under
``tf.distribute`` it is updated once per step, ``ONLY_FIRST_REPLICA``). While counting, the
moving statistics of a replica follow its own batch, as in Keras' BatchNormalization.
"""

from ._keras import keras, tf

__all__ = ["QILBatchNormalization", "DEFAULT_FREEZE_AFTER", "restart_batchnorm_statistics"]

# Steps of batch statistics before the freeze: long enough for a moving average of momentum 0.99
# (time constant 100 steps) to settle on the quantized weights' statistics. Tried on a 2/2
# depthwise-residual net on MNIST digits (one seed each, Adam 1e-3, scripts not committed): with
# a constant learning rate, only the freeze after 200 steps both closed the training/inference
# gap and kept the best accuracy; with a cosine schedule plain BatchNorm ended better. Not yet
# measured over seeds (issue #16).
DEFAULT_FREEZE_AFTER = 200
# Steps of the blend before the freeze. On the quickstart CNN at 2/2, SGD(0.01, momentum 0.9)
# with the interval learning rate at 0.01x: test top-1 58.6 % after 4 epochs with an abrupt
# freeze at step 200, 75.7 % with this ramp (one seed, constant learning rate).
DEFAULT_FREEZE_RAMP = 100


def check_freeze_after(value, name="freeze_after"):
    """``value`` if it is a step count (an int >= 0) or ``None``, else a ValueError naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be an int >= 0 (training steps) or None, got {value!r}.")
    return value


@keras.utils.register_keras_serializable(package="qil_keras")
class QILBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose statistics freeze after ``freeze_after`` steps.

    Args:
      freeze_after: training steps that use (and update) batch statistics; after them the layer
        normalizes with its moving statistics in training as in inference. ``None``: never
        freeze (a plain BatchNormalization). ``0``: frozen from the first step.
      freeze_ramp: the last this many of those steps blend the output towards the
        moving-statistics one (weight ``1/R, 2/R, ...``); ``0``: an abrupt freeze.
      **kwargs: ``keras.layers.BatchNormalization``'s arguments.
    """

    def __init__(self, *args, freeze_after=DEFAULT_FREEZE_AFTER, freeze_ramp=DEFAULT_FREEZE_RAMP,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.freeze_after = check_freeze_after(freeze_after)
        self.freeze_ramp = check_freeze_after(freeze_ramp, "freeze_ramp") or 0

    def build(self, input_shape):
        super().build(input_shape)  # the four BatchNorm weights first: set_weights order
        self.batch_steps = self.add_weight(
            "batch_steps", (), dtype=tf.int32, initializer="zeros", trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @property
    def frozen(self):
        """Whether training now normalizes with the moving statistics (Python bool)."""
        return self.freeze_after is not None and int(self.batch_steps.numpy()) >= self.freeze_after

    def restart(self):
        """Use batch statistics again for the next ``freeze_after`` training steps."""
        self.batch_steps.assign(0)

    def call(self, inputs, training=None, mask=None):
        training = self._get_training_value(training)
        if self.freeze_after is None or training is False:
            return super().call(inputs, training=training, mask=mask)
        steps = self.batch_steps
        use_batch = tf.logical_and(tf.cast(training, tf.bool), steps < self.freeze_after)
        parent = super()
        ramp = min(self.freeze_ramp, self.freeze_after)
        if ramp == 0:
            outputs = parent.call(inputs, training=use_batch, mask=mask)
        else:
            # The last `ramp` batch steps blend towards the moving statistics, so that the
            # freeze does not change the function in one step; the other steps run one
            # BatchNorm, as Keras' does.
            def blended():
                moving = parent.call(inputs, training=False, mask=mask)  # before the update
                with tf.control_dependencies([moving]):
                    batch = parent.call(inputs, training=True, mask=mask)
                weight = tf.cast(steps - (self.freeze_after - ramp) + 1, batch.dtype) / ramp
                return batch + weight * (moving - batch)

            in_ramp = tf.logical_and(use_batch, steps >= self.freeze_after - ramp)
            if self.synchronized:
                # A synchronized BatchNorm all-reduces its moments across replicas, which
                # tf.distribute refuses inside tf.cond: blend on every step (weight 0 outside
                # the ramp), at the cost of a second BatchNorm per step.
                moving = parent.call(inputs, training=False, mask=mask)  # before the update
                with tf.control_dependencies([moving]):
                    batch = parent.call(inputs, training=use_batch, mask=mask)
                weight = tf.clip_by_value(tf.cast(steps - (self.freeze_after - ramp) + 1,
                                                  batch.dtype) / ramp, 0.0, 1.0)
                outputs = batch + tf.where(in_ramp, weight, 0.0) * (moving - batch)
            else:
                outputs = tf.cond(in_ramp, blended,
                                  lambda: parent.call(inputs, training=use_batch, mask=mask))
        with tf.control_dependencies([outputs]):
            self.batch_steps.assign_add(tf.cast(use_batch, tf.int32))
        return outputs

    def get_config(self):
        config = super().get_config()
        config["freeze_after"] = self.freeze_after
        config["freeze_ramp"] = self.freeze_ramp
        return config


def restart_batchnorm_statistics(model):
    """Restart the batch-statistics phase of every :class:`QILBatchNormalization` in ``model``."""
    count = 0
    for layer in model.layers:
        if isinstance(layer, QILBatchNormalization) and layer.built:
            layer.restart()
            count += 1
    return count
