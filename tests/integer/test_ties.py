"""The rounding-tie guard of residual sums (``qil_keras.ties``), against the real LiteRT kernels."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import qil_keras
from qil_keras import keras, ties
from qil_keras._keras import tf
from qil_keras.integer.export import _convert, _converter
from qil_keras.integer.emission import AffineSum, ResidualSum
from qil_keras.integer.lowering import lower

RESOLVERS = ("AUTO", "BUILTIN_WITHOUT_DEFAULT_DELEGATES")  # XNNPACK, LiteRT's builtin kernels
PAIRS = np.stack(np.meshgrid(np.arange(-128, 128), np.arange(-128, 128), indexing="ij"),
                 -1).reshape(-1, 2)  # every (q_a, q_b) int8 pair


def _add_file(sa, za, sb, zb, step, top):
    """A file with one int8 ADD, fused ReLU, output on a ``top``-level QIL grid (as the lowering
    writes it: zero point ``127 - top``, so int8 saturation clips at level ``top``)."""
    ranges = [((-128 - z) * s, (127 - z) * s) for s, z in ((sa, za), (sb, zb))]

    def add(a, b):
        qa, qb = (tf.quantization.fake_quant_with_min_max_vars(t, lo, hi, num_bits=8)
                  for t, (lo, hi) in zip((a, b), ranges))
        return tf.quantization.fake_quant_with_min_max_vars(
            tf.nn.relu(qa + qb), step * (top - 255), step * top, num_bits=8)

    module = tf.Module()
    spec = [tf.TensorSpec((None, 1), tf.float32, name=n) for n in ("a", "b")]
    module.add = tf.function(add, input_signature=spec, autograph=False)
    return _convert(_converter(module.add.get_concrete_function(), module,
                               input_type="int8", output_type="int8"))


def _file_levels(model_bytes, sa, resolver):
    interpreter = Interpreter(model_content=model_bytes,
                              experimental_op_resolver_type=getattr(OpResolverType, resolver))
    inputs, out = interpreter.get_input_details(), interpreter.get_output_details()[0]
    for detail in inputs:
        interpreter.resize_tensor_input(detail["index"], (len(PAIRS), 1))
    interpreter.allocate_tensors()
    for detail in inputs:  # the inputs are told apart by their scale
        column = 0 if np.isclose(detail["quantization"][0], sa, rtol=1e-6) else 1
        interpreter.set_tensor(detail["index"], PAIRS[:, column:column + 1].astype(np.int8))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).reshape(-1).astype(np.int64) \
        - out["quantization"][1]


def _keras_levels(sa, za, sb, zb, step, top):
    """What a Keras model computes for the pair: float32 sum of the 8-bit values, then the QIL
    activation's rounding (half up, ``floor(v + 1/2)``)."""
    a = np.float32(sa) * (PAIRS[:, 0] - za).astype(np.float32)
    b = np.float32(sb) * (PAIRS[:, 1] - zb).astype(np.float32)
    return np.clip(np.floor(np.maximum(a + b, 0) / np.float32(step) + 0.5), 0, top)


# Scales whose ratios are simple fractions put hundreds of pairs exactly on j + 1/2 (v = 0.5 q_a
# + 0.75 q_b for the first), where float32 and the kernels' fixed point round apart: a guard that
# fails to clear them shows up as disagreeing pairs.
ALIGNED = [(0.02, 0, 0.03, 0, 0.04, 3), (0.02, 3, 0.03, -7, 0.04, 3), (0.01, 0, 0.03, 0, 0.1, 15)]


@pytest.mark.parametrize("config", ALIGNED)
def test_guarded_step_makes_every_int8_pair_round_as_keras_does(config):
    """All 65,536 input pairs through the real ADD kernels: hundreds disagree with Keras' rounding
    before the guard, none after it on XNNPACK or the builtin kernels."""
    sa, za, sb, zb, step, top = config
    residual = ResidualSum("add", [(sa, za, -128, 127), (sb, zb, -128, 127)], step, top)
    factor, found = ties.step_factor(residual)
    assert found > 0 and factor is not None and factor != 1.0
    assert abs(factor - 1.0) < 0.01  # a 1 % change of the step at most for these
    before = _add_file(sa, za, sb, zb, step, top)
    after = _add_file(sa, za, sb, zb, step * factor, top)
    for resolver in RESOLVERS:
        disagree = _file_levels(before, sa, resolver) != _keras_levels(sa, za, sb, zb, step, top)
        assert np.sum(disagree) >= 10, resolver
        np.testing.assert_array_equal(_file_levels(after, sa, resolver),
                                      _keras_levels(sa, za, sb, zb, step * factor, top),
                                      err_msg=resolver)


def test_tolerance_covers_the_kernel_multiplier_bound():
    """XNNPACK's ADD rounds each s_i/s to a 21-bit multiplier (the largest in [2^20, 2^21)): its
    error is at most 2^-21 · max(s_i/s) · Σ|q_i - z_i|; the builtin kernels' rescaling about
    2^-19 · max(s_i/s) at any offsets. The guard keeps 4 times the larger away."""
    ratio, offsets = 0.37, np.array([0.0, 10.0, 255.0, 510.0])
    kernel_bound = np.maximum(2.0 ** -21 * ratio * offsets, 2.0 ** -19 * ratio)
    assert np.all(ties.tolerance(ratio, offsets) >= 4 * kernel_bound)


def test_activations_above_4_bits_are_not_guarded():
    """An 8-bit activation after the add (255 boundaries) is left alone, near-ties or not."""
    residual = ResidualSum("add", [(0.02, 0, -128, 127), (0.03, 0, -128, 127)], 0.04, 255)
    assert ties.step_factor(residual) == (1.0, 0)


def test_no_near_tie_no_move_and_reachable_integers_only():
    """A clean sum keeps its step; an input that holds only 4 integers (a 2-bit QIL output feeding
    the add) contributes 4 values, not 256."""
    # s_b/s = 1/3 with z_b = 124 on q_b in 124..127 gives 0, 1/3, 2/3, 1 (a 2-bit input of step s/3);
    # with s_a/s = 1/5 and z_a = 0 every v is a multiple of 1/15, and j + 1/2 = (15 j + 7.5)/15 is
    # none: the nearest are 1/30 away, far beyond the tolerance (~1e-4 level).
    step = 0.3
    residual = ResidualSum("add", [(step / 5, 0, -128, 127), (step / 3, 124, 124, 127)],
                           step, 3)
    assert ties.combinations(residual) == 256 * 4
    assert ties.step_factor(residual) == (1.0, 0)


def _residual_model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(
        keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)))
    a = keras.layers.BatchNormalization()(
        keras.layers.Conv2D(4, 3, padding="same", name="branch_a")(x))
    b = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 1, name="branch_b")(x))
    x = keras.layers.ReLU(name="sum_relu")(keras.layers.Add(name="sum")([a, b]))
    x = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, name="head_conv")(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def test_snap_moves_the_step_of_a_planted_tie_and_clears_it():
    """snap_to_integer finds the add whose int8 inputs were set on the first aligned grid above,
    moves that QIL activation's step (not its lower threshold), and leaves no near-tie."""
    from sklearn.datasets import load_digits

    images = (load_digits().images[:64, :, :, None] / 16.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = qil_keras.quantize(_residual_model(), 2, 2, calibration_data=images)
    sums = lower(model, weight_storage="int8")[2].residual_sums
    (name, residual), = sums.items()
    act = model.get_layer(name)
    producers = [lyr for lyr in model.layers if isinstance(lyr, qil_keras.FakeQuant8)
                 and any(n.outbound_layer.name == "sum" for n in lyr._outbound_nodes)]
    assert len(producers) == 2
    for layer, scale in zip(producers, (0.02, 0.03)):  # zero point 0: [-128 s, 127 s]
        layer.range_min.assign(-128 * scale)
        layer.range_max.assign(127 * scale)
    act.quantizer_vars["c"].assign(0.06)  # lower threshold 0, step 2d/3 = 0.04
    act.quantizer_vars["d"].assign(0.06)
    residual = lower(model, weight_storage="int8")[2].residual_sums[name]
    assert ties.step_factor(residual)[1] > 0

    report = qil_keras.snap_to_integer(model)
    assert set(report.step_moves) == {name} and report.near_ties[name] > 0
    assert report.ties_left == []
    c, d = act.interval()
    assert abs(c - d) < 1e-7  # the lower threshold stays at 0
    assert abs(2 * d / 3 / 0.04 - 1 - report.step_moves[name]) < 1e-6
    residual = lower(model, weight_storage="int8")[2].residual_sums[name]
    assert ties.step_factor(residual) == (1.0, 0)


def _affine(bias, v_range=(-128.0, 127.0), multiplier=4.0, other=None, n_range=10):
    """One channel: n in [-10, 10], m = 4, unit 1/8 level: v = (4 n + bias) / 8."""
    from qil_keras.integer.emission import AffineSum

    return AffineSum("conv", np.array([-n_range]), np.array([n_range]), multiplier,
                     np.array([bias]), np.array([0.125]), *v_range,
                     other_levels=None if other is None else np.array([other]))


def test_bias_offsets_golden():
    """v = (4n + b)/8. b = 2: v = n/2 + 1/4 is never within 1/4 of j + 1/2, nothing moves. b = 0:
    every odd n gives v = j + 1/2 exactly (11 of them in range), and one bias unit, v = n/2 + 1/8,
    keeps all 1/8 away: the offset is +1 (the first candidate tried)."""
    offsets, near, left, dependent = ties.bias_offsets(_affine(2))
    assert offsets.tolist() == [0] and near == 0 and left == 0 and dependent == 0
    offsets, near, left, _ = ties.bias_offsets(_affine(0))
    assert offsets.tolist() == [1] and near == 10 and left == 0  # odd n in -9..9
    # Clamped values do not count: with outputs in (0, 3) only n = 1, 3, 5 are near.
    offsets, near, left, _ = ties.bias_offsets(_affine(0, (0.0, 3.0)))
    assert offsets.tolist() == [1] and near == 3


def test_bias_offsets_keep_sums_off_both_kernel_sets_ties():
    """The other kernel set rounds v + t with t = ``other`` (the builtin kernels' second
    rounding adds 2^-(r+1) levels): a sum is near a tie of either set when its distance w
    from j + 1/2 (w = frac(v) - 1/2) lies in [-t, 0].

    - m = 4, t = 1/16: b + j = 1 gives w in {-3/8, 1/8}, outside [-1/16, 0]: offset +1 clears
      both sets, none kernel-dependent.
    - m = 2, t = 1/4: v = (2n + b + j)/8, so w runs over the multiples of 1/4 (b + j even, w = 0
      among them) or over ±1/8, ±3/8 (odd, -1/8 in [-1/4, 0]): no move clears both sets; the
      first that clears the file's own ties is +1, and the channel is kernel-dependent.
    - m = 4, t = 1/16, n in ±2^21 with outputs in (-1/2, 7/2): Keras' float32 margin
      2^-23 · 2^22 · 4 · 1/8 = 1/4 around [-1/16, 0] (9/16 wide) holds one of the two values of
      w the sums take (1/2 apart) for every move, and around 0 alone (1/2 wide, ends included)
      too: nothing clears (left 1, kernel-dependent 1, no move). Keras' margin is never given
      up for the other kernel set (+1, w in {-3/8, 1/8}, would clear both kernel sets by their
      own margin but not Keras').
    """
    offsets, near, left, dependent = ties.bias_offsets(_affine(0, other=1 / 16))
    assert (offsets.tolist(), near, left, dependent) == ([1], 10, 0, 0)
    offsets, near, left, dependent = ties.bias_offsets(_affine(0, multiplier=2.0, other=1 / 4))
    assert (offsets.tolist(), left, dependent) == ([1], 0, 1)
    offsets, near, left, dependent = ties.bias_offsets(
        _affine(0, (-0.5, 3.5), other=1 / 16, n_range=2 ** 21))
    assert (offsets.tolist(), left, dependent) == ([0], 1, 1)


def _bias_offsets_by_definition(affine):
    """Every n in [n_min, n_max], every candidate in the order +1, -1, +2, -2, ...: the first
    bias move that leaves no unclamped sum within the margin of a half-integer."""
    offsets, near, left = [], 0, 0
    for lo, hi, bias, unit in zip(affine.n_min, affine.n_max, affine.bias_int, affine.unit_levels):
        n = np.arange(lo, hi + 1, dtype=np.float64)
        spread = ties.CONV_RELATIVE_MARGIN * (hi - lo) * affine.multiplier * unit \
            + ties.ABSOLUTE_MARGIN
        for j in [0] + [k * s for k in range(1, ties.MAX_BIAS_SHIFT + 1) for s in (1, -1)]:
            v = (affine.multiplier * n + bias + j) * unit
            v = v[(v > affine.v_min) & (v < affine.v_max)]
            hit = np.abs(v - np.floor(v) - 0.5) <= spread + ties.CONV_VALUE_MARGIN * np.abs(v)
            near += int(np.sum(hit)) if j == 0 else 0
            if not hit.any():
                offsets.append(j)
                break
        else:
            offsets.append(0)
            left += 1
    return offsets, near, left


def test_bias_offsets_scan_only_sums_a_move_can_unclamp():
    """Wide sums (|n| up to 200,000) with a 3-bit output keep a few hundred unclamped values; the
    scan skips the rest and must find what the scan of every n finds, for channels with ties,
    without, and not clearable, positive and negative units."""
    rng = np.random.default_rng(0)
    for case in range(40):
        span = (50, 2_000, 200_000)[case % 3]
        unit = rng.uniform(1e-4, 0.05, 6)
        if case % 2:
            unit = np.round(unit * 64) / 64 + 1 / 64   # multiples of 1/64: exact ties
        if case % 5 == 0:
            unit = -unit
        affine = AffineSum(where="conv", n_min=-rng.integers(0, span, 6),
                           n_max=rng.integers(0, span, 6), multiplier=float(rng.integers(2, 40)),
                           bias_int=rng.integers(-5_000, 5_000, 6), unit_levels=unit,
                           v_min=-0.5 if case % 4 else -128.5, v_max=7.5 if case % 4 else 127.5)
        offsets, near, left, _ = ties.bias_offsets(affine)
        assert (offsets.tolist(), near, left) == _bias_offsets_by_definition(affine), case


def test_snap_moves_a_low_bit_conv_bias_off_ties(tmp_path):
    """A conv fed by a 2-bit QIL activation: after snap_to_integer no sum it can produce lies near
    a rounding boundary of its output, and the report names what moved."""
    from sklearn.datasets import load_digits

    images = (load_digits().images[:64, :, :, None] / 16.0).astype(np.float32)
    for seed in range(20):  # the first initialization whose sums meet near-ties to clear
        keras.utils.set_random_seed(seed)
        model = qil_keras.quantize(_residual_model(), 2, 2, calibration_data=images)
        before = lower(model, weight_storage="int8")[2].affine_sums
        if sum(ties.bias_offsets(a)[1] for a in before.values()) > 0:
            break
    assert set(before) == {"branch_a", "branch_b", "head_conv"}  # the 2-bit-input convs
    assert sum(ties.bias_offsets(a)[1] for a in before.values()) > 0, "no seed met near-ties"
    report = qil_keras.snap_to_integer(model)
    after = lower(model, weight_storage="int8")[2].affine_sums
    for name, affine in after.items():
        offsets, near, left, _ = ties.bias_offsets(affine)
        assert near == 0 and not np.any(offsets), name
    assert report.bias_tie_moves and set(report.bias_tie_moves) <= set(before)
    assert all(0 < j <= ties.MAX_BIAS_SHIFT for j in report.bias_tie_moves.values())


def test_rational_scale_factor_makes_a_dense_channel_kernel_independent():
    """One channel, m = 127, unit 0.0301 levels (M = 127 · 0.0301 = 3.8227 levels per
    input×weight step), n in ±400, outputs in (-128.5, 127.5), the builtin kernels' band
    t = 1/32: the 67 sums in range have dense fractional parts and no bias move keeps them off
    both kernel sets' ties (kernel-dependent). The band to keep free is t + 2·margin with
    margin = 2^-23 · 800 · 127 · 0.0301 + 2^-20 + 2^-21 · 128.5 = 4.27e-4, i.e. 0.0321, and a
    bias unit shifts the phases of p/q by multiples of 1/(127·q): q · 0.0321 < 126/127, q <= 30.
    The smallest move with p coprime with 42 is p/q = 65/17, f = 65 / (17 · 3.8227) = 1.00022
    (next: 107/28, f = 0.99967; then 103/27 and 61/16). With M·f = 65/17 the sums' fractional
    parts are multiples of 1/17 and a bias move clears both kernel sets."""
    from qil_keras.integer.emission import AffineSum

    def channel(unit):
        return AffineSum("conv", np.array([-400]), np.array([400]), 127.0, np.array([0]),
                         np.array([unit]), -128.5, 127.5, other_levels=np.array([1 / 32]))

    assert ties.bias_offsets(channel(0.0301))[3] == 1
    (factor,) = ties.rational_scale_factors(channel(0.0301))
    assert factor == pytest.approx(65 / (17 * 127 * 0.0301), rel=1e-12)
    assert ties.bias_offsets(channel(0.0301 * factor))[3] == 0
    # A channel already independent is not moved.
    assert ties.rational_scale_factors(channel(0.0307)).tolist() == [1.0]
    # 4-bit weights (m = 18 in INT8 storage, 1 in INT4 storage, where a bias cannot move the
    # phases) at M = 3.26: band 1/32 + 2 · 3.73e-4, q · 0.0320 < 1 - gcd(p, 18)/18. The
    # smallest moves, 85/26 (+0.28 %), 13/4 and 65/20 (-0.31 %), have an even q: M >= 1/2 is
    # one rounding, so their INT4 phases k/q include 1/2 and they are passed over for 95/29
    # (+0.49 %); the INT8 file is then kernel-independent.
    def four_bit(unit):
        return AffineSum("conv", np.array([-400]), np.array([400]), 18.0, np.array([0]),
                         np.array([unit]), -128.5, 127.5, other_levels=np.array([1 / 32]))

    assert ties.bias_offsets(four_bit(3.26 / 18))[3] == 1
    (factor,) = ties.rational_scale_factors(four_bit(3.26 / 18))
    assert factor == pytest.approx(95 / (29 * 3.26), rel=1e-12)
    assert ties.bias_offsets(four_bit(3.26 / 18 * factor))[3] == 0


def test_four_bit_rational_multiplier_keeps_the_int4_file_off_ties():
    """4-bit weights: m = 18 in INT8 storage, 1 in INT4 storage. A kernel-dependent channel at
    M = 0.02539 levels per input×weight step (n in ±10,000, an 8-bit output, the builtin band
    2^-10): the smallest move, 13/512 (+0.0025 %), would suit the INT8 file, but in the INT4
    file (no bias room, run by the builtin kernels) M = 13/512 has right shift r = 5 and the
    snap puts Keras' value 2^-6 = 8/512 above the file's sums, whose fractional parts are
    k/512: k = 248 sits on a tie. The move taken is 5/197 (-0.037 %); checked with exact
    fractions, every INT4 phase k/197 + 2^-6 is at least the guard's margin (1.2e-4:
    2^-23 · 20,000 · M + 2^-20 + 2^-21 · 128.5) from 1/2, and the INT8 file is
    kernel-independent."""
    import math
    from fractions import Fraction

    def channel(unit):
        return AffineSum("conv", np.array([-10000]), np.array([10000]), 18.0, np.array([5]),
                         np.array([unit]), -128.5, 127.5, other_levels=np.array([2.0 ** -10]))

    unit = 0.02539 / 18
    assert ties.bias_offsets(channel(unit))[3] == 1
    (factor,) = ties.rational_scale_factors(channel(unit))
    assert factor == pytest.approx(5 / (197 * 0.02539), rel=1e-12)
    assert ties.bias_offsets(channel(unit * factor))[3] == 0
    for p, q, clear in ((13, 512, False), (5, 197, True)):
        _, exponent = math.frexp(p / q)   # TFLite's QuantizeMultiplier: M = f · 2^exponent
        offset = Fraction(1, 2 ** (1 - exponent)) if exponent < 0 else Fraction(0)
        distance = min(abs((Fraction(k, q) + offset) % 1 - Fraction(1, 2)) for k in range(q))
        assert (distance >= 1.2e-4) == clear, (p, q, distance)


def test_dense_channel_is_guarded_once_its_multiplier_is_rational():
    """A channel with 8-bit inputs into an 8-bit output reaches tens of thousands of sums
    (``dense``: not enumerated). At M = 127 · u = 0.01251 levels per input×weight step its
    fractional parts have no short period: kernel-dependent, no bias move, and XNNPACK's
    rounding of v (half to even) and the builtin kernels' of v + 1/4096 (halves up) differ on
    some of its 20,463 sums in range. ``rational_scale_factors`` moves M to 13/1039 (+0.016 %);
    the guard then examines one sum per phase and moves the bias by 2 units: checked on every
    sum, independently of the guard, the two roundings then agree (they do not without the bias
    move), also with the unit rounded to float32 as the file's scales are."""
    t = 1.0 / 4096
    n = np.arange(-20500, 20501)

    def channel(unit):
        return AffineSum("conv", np.array([n[0]]), np.array([n[-1]]), 127.0, np.array([3]),
                         np.array([unit]), -128.5, 127.5, other_levels=np.array([t]),
                         dense=True)

    def rounded_apart(unit, bias):
        v = (127.0 * n + bias) * unit
        v = v[(v > -128.5) & (v < 127.5)]
        assert len(v) > 20000
        return int(np.sum(np.rint(v) != np.floor(v + t + 0.5)))

    unit = 0.01251 / 127
    offsets, _, _, dependent = ties.bias_offsets(channel(unit))
    assert dependent == 1 and offsets.tolist() == [0] and rounded_apart(unit, 3) > 0
    (factor,) = ties.rational_scale_factors(channel(unit))
    assert 0 < abs(factor - 1.0) <= ties.MAX_SCALE_MOVE
    for moved in (unit * factor, float(np.float32(unit * factor))):
        (j,), _, _, dependent = ties.bias_offsets(channel(moved))
        assert dependent == 0 and j != 0
        assert rounded_apart(moved, 3) > 0 and rounded_apart(moved, 3 + j) == 0


@pytest.mark.parametrize("dense", [False, True], ids=["enumerated", "dense"])
def test_export_makes_an_8_bit_output_conv_kernel_independent(dense, monkeypatch):
    """A 2-bit-weight conv + BatchNorm whose output is an 8-bit tensor (the Dense after it
    reads it) reaches sums with dense fractional parts: the snap moves γ of its
    kernel-dependent channels (at most ties.MAX_SCALE_MOVE) and the file's conv then computes
    the same values with XNNPACK's and the builtin kernels' arithmetic on every test image
    (the first conv and the Dense have 8-bit weights, m = 1: not guarded). ``dense``: its
    channels are guarded as ones with too many sums to enumerate (the layer's enumeration
    limit and ``ties.DENSE_WINDOW`` set to 0), one sum per phase of their rational multiplier."""
    from sklearn.datasets import load_digits

    from qil_keras.integer import emission

    if dense:
        monkeypatch.setattr(emission, "_MAX_GUARDED_SUMS", 0)
        monkeypatch.setattr(ties, "DENSE_WINDOW", 0)

    digits = load_digits()
    images = (digits.images[:, :, :, None] / 16.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)))
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 3, use_bias=False)(h))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(h)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images[:1000], digits.target[:1000], epochs=3, verbose=0)
    q = qil_keras.quantize(model, 2, 2, calibration_data=images[:256])
    affine = lower(q, weight_storage="int8")[2].affine_sums
    assert affine and all(np.all(a.dense) == dense for a in affine.values())
    report = qil_keras.export_tflite(q, representative_data=images[:256],
                                     validation_data=(images[1000:], digits.target[1000:]))
    assert report.snap["scale_moves"], "the 8-bit-output conv needed no move: test is void"
    assert max(report.snap["scale_moves"].values()) <= ties.MAX_SCALE_MOVE
    assert not report.snap["kernel_dependent"]
    differing = qil_keras.kernel_differences(report.model_bytes, images[1000:])
    convs = [i for i, op, *_ in differing if op == "CONV_2D"]
    assert all(i == min(c for c in convs) for i in convs) and len(convs) <= 1, differing


def test_input_ties_in_batches_equal_the_whole_array():
    """``InputTies`` fed in batches gives what ``input_range_without_ties`` gives on all values:
    pixels ``p/127.5 − 1`` on ``[-1, 1]`` all sit on ties of that range's grid, which a widening
    clears; a value repeated across batches counts once."""
    pixels = (np.arange(256, dtype=np.float32) / np.float32(127.5) - 1).reshape(16, 16)
    values = np.concatenate([pixels, pixels[:4]])  # repeats: 256 distinct values
    whole = ties.input_range_without_ties(values, -1.0, 1.0)
    # the scales of [-1, 1] widened by k steps of 2/255 at the top
    scales = [(2.0 + k * 2.0 / 255) / 255 for k in range(ties.MAX_INPUT_WIDENING + 1)]
    counter = ties.InputTies(scales)
    for batch in np.array_split(values, 5):
        counter.add(batch)
    steps, before = counter.result()
    assert (1.0 + steps * 2.0 / 255, before) == whole
    widened, before = whole
    assert before == 256  # v/s = p − 127.5 for the step s = 2/255: every value is a tie
    assert 1 <= steps <= ties.MAX_INPUT_WIDENING
    assert ties.input_near_ties(np.unique(values), (widened + 1.0) / 255.0) == 0
    assert ties.input_near_ties(np.unique(values), scales[steps - 1]) > 0  # the first clear one
    clear = ties.InputTies(scales)
    clear.add(np.float32([0.1, 0.3]))
    assert clear.result() == (0, 0)
    assert ties.input_range_without_ties(np.float32([0.1, 0.3]), -1.0, 1.0) == (1.0, 0)


def test_untie_inputs_widens_by_steps_of_the_tracked_range():
    """A quantizer that already has ``extra_steps`` (quantize() widened it on the calibration
    batch, then training moved its range) is widened to a grid checked tie-free: ``InputTies``
    is given the scales the layer itself takes with 1, 2, ... more ``extra_steps``. Checking
    steps of the already widened range instead (what it did) applied a grid no one had
    checked, and a second ``untie_inputs`` widened again (MobileNetV3Small, issue #15)."""
    from qil_keras import FakeQuant8, keras
    from qil_keras.quantization.quantize import untie_inputs

    inputs = keras.Input((16,))
    quantizer = FakeQuant8(quantize_op_rounding=True, extra_steps=3)
    model = keras.Model(inputs, quantizer(inputs))
    quantizer.range_min.assign(-1.0)
    quantizer.range_max.assign(1.0)
    quantizer.num_updates.assign(1)
    # values on the ties of the grid with 3 extra steps, (j + 1/2)·s3, and on those of the
    # grid with 4, (j + 1/2)·s4: one step more does not clear them, two do
    quantizer.extra_steps = 4
    s4 = quantizer.quantization_params()[0]
    quantizer.extra_steps = 3
    s3 = quantizer.quantization_params()[0]
    values = np.concatenate([(np.arange(-120, 120) + 0.5) * s3,
                             (np.arange(60, 76) + 0.5) * s4]).astype(np.float32).reshape(-1, 16)
    assert ties.input_near_ties(values, s3) == 240 and ties.input_near_ties(values, s4) == 16
    moved = untie_inputs(model, values)
    assert moved == {quantizer.name: (240, 2)} and quantizer.extra_steps == 5
    assert ties.input_near_ties(values, quantizer.quantization_params()[0]) == 0
    assert untie_inputs(model, values) == {}  # idempotent


def test_no_bias_or_scale_makes_dense_8_bit_sums_kernel_independent():
    """docs/export.md, "Known gaps": with 8-bit weights on 8-bit inputs (m = 1) the sums reach
    every integer, and whatever the multiplier M = p/q and the bias, some sum rounds apart under
    the builtin kernels (two roundings, halves up) and XNNPACK (float32, halves to even): the
    sums take every fraction k/q and the band [1/2 - 2^-(r+1), 1/2) always holds one. Checked
    on 200 random p/q (q up to 3,000) and 9 biases each, with the package's models of the two
    kernels' requantization (the integer reference; tested against the kernels elsewhere)."""
    from math import gcd

    from qil_keras.integer.integer_reference import (_xnnpack_requantize,
                                                     multiply_by_quantized_multiplier_ruy,
                                                     quantize_multiplier)

    rng = np.random.default_rng(0)
    checked = 0
    while checked < 200:
        q = int(rng.integers(3, 3000))
        p = int(rng.integers(1, max(2, q // 3)))
        if gcd(p, q) != 1:
            continue
        checked += 1
        multiplier = p / q
        reach = int(120 / multiplier)       # |v| <= 120 levels: nothing is clamped
        for bias in range(-4, 5):
            acc = np.arange(-reach, reach + 1, dtype=np.int64) + bias
            builtin = multiply_by_quantized_multiplier_ruy(acc, *quantize_multiplier(multiplier))
            xnnpack = _xnnpack_requantize(acc, multiplier, [1.0], 1.0, 0, (-128, 127))
            assert np.any(builtin != xnnpack), (p, q, bias)


def test_a_first_conv_at_4_bits_makes_the_file_kernel_independent_there():
    """The first conv reads the 8-bit input: with 8-bit weights (``m = 1``) its sums reach every
    integer, and some fall where XNNPACK and the builtin kernels round apart, whatever the
    scales (docs/export.md, "Known gaps"); with 4-bit weights (``layer_bits``) the snap moves
    its channels' γ onto rational multipliers whose sums a bias keeps off both kernel sets'
    ties. The same trained float model, at 2/2, under both: the control (8-bit first conv)
    must differ at the first CONV_2D on the test digits, the 4-bit one nowhere in a conv."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:, :, :, None] / 16.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(
        keras.layers.Conv2D(16, 3, use_bias=False)(h)))
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images[:1000], digits.target[:1000], epochs=3, verbose=0)

    def conv_differences(layer_bits):
        q = qil_keras.quantize(model, 2, 2, calibration_data=images[:256], layer_bits=layer_bits)
        report = qil_keras.export_tflite(q, representative_data=images[:256],
                                         validation_data=(images[1000:], digits.target[1000:]))
        differing = qil_keras.kernel_differences(report.model_bytes, images[1000:])
        first_conv = min(i for i, name, _ in qil_keras.IntegerReference(report.model_bytes).ops
                         if name == "CONV_2D")
        return [(i, count) for i, op, count, *_ in differing if op == "CONV_2D"], first_conv

    control, first_conv = conv_differences(None)
    assert [i for i, _ in control] == [first_conv], control
    four_bit, _ = conv_differences({"stem": (4, 8)})
    assert four_bit == [], four_bit

