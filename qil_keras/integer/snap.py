"""``qil_keras.snap_to_integer``: make a QIL model's biases ones the integer file can hold.

An int8 conv adds its bias in int32 units of ``u = s_in · s_w`` (input scale
times weight scale, per output channel). QIL's low-bit grids make that unit
coarse: at 2/2 bits it is a sizeable part of the output step, so a
continuous Keras bias (BatchNorm folded in, minus the QIL lower threshold
``c - d``) rounds differently in the file for some images (development runs). Likewise the
threshold after a residual add is exported rounded to that branch's 8-bit
step (see ``qil_keras.lowering``).

``snap_to_integer`` moves each of these parameters, in the Keras model, to
the nearest value the file holds exactly: BatchNorm ``β`` (or the moving
mean when the BN has no ``β``, or the conv bias when there is no BN) by at
most half a unit ``u`` per channel (onto ``b_int·u``, or onto ``b_int·u``
plus a fixed offset where the kernels that run the file round twice), and
``c`` of a QIL activation after an add by less than half that branch's step.
A QIL activation after an add also gets its step moved (``c`` and ``d``
together, its lower threshold kept) by the smallest factor that keeps every
value the add can produce away from a rounding boundary, where Keras'
float32 and the kernels' fixed point could round it apart; and a conv or
dense whose input is a low-bit QIL activation gets, per channel, the int32
bias (a few units at most) that keeps every sum it can produce away from its
output's rounding boundaries (see ``qil_keras.ties``), under XNNPACK's and the
builtin kernels' rounding at once where it can; a channel whose sums are too
dense for that (an 8-bit output) first gets its BatchNorm ``γ`` moved (at most
3 %) so that its requantization multiplier is a fraction ``p/q``
(``ties.rational_scale_factors``); so does a channel with too many sums to
enumerate (8-bit inputs), whose bias the guard then chooses from one sum per phase.
The Keras model then computes what the integer file computes; its accuracy
is the deployed accuracy.
``qil_keras.export_tflite`` calls it on its copy (``snap=True``) and reports the
moves; the ``fit`` of a model from ``qil_keras.quantize`` calls it at its end
(``qil_keras.model``), so the model the user evaluates is already the snapped one.
"""

import dataclasses

import numpy as np

from . import ties
from .._keras import keras
from .lowering import lower

__all__ = ["snap_to_integer", "SnapReport"]


@dataclasses.dataclass
class SnapReport:
    """What ``snap_to_integer`` moved: per layer, the largest move in bias units."""

    bias_moves: dict          # layer -> largest |move| / unit (≤ 0.5)
    threshold_moves: dict     # QIL activation -> |move| of c
    not_snapped: list         # weight layers whose bias has no parameter to move
    step_moves: dict = dataclasses.field(default_factory=dict)  # QIL activation -> f - 1
    near_ties: dict = dataclasses.field(default_factory=dict)   # activation or layer -> count
    ties_left: list = dataclasses.field(default_factory=list)   # adds/layers not fully cleared
    bias_tie_moves: dict = dataclasses.field(default_factory=dict)  # layer -> largest |j| units
    # layer -> channels with a sum that XNNPACK and the builtin kernels round apart (no bias
    # move keeps every sum off both kernel sets' ties; see qil_keras.integer.ties.bias_offsets)
    kernel_dependent: dict = dataclasses.field(default_factory=dict)
    # layer -> largest |f - 1| of the BatchNorm γ moves that make a kernel-dependent channel's
    # multiplier rational (qil_keras.integer.ties.rational_scale_factors)
    scale_moves: dict = dataclasses.field(default_factory=dict)

    @property
    def largest_bias_move(self):
        return max(self.bias_moves.values(), default=0.0)


def snap_to_integer(model, *, weight_storage="int8", float_ranges=None, kernels="xnnpack",
                    lowering=None):
    """Move biases and post-add thresholds of ``model`` (in place) onto the integer grid.

    ``weight_storage`` must match the export's: the bias unit ``s_in · s/m``
    depends on the weight multiplier ``m`` (see ``WeightPlan.multiplier``).
    ``float_ranges``: calibrated 8-bit ranges of float leftovers, as the
    export measures them. ``kernels``: ``"xnnpack"`` or ``"builtin"``, the
    kernels that will run the file (their rounding differs; see
    ``qil_keras.integer.emission._Emitter._requantization``). ``lowering``: the
    ``lower(model, ...)[2]`` of the model as it is now, with these settings, if the caller has
    one (the export does); the model is lowered again only after a move.
    Returns a ``SnapReport``.
    """
    def lowered():
        return lower(model, weight_storage=weight_storage, float_ranges=float_ranges,
                     kernels=kernels)[2]

    thresholds = {}

    def snap_thresholds(lowering):
        """Move them; return whether a variable changed."""
        changed = False
        for name, (lo, exported) in lowering.add_thresholds.items():
            c = model.get_layer(name).quantizer_vars["c"]
            c_eff, d_eff = model.get_layer(name).interval()
            # Move the effective c' = d' + |c - d'|: the raw c where c ≥ d' (c' = c bit for
            # bit), c' itself where the lower threshold is reflected (c < d').
            before = c.numpy()
            base = before if before >= np.float32(d_eff) else np.float32(c_eff)
            c.assign(base + np.float32(exported - lo))
            changed = changed or bool(np.any(c.numpy() != before))
            thresholds[name] = max(thresholds.get(name, 0.0), float(abs(exported - lo)))
        return changed

    if lowering is None:
        lowering = lowered()
    if snap_thresholds(lowering):
        lowering = lowered()

    # Moving one step changes the input scale of the next add: check again until nothing moves.
    step_moves, found, left = {}, {}, []
    for _ in range(_TIE_PASSES):
        moved, left = False, []
        for name, residual in lowering.residual_sums.items():
            factor, count = ties.step_factor(residual)
            if count:
                found.setdefault(name, count)
            if factor is None:
                left.append(name)
            elif factor != 1.0:
                _scale_step(model.get_layer(name), factor)
                step_moves[name] = (1.0 + step_moves.get(name, 0.0)) * factor - 1.0
                moved = True
        if not moved:
            break
        lowering = lowered()
    else:  # still moving after the last pass: say which adds are not cleared
        left = [name for name, residual in lowering.residual_sums.items()
                if ties.step_factor(residual)[0] != 1.0]
    if step_moves:  # c was rewritten as (c - d) + d' in float32: put c - d back on the grid
        snap_thresholds(lowering)

    scale_moves, offsets = _snap_scales(lowering)
    if scale_moves:  # the moved layers' sums changed: search their biases again
        lowering, offsets = lowered(), {}
    moves, skipped, bias_ties, kernel_dependent = {}, [], {}, {}
    for name, (bias, representable, unit, owner) in lowering.bias_residuals.items():
        delta = representable - bias
        if owner is None:
            if np.any(delta != 0):
                skipped.append(name)
            continue
        moves[name] = float(np.max(np.abs(delta) / unit))
        if name in lowering.affine_sums:  # keep its sums off the output's rounding ties
            shift, count, uncleared, dependent = offsets.get(name) or ties.bias_offsets(
                lowering.affine_sums[name])
            if count:
                found[name] = count
            if uncleared:
                left.append(name)
            if dependent:
                kernel_dependent[name] = dependent
            if np.any(shift):
                delta = delta + shift * unit
                bias_ties[name] = int(np.max(np.abs(shift)))
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
    return SnapReport(moves, thresholds, skipped, step_moves, found, left, bias_ties,
                      kernel_dependent, scale_moves)


def _snap_scales(lowering):
    """Move the BatchNorm ``γ`` of each kernel-dependent channel by the factor
    ``ties.rational_scale_factors`` gives (its requantization multiplier becomes ``p/q``), so
    that the bias guard can then keep its sums off both kernel sets' ties. Returns
    ``({layer: largest |f - 1|}, {layer: ties.bias_offsets(...)})``: the bias search made on
    the way, valid where no scale moved."""
    moved, offsets = {}, {}
    for name, affine in lowering.affine_sums.items():
        owner = lowering.bias_residuals.get(name, (None,) * 4)[3]
        if not isinstance(owner, keras.layers.BatchNormalization) or not owner.scale:
            continue
        offsets[name], factors = ties.bias_choices_and_scale_factors(affine)
        if np.all(factors == 1.0):
            continue
        gamma = owner.gamma.numpy()
        owner.gamma.assign((gamma * factors.reshape(gamma.shape)).astype(np.float32))
        moved[name] = float(np.max(np.abs(factors - 1.0)))
    return moved, offsets


_TIE_PASSES = 4


def _scale_step(layer, factor):
    """Multiply a QIL activation's step ``2d/q`` by ``factor``, keeping ``c - d``."""
    c, d = layer.interval()
    lo, d = np.float64(c) - np.float64(d), np.float64(d) * factor
    layer.quantizer_vars["d"].assign(np.float32(d))
    layer.quantizer_vars["c"].assign(np.float32(lo + d))
