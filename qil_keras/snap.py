"""``qil_keras.snap_to_integer``: make a QIL model's biases ones the integer file can hold.

An int8 conv adds its bias in int32 units of ``u = s_in · s_w`` (input scale
times weight scale, per output channel). QIL's low-bit grids make that unit
coarse: at 2/2 bits it is a sizeable part of the output step, so a
continuous Keras bias (BatchNorm folded in, minus the QIL lower threshold
``c - d``) rounds differently in the file for 1-4 % of images. Likewise the
threshold after a residual add is exported rounded to that branch's 8-bit
step (see :mod:`qil_keras.lowering`).

``snap_to_integer`` moves each of these parameters, in the Keras model, to
the nearest value the file holds exactly: BatchNorm ``β`` (or the moving
mean when the BN has no ``β``, or the conv bias when there is no BN) by at
most half a unit ``u`` per channel (onto ``b_int·u``, or onto ``b_int·u``
plus a fixed offset where the kernels that run the file round twice), and
``c`` of a QIL activation after an add by less than half that branch's step.
The Keras model then computes what the integer file computes; its accuracy
is the deployed accuracy.
:func:`qil_keras.export_tflite` calls it (``snap=True``) and reports the
moves. Call it again after any further training.
"""

import dataclasses

import numpy as np

from ._keras import keras
from .lowering import lower

__all__ = ["snap_to_integer", "SnapReport"]


@dataclasses.dataclass
class SnapReport:
    """What :func:`snap_to_integer` moved: per layer, the largest move in bias units."""

    bias_moves: dict          # layer -> largest |move| / unit (≤ 0.5)
    threshold_moves: dict     # QIL activation -> |move| of c
    not_snapped: list         # weight layers whose bias has no parameter to move

    @property
    def largest_bias_move(self):
        return max(self.bias_moves.values(), default=0.0)


def snap_to_integer(model, *, weight_storage="int8", float_ranges=None, kernels="xnnpack"):
    """Move biases and post-add thresholds of ``model`` (in place) onto the integer grid.

    ``weight_storage`` must match the export's: the bias unit ``s_in · s/m``
    depends on the weight multiplier ``m`` (see ``WeightPlan.multiplier``).
    ``float_ranges``: calibrated 8-bit ranges of float leftovers, as the
    export measures them. ``kernels``: ``"xnnpack"`` or ``"builtin"``, the
    kernels that will run the file (their rounding differs; see
    ``qil_keras.lowering._Lowering._requantization``).
    Returns a :class:`SnapReport`.
    """
    thresholds = {}
    _, _, lowering = lower(model, weight_storage=weight_storage, float_ranges=float_ranges,
                          kernels=kernels)
    for name, (lo, exported) in lowering.add_thresholds.items():
        c = model.get_layer(name).quantizer_vars["c"]
        c.assign(c.numpy() + np.float32(exported - lo))
        thresholds[name] = float(abs(exported - lo))

    moves, skipped = {}, []
    _, _, lowering = lower(model, weight_storage=weight_storage, float_ranges=float_ranges,
                          kernels=kernels)
    for name, (bias, representable, unit, owner) in lowering.bias_residuals.items():
        delta = representable - bias
        if owner is None:
            if np.any(delta != 0):
                skipped.append(name)
            continue
        if isinstance(owner, keras.layers.BatchNormalization):
            if owner.center:
                owner.beta.assign(owner.beta.numpy() + delta.astype(np.float32))
            else:  # B = (b - μ)·a + β: move μ by -δ/a
                gamma = owner.gamma.numpy() if owner.scale else 1.0
                a = gamma / np.sqrt(owner.moving_variance.numpy() + owner.epsilon)
                owner.moving_mean.assign(owner.moving_mean.numpy()
                                         - (delta / np.where(a == 0, 1.0, a)).astype(np.float32))
        else:
            owner.bias.assign(owner.bias.numpy() + delta.astype(np.float32))
        moves[name] = float(np.max(np.abs(delta) / unit))
    return SnapReport(moves, thresholds, skipped)
