"""Rounding-tie guard: keep every value a residual sum can produce away from a rounding boundary.

A residual ADD followed by a QIL activation computes, in the integer file,
``k = clip(round(v), 0, top)`` with ``v = Σ s_i (q_i - z_i) / s`` over the int8
inputs ``q_i`` (scale ``s_i``, zero point ``z_i``; the QIL lower threshold is
folded into one zero point) and the activation step ``s``. Keras computes the
same ``v`` in float32, the kernels in fixed point: XNNPACK's ADD rounds each
``s_i/s`` to a multiplier of 21 bits (the largest in ``[2^20, 2^21)``), so
its ``v`` is off by up to ``2^-21 · max_i(s_i/s) · Σ |q_i - z_i|``; LiteRT's
builtin ADD (``left_shift = 20``) by about twice that. Where an input pair
gives a ``v`` that close to ``j + 1/2``, Keras and the file round it apart.
With 8-bit inputs that is 65,536 pairs per ADD, and at 2 bits one level is a
whole step that carries through to the logits (in a development run a trained
2/2 ResNet-20 met ``v = 0.5000004`` on one frequent pair, and its file and Keras
parted on a visible share of CIFAR-10 test images).

``step_factor`` enumerates every ``v`` the inputs can produce and finds the
smallest relative change of ``s`` (``s → s·f``, keeping the lower threshold)
that puts all of them at least ``tolerance`` (4 times the kernels' error bound) from
every boundary, for activations of up to 4 bits;
``qil_keras.snap_to_integer`` applies it to the Keras model, so that
Keras and the file round every pair the same way.
"""

import functools

import numpy as np

__all__ = ["tolerance", "near_ties", "combinations", "step_factor", "bias_offsets",
           "rational_scale_factors",
           "input_near_ties", "input_range_without_ties", "InputTies", "MAX_COMBINATIONS"]

# 4 times XNNPACK's multiplier bound 2^-21 · max(s_i/s) · Σ|q_i - z_i| (the "+ 4" covers the
# builtin kernels' rescaling, about 2^-19 · max(s_i/s) whatever the offsets, 4 times over).
RELATIVE_MARGIN = 2.0 ** -19
OFFSET_MARGIN = 4.0
ABSOLUTE_MARGIN = 2.0 ** -20   # float32 rounding of Keras' sum, in levels
# Sums feeding activations of more than 4 bits are not guarded: there one level is at most 1/31
# of the range (a flip is within the file's usual one-output-step difference), and with 32 or
# more boundaries in the range no small change of the step clears all 65,536 pairs.
MAX_LEVELS = 15
STEP_INCREMENT = 2.0 ** -16   # candidate factors f = 1 ± j · STEP_INCREMENT
MAX_TRIES = 2000              # |f - 1| <= 3 %
MAX_COMBINATIONS = 2 ** 22    # more than this (ADDs of 3+ inputs) is not enumerated


def _values(residual):
    """``(v, tolerance)`` for every input combination whose ``v`` lies in ``(0, top)``."""
    total, magnitude = np.zeros(1), np.zeros(1)
    largest = max(scale for scale, *_ in residual.inputs) / residual.step
    for scale, zero_point, lowest, highest in residual.inputs:
        offsets = np.arange(lowest, highest + 1, dtype=np.float64) - zero_point
        total = (total[:, None] + scale * offsets[None, :]).reshape(-1)
        magnitude = (magnitude[:, None] + np.abs(offsets)[None, :]).reshape(-1)
    v = total / residual.step
    inside = (v > 0.0) & (v < residual.top)
    return v[inside], tolerance(largest, magnitude[inside])


def combinations(residual):
    """How many input combinations ``step_factor`` would enumerate."""
    return int(np.prod([highest - lowest + 1 for _, _, lowest, highest in residual.inputs]))


def tolerance(largest_ratio, offsets):
    """Distance from ``j + 1/2`` within which Keras and the kernels may round apart (levels).

    ``largest_ratio``: ``max_i s_i / s``; ``offsets``: ``Σ |q_i - z_i|`` per combination.
    """
    return RELATIVE_MARGIN * largest_ratio * (offsets + OFFSET_MARGIN) + ABSOLUTE_MARGIN


def near_ties(v, tol, factor=1.0):
    """Which of the values ``v / factor`` lie within ``tol`` of a rounding boundary."""
    w = v / factor
    return np.abs(w - np.floor(w) - 0.5) <= tol


def step_factor(residual):
    """The factor ``f`` closest to 1 such that step ``s·f`` leaves no near-tie, and the number
    of near-ties at ``f = 1``; ``f`` is None if no ``|f - 1| <= 3 %`` clears them, or if the
    ADD has more than ``MAX_COMBINATIONS`` input combinations (not checked). Activations
    with more than ``MAX_LEVELS`` levels above zero are not guarded: ``(1.0, 0)``."""
    if residual.top > MAX_LEVELS:
        return 1.0, 0
    if combinations(residual) > MAX_COMBINATIONS:
        return None, None
    v, tol = _values(residual)
    ties = near_ties(v, tol)
    count = int(np.sum(ties))
    if count == 0:
        return 1.0, 0
    for j in range(1, MAX_TRIES + 1):
        for factor in (1.0 + j * STEP_INCREMENT, 1.0 - j * STEP_INCREMENT):
            if not np.any(near_ties(v, tol, factor)):
                return factor, count
    return None, count


# -- convolutions and dense layers -----------------------------------------------------------

# Keras computes a conv (then BatchNorm) in float32, the file the exact integer sum and one fp32
# requantization. Their difference grows with Σ|terms| (the summed products, in output levels)
# and with |v|; the margin is 2^-23 · Σ|terms| + 2^-21 · |v|. On a trained 3/3 ResNet-20 whose
# file disagreed with Keras, the 8-bit branch outputs that rounded apart were 4e-7 to 1.2e-5
# levels from a boundary, with Σ|terms| around 850 levels and |v| <= 134: the margin there is
# 1e-4 to 2e-4, 8 times the largest.
CONV_RELATIVE_MARGIN = 2.0 ** -23
CONV_VALUE_MARGIN = 2.0 ** -21
MAX_BIAS_SHIFT = 64  # int32 bias units


def bias_offsets(affine):
    """Per output channel, the int32 bias change ``j`` (smallest ``|j|``, at most
    ``MAX_BIAS_SHIFT``) that keeps every sum the channel can produce away from a rounding
    boundary of its output (see ``qil_keras.integer.emission.AffineSum``).

    Choices, in order, per channel: off the ties of both kernel sets (XNNPACK rounds ``v``,
    the builtin kernels ``v + other``), else off the ties of the kernels the file is written
    for; both by Keras' float32 margin (agreement with the Keras model comes first).

    Returns ``(offsets, near_ties, left, kernel_dependent)``: the changes (0 where nothing was
    near or nothing cleared), how many sums were near a boundary before, how many channels
    could not be cleared, and how many channels round some reachable sum apart under the two
    kernel sets. Unlike a residual sum's, the Keras margin is a typical float32 error, not a
    bound: it removes the near-ties that are likely to round apart, not all that could.
    """
    offsets, near, left, dependent = _bias_choices(affine)
    return offsets, near, left, int(np.sum(dependent))


def bias_choices_and_scale_factors(affine):
    """``(bias_offsets(affine), rational_scale_factors(affine))`` with one bias search (the
    snap needs both, and the offsets as they are where no factor moves a scale)."""
    offsets, near, left, dependent = _bias_choices(affine)
    return (offsets, near, left, int(np.sum(dependent))), _scale_factors(affine, dependent)


def _keras_spread(affine, lo, hi, unit):
    """Keras' float32 error of a channel's sums that does not grow with ``|v|`` (levels)."""
    return CONV_RELATIVE_MARGIN * (hi - lo) * affine.multiplier * unit + ABSOLUTE_MARGIN


def _bias_choices(affine):
    """``bias_offsets`` with the kernel-dependent channels as a mask."""
    offsets = np.zeros(len(affine.bias_int), np.int64)
    dependent = np.zeros(len(affine.bias_int), bool)
    near, left = 0, 0
    candidates = [0] + [j * sign for j in range(1, MAX_BIAS_SHIFT + 1) for sign in (1, -1)]
    zeros = np.zeros(len(affine.bias_int))
    shifts = affine.shift_levels if affine.shift_levels is not None else zeros
    others = affine.other_levels if affine.other_levels is not None else zeros
    v_peak = max(abs(affine.v_min), abs(affine.v_max))
    dense_channels = _dense(affine)
    for channel, (lo, hi, bias, unit, shift, other, dense) in enumerate(zip(
            affine.n_min, affine.n_max, affine.bias_int, affine.unit_levels, shifts, others,
            dense_channels)):
        spread = _keras_spread(affine, lo, hi, unit)
        if dense:
            phases = _phase_sums(lo, hi, bias, unit, affine)
            if phases is None:  # fractional parts fill [0, 1): no bias keeps them off a tie
                dependent[channel] = other != 0.0
                continue
            base, spread = phases[0], spread + phases[1]
        else:
            base = _unclamped_sums(lo, hi, bias, unit, affine)

        def near_ties(j, band):
            """Sums within the margin of a tie of ``v + t``, ``t`` anywhere in ``band``."""
            v = (base + j) * unit + shift
            if dense:  # one sum per phase, standing for sums anywhere in the range
                margin = spread + CONV_VALUE_MARGIN * v_peak
            else:
                v = v[(v > affine.v_min) & (v < affine.v_max)]
                margin = spread + CONV_VALUE_MARGIN * np.abs(v)
            w = v - np.floor(v) - 0.5  # in [-1/2, 1/2): a tie at 0
            return (w + band[1] >= -margin) & (w + band[0] <= margin)

        near += int(np.sum(near_ties(0, (0.0, 0.0))))
        both = (min(0.0, other), max(0.0, other))
        for band, shared in ((both, True), ((0.0, 0.0), False)):
            found = next((j for j in candidates if not np.any(near_ties(j, band))), None)
            if found is not None:
                offsets[channel] = found
                dependent[channel] = not shared and other != 0.0
                break
        else:
            left += 1
            dependent[channel] = other != 0.0
    return offsets, near, left, dependent


# A kernel-dependent channel's requantization multiplier M (output levels per input×weight
# step) is moved by at most this share to a rational p/q: the same bound as a QIL activation's
# step move (``step_factor``). The move a channel needs is about 0.5 / (q·M) for the largest
# q the gap allows, more where p must skip multiples of 2, 3 and 7. Measured on MobileNetV2
# (α 0.35, 32x32 CIFAR-10, development runs): the largest move needed was 1.25 % at 2/2 and
# 2.86 % at 3/3, and a 1 % bound left 8 and 51 channels kernel-dependent
# (bench/architectures.py measures the files).
MAX_SCALE_MOVE = 0.03


# Weights with at most 7 levels each side (2- to 4-bit: m >= 18 in INT8 storage) get the move.
# 2- and 3-bit weights keep m = 7 or 2 in INT4 storage, so a bias can still shift the q phase
# classes of a rational multiplier there (hence p coprime with 42). 4-bit weights have m = 1
# in INT4 storage (m < BIAS_ROOM_IN_INT4), where a bias moves whole classes: every sum of a
# class rounds alike there, and a class near a tie would move 1/q of all values (measured: a
# 4/4 MobileNetV2 snapped for INT8, with any q, and exported with INT4 storage fell to 82 %
# agreement). So for them p/q must also leave every phase of the INT4 file off a tie
# (_int4_phases_clear).
MIN_SCALE_MULTIPLIER = 18
BIAS_ROOM_IN_INT4 = 42


def rational_scale_factors(affine):
    """Per output channel, the factor ``f`` (1 where none is needed or none is small enough)
    that makes the channel's multiplier ``M·f = p/q``: the smallest move among the ``p/q``
    whose phases a bias move can keep clear of the other kernel set's band and both margins
    (``_bias_room``), with ``p`` coprime with 42 (see ``_OTHER_MULTIPLIERS``) and, for 4-bit
    weights, the INT4 file's phases off ties (``_int4_phases_clear``), if
    ``|f - 1| <= MAX_SCALE_MOVE``.

    With ``M = p/q`` the sums ``v = n·M + b`` take only ``q`` fractional parts, ``1/q``
    apart, whatever the inputs; a bias move (steps of ``M/m``) then puts the band of values
    that XNNPACK and the builtin kernels round apart (``[j + 1/2 - t, j + 1/2)``) between two
    of them, which no bias can do while the fractional parts are dense (8-bit outputs reach
    hundreds of sums per channel). Only channels ``bias_offsets`` leaves kernel-dependent are
    moved, by at most ``MAX_SCALE_MOVE``, in layers with ``m >= MIN_SCALE_MULTIPLIER``.
    """
    return _scale_factors(affine, None)


def _scale_factors(affine, dependent):
    """``rational_scale_factors``, given the kernel-dependent channels (None: search them)."""
    factors = np.ones(len(affine.bias_int))
    if affine.other_levels is None or affine.multiplier < MIN_SCALE_MULTIPLIER:
        return factors
    if dependent is None:
        dependent = _bias_choices(affine)[3]
    v_peak = max(abs(affine.v_min), abs(affine.v_max))
    dense = _dense(affine)
    for channel in np.flatnonzero(dependent):
        unit = abs(float(affine.unit_levels[channel]))
        lo, hi = affine.n_min[channel], affine.n_max[channel]
        margin = _keras_spread(affine, lo, hi, unit) + CONV_VALUE_MARGIN * v_peak
        if dense[channel]:  # its phases may drift that far (see _phase_sums)
            margin += PHASE_DRIFT
        band = abs(float(affine.other_levels[channel])) + 2 * margin
        largest = int(np.floor(1.0 / band))
        if dense[channel]:  # a longer period would not be recognised (_phase_sums)
            largest = min(largest, MAX_PHASES)
        accept = functools.partial(_bias_room, band=band, multiplier=affine.multiplier)
        if affine.multiplier < BIAS_ROOM_IN_INT4:
            accept = _both(accept, functools.partial(_int4_phases_clear, margin=margin))
        move, factor = _rational_move(unit * affine.multiplier, largest, accept)
        if move <= MAX_SCALE_MOVE:
            factors[channel] = factor
    return factors


def _rational_move(true, largest, accept=None):
    """``(|f - 1|, f)`` of the smallest move ``f = p / (q · true)`` over ``q <= largest`` and
    ``p`` next to ``q · true`` (below or above), ``p`` coprime with the other storages'
    multipliers (INT4 keeps 2- and 3-bit weights at m = 7 and 2: else a bias step there is a
    whole multiple of the phase gap 1/q and cannot move the sums off a tie) and, with
    ``accept``, ``accept(p, q)`` true; ``(inf, 1)`` if there is none."""
    q = np.arange(1, largest + 1, dtype=np.float64)
    p = np.stack([np.floor(true * q), np.ceil(true * q)])
    factor = p / (q * true)
    move = np.abs(factor - 1.0)
    move[(p < 1) | (np.gcd(p.astype(np.int64), _OTHER_MULTIPLIERS) != 1)] = np.inf
    if accept is not None and move.size:
        move[~accept(p, np.broadcast_to(q, p.shape))] = np.inf
    if move.size == 0 or not np.isfinite(move.min()):
        return np.inf, 1.0
    best = np.flatnonzero(move.ravel() == move.min())
    return float(move.ravel()[best[0]]), float(min(factor.ravel()[best]))


_OTHER_MULTIPLIERS = 2 * 3 * 7


def _bias_room(p, q, band, multiplier):
    """Whether a bias move can put the ``band`` (the other kernel set's band and both margins,
    in levels) between two phases of ``M = p/q``: the sums' fractional parts are the multiples
    of ``1/q`` shifted together by ``j·p/(m·q)`` for a bias move of ``j`` units, i.e. by any
    multiple of ``g/(m·q)`` (``g = gcd(p, m)``; the guard tries 129 values of ``j``, at least
    ``m/g``), so some shift leaves the band free when ``band + g/(m·q) < 1/q``."""
    m = int(round(multiplier))
    g = np.gcd(p.astype(np.int64), m)
    return q * band < 1.0 - g / m


def _both(first, second):
    """``accept(p, q)`` of two conditions."""
    return lambda p, q: first(p, q) & second(p, q)


def second_rounding_offset(multiplier):
    """``2^-(r+1)`` (0 where ``r = 0``) with ``M = f·2^-r``, ``f`` in ``[1/2, 1)``: what the
    builtin kernels' second rounding adds to a value requantized by ``M`` (output levels)."""
    _, exponent = np.frexp(multiplier)
    r = -exponent
    return np.where(r > 0, 2.0 ** (-(r + 1.0)), 0.0)


def _int4_phases_clear(p, q, margin):
    """Whether a multiplier ``M = p/q`` (output levels per input×weight step) keeps every sum
    of the channel's INT4 file (``m = 1``, run by the builtin kernels) at least ``margin``
    from a tie of Keras' rounding: the file's sums are ``(n + b)·M``, whose fractional parts
    are the multiples of ``1/q`` (``p`` and ``q`` coprime or not), and the snap puts Keras'
    value ``2^-(r+1)`` above them (the builtin kernels' double rounding, ``r`` the right shift
    of ``M``; 0 for ``M >= 1/2``), so a phase ``k/q + 2^-(r+1)`` must not come within
    ``margin`` of ``1/2``."""
    target = q * (0.5 - second_rounding_offset(p / q))   # k/q + offset = 1/2
    return np.abs(target - np.round(target)) / q >= margin


# A channel reaching more sums than this (8-bit inputs into an 8-bit output) is dense: its sums
# are not enumerated (AffineSum.dense).
DENSE_WINDOW = 2 ** 12


def sum_windows(affine):
    """Per channel, how many sums the bias search would examine per candidate bias."""
    return np.array([max(0, last - first + 1) for first, last in (
        _unclamped_window(lo, hi, bias, unit, affine) for lo, hi, bias, unit in zip(
            affine.n_min, affine.n_max, affine.bias_int, affine.unit_levels))], np.int64)


def _dense(affine):
    """``AffineSum.dense`` per channel."""
    return np.broadcast_to(np.asarray(affine.dense, bool), (len(affine.bias_int),))


# A dense channel (AffineSum.dense) is guarded only where its multiplier M = m·u (levels per
# input×weight step) is p/q for some q up to MAX_PHASES, to within float rounding: the
# fractional parts of its sums then repeat every q sums, drifting over the whole window by at
# most PHASE_DRIFT levels (a multiplier moved by rational_scale_factors is p/q up to the
# float32 rounding of the file's scales: about 2^-23 · 255 levels over an 8-bit range).
MAX_PHASES = 4096
PHASE_DRIFT = 2.0 ** -13


def _phase_sums(lo, hi, bias, unit, affine):
    """A dense channel's sums, one per phase: ``(m·n + b for the first q integers n of the
    window, drift)``, where ``q`` is the smallest period of its fractional parts (see
    ``MAX_PHASES``) and ``drift`` how far they move over the window (levels); None where the
    multiplier has no such period."""
    first, last = _unclamped_window(lo, hi, bias, unit, affine)
    if last < first:
        return np.zeros(0), 0.0
    true = abs(affine.multiplier * float(unit))
    periods = np.arange(1, MAX_PHASES + 1, dtype=np.float64)
    drift = np.abs(true * periods - np.round(true * periods)) * np.ceil(
        (last - first + 1) / periods)
    fits = np.flatnonzero(drift <= PHASE_DRIFT)
    if len(fits) == 0:
        return None
    period = int(periods[fits[0]])
    n = np.arange(first, min(first + period, last + 1), dtype=np.float64)
    return affine.multiplier * n + bias, float(drift[fits[0]])


def _unclamped_sums(lo, hi, bias, unit, affine):
    """``m·n + b`` for the integers ``n`` in ``[lo, hi]`` that some bias move of at most
    ``MAX_BIAS_SHIFT`` units can bring inside ``(v_min, v_max)``: the others are clamped for
    every candidate, so leaving them out changes nothing but the time (a wide conv can reach
    millions of sums, of which a low-bit output keeps only those near its few levels)."""
    first, last = _unclamped_window(lo, hi, bias, unit, affine)
    return affine.multiplier * np.arange(first, last + 1, dtype=np.float64) + bias


def _unclamped_window(lo, hi, bias, unit, affine):
    """The integers ``[first, last]`` of ``_unclamped_sums``."""
    first, last = lo, hi
    if unit != 0:
        low, high = sorted((affine.v_min / unit, affine.v_max / unit))
        first = max(lo, int(np.floor((low - bias - MAX_BIAS_SHIFT) / affine.multiplier)) - 1)
        last = min(hi, int(np.ceil((high - bias + MAX_BIAS_SHIFT) / affine.multiplier)) + 1)
    return first, last


# -- the model input ----------------------------------------------------------------------------

# The file's QUANTIZE op divides (or multiplies by the inverse scale) in float32 and the kernels
# round halves differently (LiteRT's reference: away from zero; its optimized kernel and XNNPACK:
# to even), so an input value on an exact tie v/s = j + 1/2 is quantized apart. Preprocessing
# x/127.5 - 1 puts every pixel there for the natural range [-1, 1] (s = 2/255).
INPUT_TIE_MARGIN = 2.0 ** -10   # levels: far above float32 error of v/s for |v/s| <= 128
MAX_INPUT_WIDENING = 8          # steps added to the range at most


def input_near_ties(values, scale):
    """How many ``values`` lie within ``INPUT_TIE_MARGIN`` levels of ``j + 1/2`` on the
    grid of step ``scale`` (the zero point is an integer, so it does not move ties)."""
    return int(np.sum(_on_input_ties(values, scale)))


def _on_input_ties(values, scale):
    """Which ``values`` lie within ``INPUT_TIE_MARGIN`` levels of a tie (``input_near_ties``)."""
    t = np.asarray(values, np.float64) / np.float64(np.float32(scale))
    return np.abs(np.abs(t - np.floor(t)) - 0.5) <= INPUT_TIE_MARGIN


def input_range_without_ties(values, range_min, range_max):
    """The smallest widening of an input range ``[range_min, range_max]`` (by whole steps of
    the 255-step grid, at the top) after which no value of ``values`` sits on a rounding tie.

    Returns ``(range_max, near_ties_before)``; ``range_max`` unchanged when there is no tie or
    when ``MAX_INPUT_WIDENING`` steps do not clear them. ``InputTies`` gives the number of
    steps from values seen in batches, for any sequence of widened scales.
    """
    step = (range_max - range_min) / 255.0
    counter = InputTies([(range_max + k * step - range_min) / 255.0
                         for k in range(MAX_INPUT_WIDENING + 1)])
    counter.add(values)
    steps, before = counter.result()
    return range_max + steps * step, before


class InputTies:
    """Which of the candidate grids ``scales`` (the current one first, then the ones widened by
    1, 2, ... steps) first keeps every value off its rounding ties, from values that come in
    batches: ``add`` each batch, then ``result()``. Keeps, for each scale, only the distinct
    values that sit on its ties (few), not the values themselves."""

    def __init__(self, scales):
        self.scales = [float(s) for s in scales]
        self.tied = [np.zeros(0, np.float32) for _ in self.scales]

    def add(self, values):
        values = np.unique(np.asarray(values, np.float32))
        for i, scale in enumerate(self.scales):
            self.tied[i] = np.union1d(self.tied[i], values[_on_input_ties(values, scale)])

    def result(self):
        """``(steps, near_ties_before)``: the index of the first scale with no value on a tie
        (0 when the current one has none, or when no candidate clears them) and how many
        distinct values sit on the current one's ties."""
        before = len(self.tied[0])
        if before == 0:
            return 0, 0
        for steps, tied in enumerate(self.tied[1:], start=1):
            if len(tied) == 0:
                return steps, before
        return 0, before
