"""QIL quantizer maths as pure TensorFlow functions.

Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization
Intervals with Task Loss", CVPR 2019 (arXiv:1808.05779). A quantizer is a
transformer ``T`` followed by a discretizer ``D``:

* weights:     ``ŵ = 0`` for ``|w| < c - d``; ``sign(w)`` for ``|w| > c + d``;
  ``(α|w| + β)^γ · sign(w)`` in between, ``α = 0.5/d``, ``β = -0.5c/d + 0.5``;
* activations: ``x̂ = clip(α x + β, 0, 1)`` (``γ = 1``, inputs ``≥ 0``);
* discretizer: ``v̄ = round(v̂ · q) / q`` with a straight-through gradient,
  ``q_W = 2^(N-1) - 1`` and ``q_X = 2^N - 1``.

Output scale (the paper leaves it open, see README "Design choices"): the
quantized value is ``k · s`` with the integer level ``k = round(q · v̂)`` and
the step ``s = 2d / q``. The grid is uniform with zero at zero, which makes the
integer export exact; for activations ``k · s`` equals a uniform quantizer of
``x - (c - d)`` with step ``s`` and ``q`` levels above zero, and for ``γ = 1`` and
``c = d`` both quantizers reduce to the plain max-range quantizer of the float
value, so a freshly quantized model starts close to its float original.

The interval is kept valid by construction: every function here works on the
*effective* interval ``d' = max(d, ε)``, ``c' = d' + |c - d'|`` (so ``c' - d' ≥ 0``:
zero always maps to level 0, and both thresholds keep their gradients; see
``effective_interval``) and ``γ' = max(γ, ε)``; a weight interval's width is also
reflected at ``|c|/16`` (``effective_weight_interval``), where the straight-through
slope ``0.5/d`` stays bounded.
"""

import functools

from .._keras import tf

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "weight_levels",
    "activation_levels",
    "effective_interval",
    "effective_weight_interval",
    "round_half_away",
    "round_ste",
    "discretize",
    "weight_transform",
    "activation_transform",
    "quantize_weight_levels",
    "quantize_weight",
    "quantize_activation_levels",
    "quantize_activation",
]

MIN_BITS, MAX_BITS = 2, 8
EPSILON = 1e-6
# Below this value of u the gradient of u^γ uses u = _U_FLOOR: it keeps
# γ u^(γ-1) finite for γ < 1 and drops the u^γ ln u term, whose limit at 0 is 0.
_U_FLOOR = 1e-6


def weight_levels(bits):
    """Positive weight levels ``q_W = 2^(bits-1) - 1`` (ternary at 2 bits)."""
    return tf.pow(2.0, tf.cast(bits, tf.float32) - 1.0) - 1.0


def activation_levels(bits):
    """Activation levels above zero ``q_X = 2^bits - 1``."""
    return tf.pow(2.0, tf.cast(bits, tf.float32)) - 1.0


def effective_interval(c, d):
    """``(c', d')``: ``d' = max(d, ε)`` and a lower threshold ``c' - d' = |c - d'|``.

    The lower (pruning) threshold is reflected at zero instead of clamped: ``c' = c`` while
    ``c ≥ d'`` and ``c' = 2d' - c`` below, so ``c' - d' ≥ 0`` (zero maps to level 0) and ``c``
    keeps a gradient of magnitude one wherever values lie inside the interval. A clamp
    ``max(c, d')`` gives ``c`` no gradient once a step puts it below ``d``, and momentum then
    carries it further away (issue #16: most intervals of the quickstart CNN ended there).
    At ``c = d'`` exactly (every interval's initial value) the gradient is the one of ``c' = c``.
    """
    d = tf.maximum(tf.convert_to_tensor(d, tf.float32), EPSILON)
    lower = tf.convert_to_tensor(c, tf.float32) - d
    lower = tf.where(lower >= 0.0, lower, -lower)
    return d + lower, d


# A weight interval's width is kept at least this fraction of its centre (see
# effective_weight_interval).
WEIGHT_WIDTH_FLOOR = 1.0 / 16.0


def effective_weight_interval(c, d):
    """``(c', d')`` of a weight interval: ``effective_interval`` with the width reflected at
    ``δ = max(|c| / 16, ε)``: ``d' = δ + |d - δ|``.

    The STE slope of ``T_W`` inside the interval is ``α = 0.5/d``: as ``d → 0`` the gradients of
    the weights inside it, of ``c`` and of ``d`` grow as ``1/d``. At 2 bits (ternary) the level
    of a weight depends only on ``c`` (``|w| ≥ c`` for ``γ = 1``) and the width only scales it, and
    the straight-through gradient pulls ``d`` down steadily; at ``d = ε`` one batch then gave a
    large negative ``∂L/∂d`` (a development run) and the next step put the lower threshold above
    every weight (the CIFAR-10 study's 2/2 ResNet-20: the last block's second conv pruned to
    100 % zeros in every learned 2/2 row, with no gradient left to bring it back; the superseded
    rows of ``bench/results/cifar_study.json`` and ``bench/results/width_floor.md``). Reflected at ``δ``, the width stays where
    the slope is at most ``8/|c|`` and keeps a gradient of magnitude one (its sign flips below
    ``δ``, so the pull that narrowed it pushes it back to ``δ``: no ratchet). Below ``δ`` the
    width used lies in ``[δ, 2δ)``; from there it widens further only by passing ``δ`` again,
    which a loss asking for a wider interval does not do (the constraint then holds ``d`` at
    ``ε``, ``d' = 2δ - ε``). Intervals with ``d ≥ |c|/16``, every initial one (``c = d``)
    included, are unchanged.
    """
    c = tf.convert_to_tensor(c, tf.float32)
    d = tf.convert_to_tensor(d, tf.float32)
    floor = tf.maximum(WEIGHT_WIDTH_FLOOR * tf.abs(c), EPSILON)
    # where, not floor + |d - floor|: that sum can differ from d by an ulp above the floor
    return effective_interval(c, tf.where(d >= floor, d, 2.0 * floor - d))


def round_half_away(x):
    """Round to nearest, ties away from zero (TFLite's rounding)."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


@tf.custom_gradient
def round_ste(x):
    """``round_half_away(x)`` with the straight-through (identity) gradient."""
    return round_half_away(x), lambda dy: dy


def discretize(v, q):
    """Paper's discretizer ``D(v) = round(v · q) / q``, straight-through gradient."""
    return round_ste(v * q) / q


def _sum_to_shape(grad, like):
    """Sum a broadcast gradient back to the shape of ``like``."""
    axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(like), s1=tf.shape(grad))
    return tf.reshape(tf.reduce_sum(grad, axis=axes), tf.shape(like))


@tf.custom_gradient
def _weight_transform(w, c, d, gamma):
    magnitude, sign = tf.abs(w), tf.sign(w)
    u = (magnitude - c + d) / (2.0 * d)  # = α|w| + β
    inside = tf.logical_and(u > 0.0, u < 1.0)
    u_in = tf.clip_by_value(u, 0.0, 1.0)
    w_hat = tf.pow(u_in, gamma) * sign  # 0 below the interval, ±1 above it

    def grad(dy):
        alpha = 0.5 / d
        u_safe = tf.maximum(u_in, _U_FLOOR)
        slope = gamma * tf.pow(u_safe, gamma - 1.0)  # ∂(u^γ)/∂u
        zero = tf.zeros_like(w)
        d_w = tf.where(inside, slope * alpha, zero) * dy
        d_c = tf.where(inside, -slope * alpha * sign, zero) * dy
        d_d = tf.where(inside, slope * (alpha / d) * (c - magnitude) * sign, zero) * dy
        with_log = tf.logical_and(inside, u > _U_FLOOR)
        d_gamma = tf.where(with_log, tf.pow(u_safe, gamma) * tf.math.log(u_safe) * sign, zero) * dy
        return (d_w, _sum_to_shape(d_c, c), _sum_to_shape(d_d, d), _sum_to_shape(d_gamma, gamma))

    return w_hat, grad


def weight_transform(w, c, d, gamma=1.0):
    """QIL weight transformer ``T_W`` (Eq. 3), values in ``[-1, 1]``.

    Gradients inside the interval, ``u = (|w| - c + d) / 2d``:
    ``∂ŵ/∂c = -γ u^(γ-1) α sign(w)``, ``∂ŵ/∂d = γ u^(γ-1) (α/d)(c - |w|) sign(w)``,
    ``∂ŵ/∂γ = u^γ ln(u) sign(w)``; all zero outside (pruned or clipped).
    ``c``, ``d`` and ``gamma`` broadcast against ``w`` (scalars or per channel).
    """
    w = tf.convert_to_tensor(w, tf.float32)
    c, d = effective_weight_interval(c, d)
    gamma = tf.maximum(tf.convert_to_tensor(gamma, tf.float32), EPSILON)
    return _weight_transform(w, c, d, gamma)


def activation_transform(x, c, d):
    """QIL activation transformer ``T_X = clip((x - c + d) / 2d, 0, 1)``."""
    x = tf.convert_to_tensor(x, tf.float32)
    c, d = effective_interval(c, d)
    return tf.clip_by_value((x - c + d) / (2.0 * d), 0.0, 1.0)


def quantize_weight_levels(w, c, d, gamma, bits):
    """Integer weight levels ``k = round(q_W · T_W(w))``, ``|k| ≤ q_W`` (float dtype)."""
    return round_ste(weight_transform(w, c, d, gamma) * weight_levels(bits))


@tf.custom_gradient
def _quantize_weight(w, c, d, gamma, q):
    magnitude, sign = tf.abs(w), tf.sign(w)
    u = tf.clip_by_value((magnitude - c + d) / (2.0 * d), 0.0, 1.0)  # as in _weight_transform
    power = tf.pow(u, gamma)
    k = tf.floor(power * q + 0.5) * sign  # round_half_away(q · T_W(w)), since u^γ ≥ 0

    def grad(dy):
        # d(k·s)/d(·) = 2d · dT_W/d(·) (straight-through round, s·q = 2d), plus k·ds/dd = 2k/q.
        inside = tf.logical_and(u > 0.0, u < 1.0)
        u_safe = tf.maximum(u, _U_FLOOR)
        g = tf.where(inside, dy * (2.0 * d), 0.0)
        d_w = g * ((0.5 / d) * gamma) * (power / u_safe)  # γ u^(γ-1) α, with u^(γ-1) = u^γ / u
        signed = d_w * sign
        d_c = -_sum_to_shape(signed, c)
        d_d = (_sum_to_shape(signed * (c - magnitude), d) / d
               + _sum_to_shape(dy * k, d) * (2.0 / q))
        d_gamma = _sum_to_shape(
            tf.where(u > _U_FLOOR, g * power * sign, 0.0) * tf.math.log(u_safe), gamma)
        return d_w, d_c, d_d, d_gamma, None

    return k * (2.0 * d / q), grad


def quantize_weight(w, c, d, gamma, bits):
    """Quantized weights ``k · s`` with step ``s = 2d' / q_W`` (differentiable).

    One custom-gradient op: the values of ``quantize_weight_levels(...) · s`` bit for bit, and
    the gradients of that composition (straight-through round; see ``weight_transform``)
    plus the step's ``∂s/∂d = 2/q_W``, in fewer kernels. Below ``u = 10^-6`` the slope uses
    ``u^γ / 10^-6`` for ``u^(γ-1)``.
    """
    w = tf.convert_to_tensor(w, tf.float32)
    c, d = effective_weight_interval(c, d)
    gamma = tf.maximum(tf.convert_to_tensor(gamma, tf.float32), EPSILON)
    return _quantize_weight(w, c, d, gamma, weight_levels(bits))


def quantize_activation_levels(x, c, d, bits):
    """Integer activation levels ``k = round(q_X · T_X(x))``, ``0 ≤ k ≤ q_X``."""
    return round_ste(activation_transform(x, c, d) * activation_levels(bits))


@tf.custom_gradient
def _quantize_activation(x, c, d, q):
    """Any broadcastable ``c``, ``d`` (per channel in the tfmot path's tests)."""
    u = (x - c + d) / (2.0 * d)
    u_clipped = tf.clip_by_value(u, 0.0, 1.0)
    k = tf.floor(u_clipped * q + 0.5)  # round_half_away on u ≥ 0
    step = 2.0 * d / q

    def grad(dy):
        # Straight-through round; clip passes the gradient on [0, 1], ends included (as
        # ClipByValue's gradient does), so these equal autodiff of the composition. Scalar
        # factors are applied after the reductions.
        # The gradient of QIL(ReLU(x)): where the lower threshold c - d is exactly 0, ReLU's
        # zeros (x <= 0) lie on it, inside the interval for c and d (level 0, ∂/∂c = -1,
        # ∂/∂d = c/d), and x gets ReLU's gradient 0 there.
        relu_zero = tf.logical_and(x <= 0.0, tf.equal(c, d))
        dy_in = tf.where(tf.logical_and(tf.equal(u_clipped, u), tf.logical_not(relu_zero)),
                         dy, tf.zeros_like(dy))
        below = _sum_to_shape(tf.where(relu_zero, dy, tf.zeros_like(dy)), c)
        inside = _sum_to_shape(dy_in, c) + below
        d_d = (_sum_to_shape(dy * k, d) * (2.0 / q)
               + (_sum_to_shape(dy_in * (c - x), d) + c * below) / d)
        return dy_in, -inside, d_d, None

    return k * step, grad


# FakeQuantWithMinMaxVarsGradient's mask is min <= z <= max with max as the op nudges it
# (within float32 rounding of 2d); widened by this factor it keeps z = 2d inside.
_TOP_MARGIN = 1.0 + 2.0 ** -20
# The smallest normal float32: a lower threshold of exactly 0 is moved up by it, so that x = 0
# (a ReLU zero) falls below the interval, where ReLU's own gradient (0 at 0) puts it; no value
# of x above 2^-100 or so changes in x - lower, so the levels do not change.
_TINY = 2.0 ** -126


def bits_when_traced(bits):
    """``bits`` for the op being built: a bit width held in a variable is read once, when the
    step is traced, and returned as an ``int`` (with a guard, below); anything else as a tensor.

    FakeQuant's bit width is an attribute of the op. Reading the variable at trace time gives
    the one FakeQuant kernel of that width, where a width known only when the step runs
    needs all seven behind a ``Case`` (seven branch graphs traced per quantizer, and a
    function call per step). A traced step then holds the width it was traced with: a QIL
    model traces its steps again when a width has changed (``training.model.DeployableFit``;
    ``qil_keras.set_bits`` also in the middle of ``fit``), and any other traced function that
    runs after its variable has changed stops with an error naming the fix (an ``Assert``,
    which XLA drops: under ``jit_compile=True`` such a function must be traced again).
    """
    if not hasattr(bits, "assign") or not tf.compat.v1.executing_eagerly_outside_functions():
        return tf.convert_to_tensor(bits)
    with tf.init_scope():
        value = int(bits.numpy())
    if tf.executing_eagerly():
        return value
    tf.debugging.Assert(tf.equal(tf.cast(bits, tf.int32), value), [
        f"{bits.name} has changed since this step was traced with {value} bits: change bits with "
        "qil_keras.set_bits(model, ...), which traces the model's steps again, or trace this "
        "function again"])
    return value


def _fake_quant_levels(z, width, bits):
    """``FakeQuant_[0, 2d]`` with ``2^bits - 1`` steps: levels ``0..q`` of ``z``, clipped.

    With a ``bits`` known only when the step runs (a tensor), one of the seven kernels is
    picked by a ``Case``; ``bits_when_traced`` avoids that for a variable."""
    static_bits = tf.get_static_value(bits)
    if static_bits is not None:
        return tf.quantization.fake_quant_with_min_max_vars(
            z, 0.0, width, num_bits=int(static_bits), narrow_range=False)
    branches = [functools.partial(tf.quantization.fake_quant_with_min_max_vars, z, 0.0, width,
                                  num_bits=b, narrow_range=False)
                for b in range(MIN_BITS, MAX_BITS + 1)]
    return tf.switch_case(tf.cast(bits, tf.int32) - MIN_BITS, branches)


@tf.custom_gradient
def _quantize_activation_per_tensor(x, c, d, bits):
    """Scalar ``c``, ``d``: TensorFlow's fused FakeQuant kernels do the rounding and the mask.

    With ``z = x - (c - d)``, the quantizer is ``k · s = FakeQuant_[0, 2d](z)`` over
    ``q = 2^bits - 1`` steps of ``s = 2d/q`` (zero point 0, so no nudge, and the same half-up
    rounding ``floor(z/s + 0.5)``; the kernel clips ``z`` to ``[0, 2d]``).
    """
    width = 2.0 * d
    z = x - tf.maximum(c - d, _TINY)
    y = _fake_quant_levels(z, width, bits)

    def grad(dy):
        # dy_in = dy on 0 <= z <= 2d; below = Σ dy over z < 0; above = Σ dy over z > 2d
        # (where k = q).
        dy_in, below, above = tf.raw_ops.FakeQuantWithMinMaxVarsGradient(
            gradients=dy, inputs=z, min=0.0, max=width * _TOP_MARGIN, num_bits=8,
            narrow_range=False)
        # The gradient of QIL(ReLU(x)): with the lower threshold c - d exactly 0, ReLU's zeros
        # (x <= 0) lie on it, inside the interval for c and d (level 0, rounding residual 0),
        # and x gets ReLU's gradient 0 there; so the values below count as inside (x = 0 is
        # below: _TINY). Non-negative inputs change nothing: below is Σ dy over x = 0, the
        # zeros that a ReLU in front of the quantizer would have produced.
        inside = tf.reduce_sum(dy_in) + tf.where(tf.equal(c, d), below, 0.0)
        # ∂(k·s)/∂d = 2k/q + (c - x)/d = 1 + (k·s - z)/d inside and 2 above (k = q): the
        # rounding residual k·s - z is summed directly, so nothing large cancels.
        d_d = inside + 2.0 * above + tf.reduce_sum(dy_in * (y - z)) / d
        return dy_in, -inside, d_d, None

    return y, grad


def quantize_activation(x, c, d, bits):
    """Quantized activations ``k · s`` with step ``s = 2d' / q_X`` (differentiable).

    Gradients (straight-through round), zero outside ``c - d ≤ x ≤ c + d`` except the scale term:
    ``∂/∂x = 1``, ``∂/∂c = -1``, ``∂/∂d = 2k/q_X + (c - x)/d``. The values of
    ``quantize_activation_levels(...) · s`` and the gradients of that composition, in fewer
    kernels; with a scalar interval (every ``QILActivation``) the level is computed from
    ``x - (c - d)`` by TensorFlow's FakeQuant kernel, which can differ from the composition
    by one level where ``x`` is within float32 rounding of a rounding boundary.

    Values and gradients are those of ``quantize_activation(ReLU(x))`` for any ``x``, negative
    values included (the lower threshold is never negative, so negative values map to level 0;
    with the lower threshold exactly 0, ReLU's zeros lie on it and count as inside for the
    gradients of ``c`` and ``d``, and ``∂/∂x = 0`` there as ReLU's own gradient at 0 gives). So a
    ReLU followed by this quantizer need not run in training (``layers.QILReLU``).
    """
    x = tf.convert_to_tensor(x, tf.float32)
    c, d = effective_interval(c, d)
    bits = bits_when_traced(bits)
    if c.shape.rank == 0 and d.shape.rank == 0:
        return _quantize_activation_per_tensor(x, c, d, bits)
    return _quantize_activation(x, c, d, activation_levels(bits))
