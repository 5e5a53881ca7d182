"""Tests of the QIL maths in ``qil_keras.ops``, ``qil_keras.init`` and ``check_bits``.

Conventions under test (``ops`` module docstring, REFERENCE.md section 1):

* weight levels ``q_W = 2^(b-1) - 1``, activation levels ``q_X = 2^b - 1``;
* ``u = (|w| - c + d) / 2d``, ``ŵ = sign(w) · clip(u, 0, 1)^γ``,
  ``k = round_half_away(q_W · ŵ)``, output ``k · 2d / q_W``;
* ``x̂ = clip((x - c + d) / 2d, 0, 1)``, ``k = round_half_away(q_X · x̂)``,
  output ``k · 2d / q_X``;
* effective interval ``d' = max(d, 1e-6)``, ``c' = max(c, d')``.

Forward tolerances are stated in quantization steps ``s = 2d / q``; levels
``k`` are compared exactly (they are integers stored as floats).
"""

import numpy as np
import pytest

from qil_keras import ops
from qil_keras._keras import tf
from qil_keras.quantization.init import interval_from_values, mse_optimal_range
from qil_keras.quantization.quantizers import check_bits

ALL_BITS = list(range(2, 9))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def q_w(bits):
    return 2.0 ** (bits - 1) - 1.0


def q_x(bits):
    return 2.0 ** bits - 1.0


def np_weight_transform(w, c, d, gamma):
    """float64 reference of T_W for a valid interval (c >= d > 0, gamma > 0)."""
    u = np.clip((np.abs(w) - c + d) / (2.0 * d), 0.0, 1.0)
    return np.sign(w) * u ** gamma


def np_activation_transform(x, c, d):
    """float64 reference of T_X for a valid interval (c >= d > 0)."""
    return np.clip((x - c + d) / (2.0 * d), 0.0, 1.0)


def f32(x):
    """Round to float32 and back to float64, so the reference sees the same inputs as TF."""
    return np.asarray(x, np.float32).astype(np.float64)


def tf_grads(fn, args, dy):
    """Gradients of ``sum(dy * fn(*args))`` w.r.t. every argument (float32 TF)."""
    tensors = [tf.constant(a, tf.float32) for a in args]
    with tf.GradientTape() as tape:
        for t in tensors:
            tape.watch(t)
        loss = tf.reduce_sum(tf.constant(dy, tf.float32) * fn(*tensors))
    grads = tape.gradient(loss, tensors)
    return [np.zeros(np.shape(a)) if g is None else g.numpy().astype(np.float64)
            for a, g in zip(args, grads)]


def fd_grads(np_fn, args, dy, h=1e-6):
    """Central finite differences of ``sum(dy * np_fn(*args))`` in float64, one element at a time."""
    args = [np.array(a, np.float64) for a in args]
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [x.copy() for x in args]
            minus = [x.copy() for x in args]
            plus[i][idx] += h
            minus[i][idx] -= h
            g[idx] = (np.sum(dy * np_fn(*plus)) - np.sum(dy * np_fn(*minus))) / (2 * h)
        grads.append(g)
    return grads


def w_from_u(u, sign, c, d):
    """Weight whose normalized position in the interval is ``u`` (inverse of u(|w|))."""
    return sign * (c - d + 2.0 * d * np.asarray(u))


# Gradient tolerance. The TF side runs in float32 on inputs rounded to float32;
# the reference is float64 on the same rounded inputs, so u itself agrees to a
# few float32 ulps (|w| - c and + d are exact by Sterbenz's lemma for the points
# used) and the derivatives to ~1e-6 relative. Central FD with h = 1e-6 in float64
# has truncation + cancellation error < 1e-8 relative at the chosen points
# (all at least 5e-4 from a kink). rtol = 1e-4 leaves two orders of margin.
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


# --------------------------------------------------------------------------
# 1. golden forward values
# --------------------------------------------------------------------------

# Interval A: c = 0.5, d = 0.25 -> [0.25, 0.75], 2d = 0.5, u = (|w| - 0.25) / 0.5.
# Interval B: c = 0.3, d = 0.1  -> [0.2, 0.4],   2d = 0.2, u = (|w| - 0.2) / 0.2.
# Each row: (w, c, d, gamma, bits, k); expected output k * 2d / q_W.
WEIGHT_GOLDEN = [
    # --- 2 bits: q_W = 1, step 2d/1 = 0.5 (ternary) ---
    (0.1, 0.5, 0.25, 1.0, 2, 0),     # |w| < 0.25: pruned, u -> 0, k = 0
    (0.3, 0.5, 0.25, 1.0, 2, 0),     # u = 0.1, 1*0.1 = 0.1 -> 0
    (0.6, 0.5, 0.25, 1.0, 2, 1),     # u = 0.7 -> 0.7 -> 1
    (-0.6, 0.5, 0.25, 1.0, 2, -1),   # sign(w) = -1, |.| as above
    (0.9, 0.5, 0.25, 1.0, 2, 1),     # |w| > 0.75: clipped, u -> 1, k = 1
    (-2.0, 0.5, 0.25, 1.0, 2, -1),   # clipped, negative
    (0.6, 0.5, 0.25, 2.0, 2, 0),     # u^2 = 0.49 -> 0.49 -> 0
    (0.3, 0.5, 0.25, 0.5, 2, 0),     # sqrt(0.1) = 0.3162 -> 0
    (0.4, 0.5, 0.25, 0.5, 2, 1),     # u = 0.3, sqrt(0.3) = 0.5477 -> 1
    # --- 3 bits: q_W = 3, step 0.5/3 = 1/6 ---
    (0.2, 0.5, 0.25, 1.0, 3, 0),     # pruned
    (0.3, 0.5, 0.25, 1.0, 3, 0),     # 3*0.1 = 0.3 -> 0
    (0.4, 0.5, 0.25, 1.0, 3, 1),     # 3*0.3 = 0.9 -> 1
    (0.6, 0.5, 0.25, 1.0, 3, 2),     # 3*0.7 = 2.1 -> 2
    (-0.7, 0.5, 0.25, 1.0, 3, -3),   # u = 0.9, 3*0.9 = 2.7 -> 3, negative
    (1.0, 0.5, 0.25, 1.0, 3, 3),     # clipped
    (0.6, 0.5, 0.25, 2.0, 3, 1),     # 3*0.7^2 = 3*0.49 = 1.47 -> 1
    (-0.4, 0.5, 0.25, 2.0, 3, 0),    # 3*0.3^2 = 0.27 -> 0 (sign of 0 is 0)
    (0.6, 0.5, 0.25, 0.5, 3, 3),     # 3*sqrt(0.7) = 3*0.83666 = 2.50998 -> 3
    (0.3, 0.5, 0.25, 0.5, 3, 1),     # 3*sqrt(0.1) = 0.9487 -> 1
    (-0.37, 0.3, 0.1, 2.0, 3, -2),   # B: u = 0.85, 3*0.7225 = 2.1675 -> 2, negative
    # --- 4 bits: q_W = 7, step 0.5/7 = 1/14 ---
    (-0.1, 0.5, 0.25, 1.0, 4, 0),    # pruned
    (-0.3, 0.5, 0.25, 1.0, 4, -1),   # 7*0.1 = 0.7 -> 1, negative
    (0.4, 0.5, 0.25, 1.0, 4, 2),     # 7*0.3 = 2.1 -> 2
    (0.6, 0.5, 0.25, 1.0, 4, 5),     # 7*0.7 = 4.9 -> 5
    (0.74, 0.5, 0.25, 1.0, 4, 7),    # u = 0.98, 7*0.98 = 6.86 -> 7
    (0.8, 0.5, 0.25, 1.0, 4, 7),     # clipped
    (0.6, 0.5, 0.25, 2.0, 4, 3),     # 7*0.49 = 3.43 -> 3
    (-0.4, 0.5, 0.25, 2.0, 4, -1),   # 7*0.09 = 0.63 -> 1, negative
    (0.6, 0.5, 0.25, 0.5, 4, 6),     # 7*0.83666 = 5.8566 -> 6
    (0.3, 0.5, 0.25, 0.5, 4, 2),     # 7*0.316228 = 2.2136 -> 2
    (0.35, 0.3, 0.1, 1.0, 4, 5),     # B: u = 0.75, 7*0.75 = 5.25 -> 5 (output 5*0.2/7)
    # --- 8 bits: q_W = 127, step 0.5/127 = 1/254 ---
    (0.2, 0.5, 0.25, 1.0, 8, 0),     # pruned
    (0.3, 0.5, 0.25, 1.0, 8, 13),    # 127*0.1 = 12.7 -> 13
    (-0.45, 0.5, 0.25, 1.0, 8, -51), # u = 0.4, 127*0.4 = 50.8 -> 51, negative
    (0.6, 0.5, 0.25, 1.0, 8, 89),    # 127*0.7 = 88.9 -> 89
    (2.0, 0.5, 0.25, 1.0, 8, 127),   # clipped
    (0.6, 0.5, 0.25, 2.0, 8, 62),    # 127*0.49 = 62.23 -> 62
    (-0.4, 0.5, 0.25, 2.0, 8, -11),  # 127*0.09 = 11.43 -> 11, negative
    (0.6, 0.5, 0.25, 0.5, 8, 106),   # 127*0.836660 = 106.256 -> 106
    (0.3, 0.5, 0.25, 0.5, 8, 40),    # 127*0.316228 = 40.161 -> 40
    (0.15, 0.3, 0.1, 1.0, 8, 0),     # B: pruned (|w| < 0.2)
    (0.5, 0.3, 0.1, 1.0, 8, 127),    # B: clipped; output 127 * 0.2/127 = 2d = 0.2 (the
                                     # grid top is 2d, not c + d = 0.4: see ops docstring)
]


@pytest.mark.parametrize("w, c, d, gamma, bits, k", WEIGHT_GOLDEN)
def test_weight_golden_values(w, c, d, gamma, bits, k):
    """Hand-derived weight levels and quantized values (pruned, interior, clipped, ±, γ)."""
    step = 2.0 * d / q_w(bits)
    levels = ops.quantize_weight_levels(w, c, d, gamma, bits).numpy()
    assert levels == k  # exact integer
    out = ops.quantize_weight(w, c, d, gamma, bits).numpy()
    # float32 rounding of k * s with |k| <= 127 is < 127 * 2^-23 s ~ 2e-5 s.
    np.testing.assert_allclose(out, k * step, rtol=0, atol=1e-4 * step)
    w_hat = ops.weight_transform(w, c, d, gamma).numpy()
    np.testing.assert_allclose(w_hat, np_weight_transform(w, c, d, gamma), rtol=0, atol=1e-6)


# Interval A: c = 1.0, d = 0.5 -> [0.5, 1.5], 2d = 1, x̂ = clip(x - 0.5, 0, 1).
# Interval B: c = 0.3, d = 0.2 -> [0.1, 0.5], 2d = 0.4, x̂ = clip((x - 0.1) / 0.4, 0, 1).
# Each row: (x, c, d, bits, k); expected output k * 2d / q_X.
ACTIVATION_GOLDEN = [
    # --- 2 bits: q_X = 3, step 1/3 ---
    (-1.0, 1.0, 0.5, 2, 0),    # negative input, below the interval
    (0.0, 1.0, 0.5, 2, 0),     # zero
    (0.2, 1.0, 0.5, 2, 0),     # below 0.5
    (0.9, 1.0, 0.5, 2, 1),     # x̂ = 0.4, 3*0.4 = 1.2 -> 1
    (1.2, 1.0, 0.5, 2, 2),     # x̂ = 0.7, 3*0.7 = 2.1 -> 2
    (2.0, 1.0, 0.5, 2, 3),     # clipped
    (0.45, 0.3, 0.2, 2, 3),    # B: x̂ = 0.875, 3*0.875 = 2.625 -> 3 (output 2d = 0.4)
    # --- 3 bits: q_X = 7, step 1/7 ---
    (0.6, 1.0, 0.5, 3, 1),     # 7*0.1 = 0.7 -> 1
    (0.9, 1.0, 0.5, 3, 3),     # 7*0.4 = 2.8 -> 3
    (1.2, 1.0, 0.5, 3, 5),     # 7*0.7 = 4.9 -> 5
    (1.6, 1.0, 0.5, 3, 7),     # clipped
    # --- 4 bits: q_X = 15, step 1/15 ---
    (0.55, 1.0, 0.5, 4, 1),    # 15*0.05 = 0.75 -> 1
    (0.9, 1.0, 0.5, 4, 6),     # 15*0.4 = 6.0 -> 6
    (1.23, 1.0, 0.5, 4, 11),   # 15*0.73 = 10.95 -> 11
    (3.0, 1.0, 0.5, 4, 15),    # clipped
    (0.25, 0.3, 0.2, 4, 6),    # B: x̂ = 0.375, 15*0.375 = 5.625 -> 6 (output 6*0.4/15 = 0.16)
    # --- 8 bits: q_X = 255, step 1/255 ---
    (0.4, 1.0, 0.5, 8, 0),     # below
    (0.7, 1.0, 0.5, 8, 51),    # 255*0.2 = 51.0 -> 51
    (0.9, 1.0, 0.5, 8, 102),   # 255*0.4 = 102.0 -> 102
    (1.23, 1.0, 0.5, 8, 186),  # 255*0.73 = 186.15 -> 186
    (10.0, 1.0, 0.5, 8, 255),  # clipped
    (0.05, 0.3, 0.2, 8, 0),    # B: below 0.1
]


@pytest.mark.parametrize("x, c, d, bits, k", ACTIVATION_GOLDEN)
def test_activation_golden_values(x, c, d, bits, k):
    """Hand-derived activation levels and quantized values (below, interior, clipped)."""
    step = 2.0 * d / q_x(bits)
    levels = ops.quantize_activation_levels(x, c, d, bits).numpy()
    assert levels == k  # exact integer
    out = ops.quantize_activation(x, c, d, bits).numpy()
    # float32 rounding of k * s with k <= 255 is < 255 * 2^-23 s ~ 3e-5 s.
    np.testing.assert_allclose(out, k * step, rtol=0, atol=1e-4 * step)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_interval_reflected_when_c_below_d(bits):
    """c < d behaves as c' = 2d - c (lower threshold |c - d|): zero maps to exactly zero."""
    # 0.72 rather than 0.7: 0.7 · 15 = 10.5 is a rounding tie, where float32 formulas differ.
    x = np.array([0.0, 0.05, 0.3, 0.72, 1.5], np.float32)
    out = ops.quantize_activation(x, 0.1, 0.5, bits).numpy()
    assert out[0] == 0.0
    np.testing.assert_array_equal(out, ops.quantize_activation(x, 0.9, 0.5, bits).numpy())
    # With c' = 0.9, d' = 0.5 the interval is [0.4, 1.4]: k = round(q (x - 0.4) / 1.0), clipped.
    q = q_x(bits)
    expected = np.floor(np.clip(x - 0.4, 0.0, 1.0) * q + 0.5) / q
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 / q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_interval_reflected_when_c_below_d(bits):
    """For weights too, c < d gives the output of c' = 2d - c."""
    w = np.array([-0.9, -0.2, 0.0, 0.1, 0.45, 1.2], np.float32)
    np.testing.assert_array_equal(
        ops.quantize_weight(w, 0.1, 0.5, 1.0, bits).numpy(),
        ops.quantize_weight(w, 0.9, 0.5, 1.0, bits).numpy(),
    )


@pytest.mark.parametrize("quantizer", ["weight", "activation"])
def test_lower_threshold_gradient_never_vanishes(quantizer):
    """Issue #16: with values inside the interval, ∂/∂c is non-zero for c above, at and below d.

    The transform is linear inside the interval, so these are exact: for the activation
    ``T = (x - c' + d) / 2d`` and ``c' = c`` (c ≥ d) or ``2d - c`` (c < d), so
    ``∂T/∂c = -1/2d`` above and ``+1/2d`` below; at ``c = d`` (the initial interval) the
    ``c' = c`` branch. Weights (γ = 1): the same times ``sign(w)``.
    """
    d = 0.5
    for c, sign_c in ((0.7, -1.0), (0.5, -1.0), (0.3, 1.0)):
        lower = abs(c - d)
        v = np.float32(lower + 0.4)  # inside [c' - d, c' + d] = [lower, lower + 1]
        c_t = tf.constant(c, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(c_t)
            if quantizer == "weight":
                out = ops.weight_transform(tf.constant([v, -v]), c_t, d) * tf.constant([1.0, -1.0])
            else:
                out = ops.activation_transform(tf.constant([v]), c_t, d)
            total = tf.reduce_sum(out)
        grad = float(tape.gradient(total, c_t).numpy())
        per_value = sign_c / (2 * d)
        assert grad == pytest.approx(per_value * (2 if quantizer == "weight" else 1), rel=1e-6), c


def test_reflected_interval_gradients_match_finite_differences():
    """Through the reflection, dT/d(c, d) equal float64 central differences (c < d)."""
    x = f32([0.15, 0.4, 0.9])  # inside [|c - d|, |c - d| + 2d] = [0.1, 1.1]

    def np_activation(x, c, d):
        c_eff = d + np.abs(c - d)
        return np.clip((x - c_eff + d) / (2 * d), 0.0, 1.0)

    args = [x, f32(0.4), f32(0.5)]
    dy = np.array([0.7, 1.1, 1.3])
    got = tf_grads(ops.activation_transform, args, dy)
    want = fd_grads(np_activation, args, dy)
    for name, g, e in zip("x c d".split(), got, want):
        np.testing.assert_allclose(g, e, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


def np_weight_width(c, d):
    """The width a weight interval is used with: ``d`` reflected at ``δ = max(|c|/16, 1e-6)``."""
    floor = max(abs(c) / 16.0, 1e-6)
    return floor + abs(d - floor)


@pytest.mark.parametrize("d", [0.0, -1.0])
@pytest.mark.parametrize("c", [0.0, 0.5])
def test_nonpositive_d_gives_finite_output_and_gradients(c, d):
    """d <= 0: activations use d' = 1e-6, weights the width reflected at max(|c|/16, 1e-6);
    finite outputs on the grid of that width, finite gradients."""
    w = tf.constant([-0.7, -0.3, 0.0, 0.3, 0.7], tf.float32)
    x = tf.constant([0.0, 0.3, 0.7], tf.float32)
    c_t, d_t = tf.constant(c), tf.constant(d)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([w, x, c_t, d_t])
        out_w = ops.quantize_weight(w, c_t, d_t, 1.0, 4)
        out_x = ops.quantize_activation(x, c_t, d_t, 4)
    step = 2 * np_weight_width(c, d) / 7
    levels_w = out_w.numpy() / step
    assert np.all(np.isfinite(levels_w))
    assert np.all(np.abs(levels_w - np.round(levels_w)) < 1e-3)
    assert np.all(np.abs(levels_w) <= 7 + 1e-3)
    assert np.all(np.isfinite(out_x.numpy())) and out_x.numpy()[0] == 0.0
    assert np.all(out_x.numpy() <= 2e-6 * (1 + 1e-5))
    for out in (out_w, out_x):
        for g in tape.gradient(out, [c_t, d_t]):
            assert g is None or np.all(np.isfinite(g.numpy()))


def test_weight_width_reflected_below_a_sixteenth_of_the_centre():
    """A weight interval narrower than |c|/16 is used with its width reflected there.

    c = 0.32: δ = 0.02, so d = 0.005 acts as d' = 2·0.02 - 0.005 = 0.035, interval
    [0.285, 0.355], and the 4-bit level of |w| inside is round(7 (|w| - 0.285) / 0.07):
    0.296 → round(1.1) = 1, 0.332 → round(4.7) = 5; 0.2 → 0 and 0.4 → 7 (clipped).
    d = 0.05 ≥ δ is used as is: [0.27, 0.37], level round(70 (|w| - 0.27)):
    0.296 → round(1.82) = 2, 0.332 → round(4.34) = 4. (No value is near a rounding tie.)
    """
    w = np.array([0.2, -0.296, 0.332, -0.4], np.float32)
    np.testing.assert_array_equal(ops.quantize_weight_levels(w, 0.32, 0.005, 1.0, 4).numpy(),
                                  [0, -1, 5, -7])
    np.testing.assert_array_equal(
        ops.quantize_weight(w, 0.32, 0.005, 1.0, 4).numpy(),
        ops.quantize_weight(w, 0.32, 0.035, 1.0, 4).numpy())
    np.testing.assert_array_equal(ops.quantize_weight_levels(w, 0.32, 0.05, 1.0, 4).numpy(),
                                  [0, -2, 4, -7])
    # Activations keep their width (an activation interval may sit far from zero): [0.315,
    # 0.325], level round(1500 (x - 0.315)): 0.3213 → round(9.45) = 9 (reflected it would be
    # round(15 · 0.0363 / 0.07) = round(7.78) = 8), 0.33 → 15 (clipped).
    x = np.array([0.3, 0.3213, 0.33], np.float32)
    np.testing.assert_array_equal(ops.quantize_activation_levels(x, 0.32, 0.005, 4).numpy(),
                                  [0, 9, 15])


def test_reflected_weight_width_gradients_match_finite_differences():
    """Through the width's reflection (d below |c|/16), dT_W/d(w, c, d) equal float64 central
    differences, the floor's dependence on c included."""
    c, d = 0.32, 0.005

    def np_transform(w, c, d):
        width = np.abs(c) / 16.0 + np.abs(d - np.abs(c) / 16.0)
        centre = width + np.abs(c - width)
        return np_weight_transform(w, centre, width, 1.0)

    # inside the used interval [c' - d', c' + d'] = [0.285, 0.355] (c' = c here), both signs
    args = [f32([0.29, -0.31, 0.335, -0.35]), f32(c), f32(d)]
    dy = np.array([0.7, 1.1, -1.3, 0.9])
    got = tf_grads(lambda w, c, d: ops.weight_transform(w, c, d, 1.0), args, dy)
    want = fd_grads(np_transform, args, dy)
    for name, g, e in zip("w c d".split(), got, want):
        np.testing.assert_allclose(g, e, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


def test_weight_gradients_stay_bounded_as_the_width_collapses():
    """The failure this guards against (CIFAR-10 study, 2/2 ResNet-20): the straight-through
    gradient pulls a ternary layer's width down to the constraint's ε = 1e-6, where the slope
    0.5/d of T_W is 5·10^5 and one batch moved d from 1e-6 to 1.7 (every weight pruned). With the
    width reflected at |c|/16 the slope is at most 8/|c|; with the chain through the floor (at most
    2/16 of it on c) every per-weight derivative of T_W is below 16/|c| = 800 at c = 0.02.
    """
    c = 0.02
    # a dense grid of magnitudes around the centre, including the old ε-wide interval
    mags = np.concatenate([np.linspace(0.0, 2 * c, 4001), c + np.array([-5e-7, 0.0, 5e-7])])
    w = tf.constant(np.concatenate([mags, -mags]), tf.float32)
    c_t, d_t = tf.constant(c, tf.float32), tf.constant(1e-6, tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([w, c_t, d_t])
        out = ops.weight_transform(w, c_t, d_t, 1.0)
    per_weight = {"w": tape.gradient(out, w).numpy(),
                  "c": tape.jacobian(out, c_t).numpy(), "d": tape.jacobian(out, d_t).numpy()}
    for name, g in per_weight.items():
        assert np.all(np.isfinite(g)), name
        assert np.max(np.abs(g)) < 16.0 / c, (name, float(np.max(np.abs(g))))
    assert np.max(np.abs(per_weight["w"])) > 1.0  # the interval still has a slope to learn from


# --------------------------------------------------------------------------
# 2. rounding and the straight-through estimator
# --------------------------------------------------------------------------

@pytest.mark.parametrize("x, expected", [
    (0.5, 1.0), (-0.5, -1.0), (1.5, 2.0), (2.5, 3.0), (-2.5, -3.0),
    (0.49, 0.0), (-1.4, -1.0), (0.0, 0.0), (126.5, 127.0),
])
def test_round_half_away(x, expected):
    """Ties round away from zero (not to even); exact integers out."""
    assert ops.round_half_away(tf.constant(x)).numpy() == expected
    assert ops.round_ste(tf.constant(x)).numpy() == expected


def test_round_ste_identity_gradient():
    """round_ste passes the upstream gradient unchanged, at ties and elsewhere."""
    x = tf.constant([-2.5, -0.3, 0.0, 0.5, 0.7, 3.2], tf.float32)
    dy = tf.constant([1.0, -2.0, 3.0, 0.25, -5.0, 7.0], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = ops.round_ste(x)
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=dy).numpy(), dy.numpy())


# --------------------------------------------------------------------------
# 3. weight transformer gradients
# --------------------------------------------------------------------------

C_W, D_W = 0.5, 0.25
INTERIOR_U = [1e-3, 0.3, 0.5, 0.999]
GAMMAS = [0.5, 1.0, 2.0]


def _interior_weights():
    """Weights at u = 1e-3, 0.3, 0.5, 0.999, both signs, for interval (C_W, D_W)."""
    u = np.array(INTERIOR_U * 2)
    sign = np.repeat([1.0, -1.0], len(INTERIOR_U))
    return f32(w_from_u(u, sign, C_W, D_W))


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("per_element", [False, True], ids=["scalar", "per_element"])
def test_weight_transform_gradients_match_finite_differences(gamma, per_element):
    """dT_W/d(w, c, d, γ) inside the interval equal float64 central differences."""
    w = _interior_weights()
    shape = w.shape if per_element else ()
    args = [w, f32(np.full(shape, C_W)), f32(np.full(shape, D_W)), f32(np.full(shape, gamma))]
    dy = np.random.default_rng(0).uniform(0.5, 1.5, w.shape)
    got = tf_grads(ops.weight_transform, args, dy)
    want = fd_grads(np_weight_transform, args, dy)
    for name, g, e in zip("w c d gamma".split(), got, want):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


def test_weight_transform_gradients_per_channel():
    """Per-channel c, d, γ of shape (out,) on a (k, k, in, out) kernel: FD-exact, summed to (out,)."""
    rng = np.random.default_rng(1)
    c = f32([0.5, 0.3, 0.8, 0.2])
    d = f32([0.25, 0.1, 0.3, 0.15])
    gamma = f32([0.5, 1.0, 2.0, 1.5])
    # Positions u in [-0.4, 1.4] (pruned, interior and clipped), kept >= 0.02
    # away from the kinks at u = 0 and u = 1 so that FD never straddles one.
    u = rng.uniform(-0.4, 1.4, (3, 3, 2, 4))
    u[np.abs(u) < 0.02] = 0.5
    u[np.abs(u - 1.0) < 0.02] = 0.5
    sign = rng.choice([-1.0, 1.0], u.shape)
    w = f32(np.abs(w_from_u(u, 1.0, c, d)) * sign)  # |.|: a pruned w never crosses 0
    assert (u < 0).any() and ((u > 0) & (u < 1)).any() and (u > 1).any()
    dy = rng.uniform(0.5, 1.5, w.shape)
    args = [w, c, d, gamma]
    got = tf_grads(ops.weight_transform, args, dy)
    want = fd_grads(np_weight_transform, args, dy)
    for name, g, e, a in zip("w c d gamma".split(), got, want, args):
        assert g.shape == np.shape(a), name
        np.testing.assert_allclose(g, e, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_weight_transform_gradients_closed_form(gamma):
    """Inside: the closed forms of REFERENCE §1 (α = 0.5/d), elementwise."""
    w = _interior_weights()
    n = w.shape
    args = [w, np.full(n, C_W), np.full(n, D_W), np.full(n, gamma)]
    g_w, g_c, g_d, g_gamma = tf_grads(ops.weight_transform, args, np.ones(n))
    a = np.abs(w)
    u = (a - C_W + D_W) / (2 * D_W)
    alpha = 0.5 / D_W
    slope = gamma * u ** (gamma - 1)
    s = np.sign(w)
    np.testing.assert_allclose(g_w, slope * alpha, rtol=GRAD_RTOL)
    np.testing.assert_allclose(g_c, -slope * alpha * s, rtol=GRAD_RTOL)
    np.testing.assert_allclose(g_d, slope * (alpha / D_W) * (C_W - a) * s, rtol=GRAD_RTOL,
                               atol=GRAD_ATOL)
    np.testing.assert_allclose(g_gamma, u ** gamma * np.log(u) * s, rtol=GRAD_RTOL,
                               atol=GRAD_ATOL)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_weight_transform_gradients_zero_outside(gamma):
    """Pruned (|w| < c-d) and clipped (|w| > c+d) weights get exactly zero gradient for w, c, d, γ."""
    w = np.array([0.0, 0.1, -0.2, 0.249, 0.751, -0.8, 1.5, -3.0])
    n = w.shape
    for shape in [(), n]:
        args = [w, np.full(shape, C_W), np.full(shape, D_W), np.full(shape, gamma)]
        for name, g in zip("w c d gamma".split(), tf_grads(ops.weight_transform, args, np.ones(n))):
            assert np.all(g == 0.0), (name, shape, g)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_weight_transform_gradients_finite_at_tiny_u(gamma):
    """At u = 0 exactly and u < 1e-6 all gradients are finite; dŵ/dγ stays near its limit 0."""
    # |w| = c - d exactly (u = 0), one float32 ulp above (u = 2^-24), u ~ 5e-7, u = 1e-3.
    a = np.array([0.25, 0.25 + 2.0 ** -25, 0.25 + 2.5e-7, 0.2505], np.float32)
    w = np.concatenate([a, -a]).astype(np.float64)
    n = w.shape
    args = [w, np.full(n, C_W), np.full(n, D_W), np.full(n, gamma)]
    grads = tf_grads(ops.weight_transform, args, np.ones(n))
    for name, g in zip("w c d gamma".split(), grads):
        assert np.all(np.isfinite(g)), (name, g)
    u = (np.abs(w) - C_W + D_W) / (2 * D_W)
    exact = np.where(u > 0, u ** gamma * np.log(np.where(u > 0, u, 1.0)), 0.0) * np.sign(w)
    # For γ >= 0.5 and u <= 1e-6, |u^γ ln u| <= 1e-3 * 13.8 < 0.02: dropping the
    # term below u = 1e-6 (ops._U_FLOOR) is within that of the true value.
    np.testing.assert_allclose(grads[3], exact, rtol=1e-4, atol=0.02)


# --------------------------------------------------------------------------
# 4. activation transformer gradients
# --------------------------------------------------------------------------

C_X, D_X = 0.8, 0.3  # interval [0.5, 1.1]


@pytest.mark.parametrize("per_element", [False, True], ids=["scalar", "per_element"])
def test_activation_transform_gradients_match_finite_differences(per_element):
    """dT_X/d(x, c, d) inside the interval equal float64 central differences."""
    x = f32(C_X - D_X + 2 * D_X * np.array([1e-3, 0.3, 0.5, 0.999]))
    shape = x.shape if per_element else ()
    args = [x, f32(np.full(shape, C_X)), f32(np.full(shape, D_X))]
    dy = np.random.default_rng(2).uniform(0.5, 1.5, x.shape)
    got = tf_grads(ops.activation_transform, args, dy)
    want = fd_grads(np_activation_transform, args, dy)
    for name, g, e in zip("x c d".split(), got, want):
        # Cancellation in x - c + d near the ends costs a few float32 ulps of the
        # 0.6-wide interval (~1e-7 absolute in x̂): far below rtol on O(1) slopes.
        np.testing.assert_allclose(g, e, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


def test_activation_transform_gradients_zero_outside():
    """Below c-d and above c+d the gradients w.r.t. x, c, d are exactly zero."""
    x = np.array([-1.0, 0.0, 0.3, 0.499, 1.101, 2.0, 50.0])
    for shape in [(), x.shape]:
        args = [x, np.full(shape, C_X), np.full(shape, D_X)]
        for name, g in zip("x c d".split(), tf_grads(ops.activation_transform, args, np.ones(x.shape))):
            assert np.all(g == 0.0), (name, shape, g)


# --------------------------------------------------------------------------
# 5. gradients through the full quantizers (straight-through discretizer)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_quantize_weight_gradients_straight_through(bits, gamma):
    """Output k·2d/q: d/dw = 2d ∂ŵ/∂w, d/dc = 2d ∂ŵ/∂c, d/dd = 2k/q + 2d ∂ŵ/∂d, d/dγ = 2d ∂ŵ/∂γ."""
    # u = 0.3 and 0.7, both signs (not u = 0.5, where |w| = c and ∂ŵ/∂d = 0).
    w = f32(w_from_u(np.array([0.3, 0.7, 0.3, 0.7]), np.array([1.0, 1.0, -1.0, -1.0]), C_W, D_W))
    n = w.shape
    args = [w, np.full(n, C_W), np.full(n, D_W), np.full(n, gamma)]
    g_w, g_c, g_d, g_gamma = tf_grads(
        lambda *a: ops.quantize_weight(*a, bits), args, np.ones(n))
    t_w, t_c, t_d, t_gamma = tf_grads(ops.weight_transform, args, np.ones(n))
    k = ops.quantize_weight_levels(*[tf.constant(a, tf.float32) for a in args], bits).numpy()
    q = q_w(bits)
    np.testing.assert_allclose(g_w, 2 * D_W * t_w, rtol=1e-5)
    np.testing.assert_allclose(g_c, 2 * D_W * t_c, rtol=1e-5)
    np.testing.assert_allclose(g_d, 2 * k / q + 2 * D_W * t_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_gamma, 2 * D_W * t_gamma, rtol=1e-5)
    assert np.all(g_w > 0) and np.all(g_c != 0) and np.all(g_d != 0)
    if gamma == 1.0:
        np.testing.assert_allclose(g_w, 1.0, rtol=1e-6)  # the STE passes dy unchanged


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_weight_gradients_outside(bits):
    """Pruned: all zero. Clipped (k = ±q): only the scale term, d/dd = ±2, others zero."""
    w = np.array([0.1, -0.2, 0.9, -1.5])
    n = w.shape
    args = [w, np.full(n, C_W), np.full(n, D_W), np.full(n, 2.0)]
    g_w, g_c, g_d, g_gamma = tf_grads(
        lambda *a: ops.quantize_weight(*a, bits), args, np.ones(n))
    np.testing.assert_array_equal(g_w, 0.0)
    np.testing.assert_array_equal(g_c, 0.0)
    np.testing.assert_array_equal(g_gamma, 0.0)
    np.testing.assert_allclose(g_d, [0.0, 0.0, 2.0, -2.0], rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_activation_gradients_straight_through(bits):
    """Inside: d/dx = 1, d/dc = -1, d/dd = 2k/q + (c - x)/d (STE + scale); outside d/dx = d/dc = 0."""
    x = f32([0.6, 0.75, 1.0, 0.1, 2.0])  # three inside [0.5, 1.1], one below, one above
    n = x.shape
    args = [x, np.full(n, C_X), np.full(n, D_X)]
    g_x, g_c, g_d = tf_grads(lambda *a: ops.quantize_activation(*a, bits), args, np.ones(n))
    k = ops.quantize_activation_levels(*[tf.constant(a, tf.float32) for a in args], bits).numpy()
    q = q_x(bits)
    inside = np.array([True, True, True, False, False])
    np.testing.assert_allclose(g_x, np.where(inside, 1.0, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_c, np.where(inside, -1.0, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_d, 2 * k / q + np.where(inside, (C_X - x) / D_X, 0.0),
                               rtol=1e-5, atol=1e-6)
    assert np.all(g_d[inside] != 0)


def _composed_quantize_activation(x, c, d, bits):
    """The activation quantizer as the plain composition (autodiff through clip and the STE)."""
    _, d_eff = ops.effective_interval(c, d)
    return ops.quantize_activation_levels(x, c, d, bits) * (2.0 * d_eff / ops.activation_levels(bits))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
def test_fused_activation_quantizer_equals_the_composition(bits, per_channel):
    """``quantize_activation`` (one custom-gradient op) gives the composition's values (bit for bit
    away from rounding ties) and its gradients up to float32 rounding: at the interval ends too (a ReLU zero with c' = d'
    gives u = 0 exactly, where clip still passes the gradient), and broadcast per channel."""
    channels = 3
    c = np.array([0.8, 0.3, 0.5]) if per_channel else np.float32(0.8)
    d = np.array([0.3, 0.3, 0.5]) if per_channel else np.float32(0.3)
    lo, hi = np.maximum(c, d) - d, np.maximum(c, d) + d
    rng = np.random.default_rng(7)
    x = rng.uniform(-0.5, 2.0, (5, 4, channels)).astype(np.float32)
    x[0, 0] = lo  # u = 0 exactly
    x[0, 1] = hi  # u = 1 exactly
    x[0, 2] = 0.0  # a ReLU zero: u = 0 exactly in the channels where c = d
    dy = rng.uniform(0.5, 1.5, x.shape)
    got = tf_grads(lambda *a: ops.quantize_activation(*a, bits), [x, c, d], dy)
    # The quantizer's contract is the composition after a ReLU (its docstring), for negative
    # inputs and exact zeros too.
    want = tf_grads(lambda x, c, d: _composed_quantize_activation(tf.nn.relu(x), c, d, bits),
                    [x, c, d], dy)
    for name, g, e in zip("x c d".split(), got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
    fused = ops.quantize_activation(x, c, d, bits).numpy()
    composed = _composed_quantize_activation(x, c, d, bits).numpy()
    # The scalar path computes the level from x - (c - d) (TensorFlow's FakeQuant kernel), the
    # composition from (x - c + d) / 2d: they may differ by one level only where the value is
    # within float32 rounding (here 1e-5 levels) of a rounding boundary. None is this close here,
    # so every value must match bit for bit.
    c_eff, d_eff = np.maximum(c, d), d
    u = (x.astype(np.float64) - c_eff + d_eff) / (2 * d_eff) * q_x(bits)
    inside = (u > 0) & (u < q_x(bits))
    assert np.min(np.abs(u - np.floor(u) - 0.5)[inside]) > 1e-5
    np.testing.assert_array_equal(fused, composed)
    assert np.any(got[0] == 0) and np.any(got[0] != 0)  # both sides of the interval occur


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
@pytest.mark.parametrize("lower", [0.0, 0.2], ids=["lower_0", "lower_0.2"])
def test_activation_quantizer_of_x_equals_it_after_a_relu(per_channel, lower):
    """``quantize_activation(x)`` has the values and the gradients (x, c, d) of
    ``quantize_activation(relu(x))`` for inputs with negative values (none exactly 0): what lets
    ``QILReLU`` skip the ReLU in training. With the lower threshold at 0 (every interval's
    start) ReLU's zeros lie on it and count for c and d; the plain composition on x leaves them
    out, so the gradient of c differs from it there by -Σ dy over the negative inputs. Exact
    zeros (frequent in residual sums of quantized tensors) get ReLU's gradient 0."""
    d = np.array([0.5, 0.4, 0.6]) if per_channel else np.float32(0.5)
    c = d + lower
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.0, 2.0, (6, 5, 3)).astype(np.float32)
    x[0] = 0.0
    dy = rng.uniform(0.5, 1.5, x.shape)
    fused = tf_grads(lambda *a: ops.quantize_activation(*a, 3), [x, c, d], dy)
    relu_first = tf_grads(lambda x, c, d: ops.quantize_activation(tf.nn.relu(x), c, d, 3),
                          [x, c, d], dy)
    for name, g, e in zip("x c d".split(), fused, relu_first):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(ops.quantize_activation(x, c, d, 3).numpy(),
                                  ops.quantize_activation(tf.nn.relu(x), c, d, 3).numpy())
    plain = tf_grads(lambda *a: _composed_quantize_activation(*a, 3), [x, c, d], dy)
    axes = (0, 1) if per_channel else None
    negative = np.sum(np.where(x < 0, dy, 0.0), axis=axes)  # x = 0 is inside for both
    np.testing.assert_allclose(fused[1] - plain[1], -negative if lower == 0.0 else 0.0,
                               rtol=1e-5, atol=1e-4)


def _composed_quantize_weight(w, c, d, gamma, bits):
    """The weight quantizer as the plain composition (autodiff through T_W and the STE)."""
    _, d_eff = ops.effective_weight_interval(c, d)
    return (ops.quantize_weight_levels(w, c, d, gamma, bits)
            * (2.0 * d_eff / ops.weight_levels(bits)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per_channel"])
def test_fused_weight_quantizer_equals_the_composition(bits, gamma, per_channel):
    """``quantize_weight`` (one custom-gradient op) gives the composition's values bit for bit
    (the export reads the levels from ``quantize_weight_levels``, so the two must agree) and its
    gradients to float32 rounding, at the interval ends and per channel."""
    channels = 3
    c = np.array([0.5, 0.3, 0.2]) if per_channel else np.float32(C_W)
    d = np.array([0.25, 0.1, 0.2]) if per_channel else np.float32(D_W)
    g = np.array([gamma, 1.0, 0.7]) if per_channel else np.float32(gamma)
    rng = np.random.default_rng(11)
    w = rng.uniform(-1.0, 1.0, (3, 3, 4, channels)).astype(np.float32)
    w[0, 0, 0] = np.maximum(c, d) - d  # u = 0 exactly (pruned end)
    w[0, 0, 1] = -(np.maximum(c, d) + d)  # u = 1 exactly (clipped end)
    dy = rng.uniform(0.5, 1.5, w.shape)
    got = tf_grads(lambda *a: ops.quantize_weight(*a, bits), [w, c, d, g], dy)
    want = tf_grads(lambda *a: _composed_quantize_weight(*a, bits), [w, c, d, g], dy)
    for name, a, e in zip("w c d gamma".split(), got, want):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(ops.quantize_weight(w, c, d, g, bits).numpy(),
                                  _composed_quantize_weight(w, c, d, g, bits).numpy())
    assert np.any(got[0] == 0) and np.any(got[0] != 0)  # pruned or clipped, and inside


# --------------------------------------------------------------------------
# 6. grid membership
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("c, d", [(0.8, 0.6), (0.3, 0.7)], ids=["valid", "c<d"])
def test_weight_outputs_on_grid(bits, gamma, c, d):
    """Random-normal weights land on k·s with s = 2d'/q_W, |k| <= q_W; 2 bits are ternary."""
    w = np.random.default_rng(bits).standard_normal(4000).astype(np.float32)
    q = q_w(bits)
    d_eff = max(d, 1e-6)
    s = np.float32(2 * d_eff / q)
    out = ops.quantize_weight(w, c, d, gamma, bits).numpy()
    k = out / s
    assert np.all(np.abs(k - np.round(k)) <= 1e-4)
    assert np.all(np.abs(k) <= q + 1e-4)
    levels = ops.quantize_weight_levels(w, c, d, gamma, bits).numpy()
    np.testing.assert_array_equal(levels, np.round(levels))  # exact integers
    np.testing.assert_allclose(k, levels, rtol=0, atol=1e-4)
    assert len(np.unique(levels)) <= 2 * q + 1
    if bits == 2:
        np.testing.assert_array_equal(np.unique(levels), [-1.0, 0.0, 1.0])
        np.testing.assert_allclose(np.unique(out), [-s, 0.0, s], rtol=0, atol=1e-6 * s)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("c, d", [(1.0, 0.7), (0.3, 0.7)], ids=["valid", "c<d"])
def test_activation_outputs_on_grid(bits, c, d):
    """Non-negative inputs use levels 0..q_X only (on the grid k·2d'/q_X), zero maps to zero."""
    rng = np.random.default_rng(10 + bits)
    x = np.abs(rng.standard_normal(4000)).astype(np.float32)
    x[:100] = 0.0
    q = q_x(bits)
    s = np.float32(2 * d / q)
    out = ops.quantize_activation(x, c, d, bits).numpy()
    assert np.all(out[:100] == 0.0)
    k = out / s
    assert np.all(np.abs(k - np.round(k)) <= 1e-4)
    levels = ops.quantize_activation_levels(x, c, d, bits).numpy()
    np.testing.assert_array_equal(levels, np.round(levels))
    assert levels.min() == 0 and levels.max() <= q
    np.testing.assert_allclose(k, levels, rtol=0, atol=1e-4)
    if bits == 2:
        assert set(np.unique(levels)) == {0.0, 1.0, 2.0, 3.0}


# --------------------------------------------------------------------------
# 7. interval initialization
# --------------------------------------------------------------------------

def test_mse_optimal_range_uniform_8bit_is_full_range():
    """Uniform on [0, 1], q = 255: clipping never pays, h ~ max within one candidate spacing."""
    v = np.random.default_rng(3).uniform(0.0, 1.0, 100_000)
    h = mse_optimal_range(v, 255)
    assert abs(h - 1.0) <= v.max() / 100
    c, d = interval_from_values(v, 255)
    assert c == d == np.float32(h) / 2


def _half_normal_ternary_optimum():
    """argmin_h E[(Q_h(v) - v)^2], v = |N(0,1)|, Q_h(v) = 0 if v < h/2 else h (q = 1),
    by brute force over h in steps of 1e-3 with trapezoidal integration of the density."""
    v = np.linspace(0.0, 8.0, 20001)
    pdf = np.sqrt(2.0 / np.pi) * np.exp(-v * v / 2.0)
    hs = np.arange(0.5, 2.5, 1e-3)
    mse = [np.trapezoid(pdf * np.where(v < h / 2, v * v, (v - h) ** 2), v) for h in hs]
    return hs[int(np.argmin(mse))]


def test_mse_optimal_range_ternary_normal():
    """|N(0,1)| at q = 1: h is the brute-force optimum (~1.224) within 2 candidate spacings."""
    v = np.random.default_rng(4).standard_normal(100_000)
    h_star = _half_normal_ternary_optimum()
    assert 1.15 < h_star < 1.30  # sanity: the known ternary optimum (threshold ~0.61)
    h = mse_optimal_range(v, 1)
    assert abs(h - h_star) <= 2 * np.abs(v).max() / 100


@pytest.mark.parametrize("axes, shape", [((-1,), (8,)), ((-2, -1), (4, 8))])
def test_interval_from_values_per_channel(axes, shape):
    """channel_axes keeps those axes; each entry is c = d = h/2 of that channel's values."""
    values = np.random.default_rng(5).standard_normal((3, 3, 4, 8)).astype(np.float32)
    c, d = interval_from_values(values, 7, channel_axes=axes)
    assert c.shape == shape and d.shape == shape
    assert c.dtype == np.float32
    np.testing.assert_array_equal(c, d)
    for idx in np.ndindex(shape):
        channel = values[(Ellipsis,) + idx]
        assert c[idx] == np.float32(mse_optimal_range(channel, 7)) / 2
    assert len(np.unique(c)) > 1  # genuinely per channel


# --------------------------------------------------------------------------
# 8. bit-width validation
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 9, 2.5, True, "4"])
def test_check_bits_rejects(bits):
    """Out-of-range or non-integer bit widths raise, naming the allowed range 2 to 8."""
    with pytest.raises((TypeError, ValueError), match="from 2 to 8"):
        check_bits(bits)


@pytest.mark.parametrize("bits", [2, 8, np.int64(3)])
def test_check_bits_accepts(bits):
    """Integers 2..8, numpy integers included, are accepted and returned as int."""
    out = check_bits(bits)
    assert out == int(bits) and type(out) is int

