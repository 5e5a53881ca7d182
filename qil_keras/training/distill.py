"""Quantize a float model with data from other classes (Jung et al. 2019, §4.3).

The paper quantizes a float network using images whose classes it was never
trained on (a CIFAR-100 superclass split). Without labels for those images,
the float model's outputs are the targets: the QIL model is trained to match
them (knowledge distillation, Hinton et al. 2015, loss
``T² · KL(softmax(t/T) ‖ softmax(s/T))``). Weights can train jointly with
the intervals or stay frozen (``quantizer_only=True``).
"""

from .._keras import keras, tf
from .progressive import (ProgressiveResult, Stage, _first_stage_model, _stage_optimizer,
                          compiled_loss_and_metrics, evaluable_copy, fresh_copies,
                          move_to_stage)
from .model import end_of_fit_callbacks
from .optimizers import build_optimizer

__all__ = ["Distiller", "quantize_with_distillation"]


def _ends_in_softmax(model):
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return isinstance(last, keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax"


class Distiller(keras.Model):
    """Trains ``student`` to reproduce ``teacher``'s outputs on unlabelled inputs.

    ``fit`` takes inputs ``x``; labels, where the data carries them, do not enter the loss
    but update the metrics given to ``compile`` (the student's outputs against them).
    ``from_logits``: whether both models output logits (else probabilities).
    """

    def __init__(self, student, teacher, temperature=1.0, from_logits=True, **kwargs):
        super().__init__(**kwargs)
        self.student, self.teacher = student, teacher
        self.temperature, self.from_logits = float(temperature), bool(from_logits)
        self.loss_tracker = keras.metrics.Mean(name="distillation_loss")

    def _soft(self, outputs):
        if self.from_logits:
            return tf.nn.softmax(outputs / self.temperature)
        if self.temperature == 1.0:
            return outputs
        return tf.nn.softmax(tf.math.log(tf.maximum(outputs, 1e-12)) / self.temperature)

    def distillation_loss(self, teacher_outputs, student_outputs):
        target = self._soft(teacher_outputs)
        prediction = tf.clip_by_value(self._soft(student_outputs), 1e-12, 1.0)
        kl = tf.reduce_sum(target * (tf.math.log(tf.maximum(target, 1e-12)) - tf.math.log(prediction)),
                           axis=-1)
        return tf.reduce_mean(kl) * self.temperature ** 2

    @property
    def metrics(self):
        compiled = getattr(self, "compiled_metrics", None)
        return [self.loss_tracker] + (list(compiled.metrics) if compiled is not None else [])

    def _step_results(self, loss, y, student_outputs, sample_weight):
        self.loss_tracker.update_state(loss)
        if y is not None and self.compiled_metrics is not None:
            self.compiled_metrics.update_state(y, student_outputs, sample_weight)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_outputs = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            student_outputs = self.student(x, training=True)
            loss = self.distillation_loss(teacher_outputs, student_outputs)
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        return self._step_results(loss, y, student_outputs, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        student_outputs = self.student(x, training=False)
        loss = self.distillation_loss(self.teacher(x, training=False), student_outputs)
        return self._step_results(loss, y, student_outputs, sample_weight)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)


def quantize_with_distillation(float_model, x, *, stages=((4, 4),), epochs_per_stage=1,
                               batch_size=None, optimizer=None, temperature=1.0,
                               quantizer_only=False, interval_lr_multiplier=1.0,
                               calibration_data=None, first_last_bits=8, validation_data=None,
                               metrics=None, verbose="auto", **quantize_options):
    """Quantize ``float_model`` with unlabelled inputs ``x``, distilling its outputs.

    Args:
      float_model: trained float model (the teacher; untouched).
      x: inputs of any classes (array or ``tf.data.Dataset``; labels ignored).
      stages, epochs_per_stage, optimizer, interval_lr_multiplier, first_last_bits, **quantize_options: as for
        ``qil_keras.progressive_fit``.
      temperature: distillation temperature ``T``.
      quantizer_only: keep the float weights and BatchNorm frozen; train the
        intervals only.
      calibration_data: a batch for the initial intervals (default: from ``x``).
      metrics: reported against the labels of ``validation_data`` (and of ``x``
        where it has labels); default: the metrics ``float_model`` was compiled with.

    Returns:
      ``qil_keras.progressive.ProgressiveResult`` (one model per stage).
    """
    stage_list = [Stage.coerce(spec, f"stages[{i}]") for i, spec in enumerate(stages)]
    if calibration_data is None:
        calibration_data = x if isinstance(x, tf.data.Dataset) else x[:256]
    student = _first_stage_model(float_model, stage_list[0], first_last_bits, calibration_data,
                                 quantizer_only, quantize_options)
    optimizer = optimizer if optimizer is not None else keras.optimizers.Adam(1e-3)
    from_logits = not _ends_in_softmax(float_model)
    # the float model's loss (if it was compiled) scores the student's stage models on labels
    float_loss, float_metrics = compiled_loss_and_metrics(float_model)
    metrics = float_metrics if metrics is None else metrics
    result = ProgressiveResult(stage_list, [], [], [])
    for index, stage in enumerate(stage_list, start=1):
        move_to_stage(student, stage, first_last_bits)
        stage_optimizer = _stage_optimizer(student, optimizer, stage, index,
                                           interval_lr_multiplier, quantizer_only)
        distiller = Distiller(student, float_model, temperature, from_logits)
        distiller.compile(optimizer=stage_optimizer, metrics=fresh_copies(metrics))
        build_optimizer(distiller, student.trainable_variables)
        epochs = stage.epochs if stage.epochs is not None else epochs_per_stage
        # Distiller.fit is not the student's fit: what the student's fit does at its end
        # (BatchNorm re-estimation, then the integer snap) is added here.
        history = distiller.fit(x, batch_size=batch_size, epochs=epochs,
                                validation_data=validation_data,
                                callbacks=end_of_fit_callbacks(student, x), verbose=verbose)
        result.models.append(evaluable_copy(student, float_loss, metrics))
        result.histories.append({k: [float(v) for v in vals] for k, vals in history.history.items()})
        result.checkpoints.append(None)
    return result
