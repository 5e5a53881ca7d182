"""Tests of ``qil_keras.analysis``: pruning ratios, thresholds, plots, callback.

Data: sklearn's handwritten digits (real 8x8 scans, ``X / 16``, shape
``(N, 8, 8, 1)``). The model is a small Conv-BN-ReLU network quantized to
2/2 bits (first and last layers at 8) with ``qil_keras.quantize``. Expected
values are computed independently: pruning ratios with numpy from
``quantized_weights`` and from a separately built sub-model, thresholds by
brute force from the quantizer functions in ``qil_keras.ops``.
"""

import functools
import json
import os
import struct

import numpy as np
import pytest

import qil_keras
from qil_keras import QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D, keras, ops
from qil_keras import analysis

L = keras.layers
WEIGHT_CLASSES = (QILConv2D, QILDense, QILDepthwiseConv2D)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    return x, data.target.astype(np.int64)


def _float_model():
    inp = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conv2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.MaxPooling2D(name="pool")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="bn3")(x)
    x = L.ReLU(name="relu3")(x)
    x = L.Conv2D(16, 1, use_bias=False, name="conv3")(x)
    x = L.BatchNormalization(name="bn4")(x)
    x = L.ReLU(name="relu4")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(10, name="fc")(x)
    return keras.Model(inp, out, name="digits_cnn")


@functools.lru_cache(maxsize=None)
def _trained_float():
    keras.utils.set_random_seed(0)
    x, y = _digits()
    model = _float_model()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:800], y[:800], batch_size=64, epochs=1, verbose=0)
    # 13 steps at momentum 0.99 leave the moving statistics near their initial values; a
    # trained float model has its population statistics (its inference mode then matches the
    # batch statistics the activation ranges are calibrated with).
    qil_keras.reestimate_batchnorm(model, x[:800])
    return model


def _quantized(per_channel=False):
    x, _ = _digits()
    return qil_keras.quantize(_trained_float(), 2, 2, calibration_data=x[:256],
                              per_channel=per_channel)


@pytest.fixture(scope="module")
def model():
    return _quantized()


@pytest.fixture(scope="module")
def per_channel_model():
    return _quantized(per_channel=True)


@pytest.fixture(scope="module")
def batch():
    return _digits()[0][1300:1500]


def _weight_layers(m):
    return [layer for layer in m.layers if isinstance(layer, WEIGHT_CLASSES)]


def _activation_layers(m):
    return [layer for layer in m.layers if isinstance(layer, QILActivation)]


def _png_size(path):
    """(width, height) from the IHDR chunk; checks the PNG signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _check_png(path, min_bytes=10_000):
    width, height = _png_size(path)
    assert 300 <= width <= 6000 and 200 <= height <= 6000, (width, height)
    assert os.path.getsize(path) >= min_bytes


# --------------------------------------------------------------------------
# pruning ratios
# --------------------------------------------------------------------------

def test_model_under_test_is_2_2_with_8_bit_edges(model):
    bits = {layer.name: layer.w_bits for layer in _weight_layers(model)}
    assert bits == {"conv1": 8, "conv2": 2, "dw": 2, "conv3": 2, "fc": 8}
    assert len(_activation_layers(model)) == 4


def test_weight_pruning_ratios_equal_level_zero_counts(model):
    ratios = analysis.pruning_ratios(model)
    grids = qil_keras.quantized_weights(model)
    assert ratios.weights.keys() == grids.keys()
    for name, grid in grids.items():
        expected = np.count_nonzero(grid.levels == 0) / grid.levels.size
        assert ratios[name]["weights"] == pytest.approx(expected, abs=0)
        assert ratios[name]["bits"] == grid.bits
    assert ratios.activations == {}  # no data, no activation ratios
    # 2-bit (ternary) layers prune a real share of their weights
    assert all(ratios.weights[n] > 0.05 for n in ("conv2", "dw", "conv3"))


def test_activation_pruning_ratios_equal_zero_outputs(model, batch):
    ratios = analysis.pruning_ratios(model, batch)
    acts = _activation_layers(model)
    sub = keras.Model(model.inputs, [a.output for a in acts] + [a.input for a in acts])
    values = [np.asarray(v) for v in sub(batch, training=False)]
    outputs, inputs = values[:len(acts)], values[len(acts):]
    assert list(ratios.activations) == [a.name for a in acts]
    for layer, y, x in zip(acts, outputs, inputs):
        expected = np.count_nonzero(y == 0) / y.size
        assert ratios[layer.name]["activations"] == pytest.approx(expected, abs=0)
        assert ratios[layer.name]["bits"] == layer.a_bits
        # the same count from the quantizer applied to the layer's inputs
        c, d = layer.interval()
        levels = ops.quantize_activation_levels(x, c, d, layer.a_bits).numpy()
        assert np.mean(levels == 0) == pytest.approx(expected, abs=1e-6)
        assert 0.0 < expected < 1.0


def test_pruning_ratios_table_and_dict(model, batch):
    ratios = analysis.pruning_ratios(model, batch)
    as_dict = ratios.to_dict()
    # layer order: weight layers and activations interleaved as in the model
    qil_names = [layer.name for layer in model.layers
                 if isinstance(layer, WEIGHT_CLASSES + (QILActivation,))]
    assert list(as_dict) == qil_names
    for row in as_dict.values():
        assert ("weights" in row) != ("activations" in row)
    assert json.loads(json.dumps(as_dict)) == as_dict
    text = str(ratios)
    assert text.splitlines()[0].split() == ["layer", "tensor", "bits", "zeros"]
    assert len(text.splitlines()) == len(qil_names) + 1
    assert f"{100 * ratios['conv2']['weights']:.2f}%" in text


# --------------------------------------------------------------------------
# thresholds, checked by brute force
# --------------------------------------------------------------------------

def _brute_force_weight_thresholds(layer, n=100_001):
    """First |w| (on a fine grid) with level >= 1, and first with level == q."""
    v = layer.kernel_quantizer_vars
    c, d = (np.asarray(t.numpy(), np.float64) for t in ops.effective_interval(v["c"], v["d"]))
    top = float(np.max(c + d)) * 1.05
    grid = np.linspace(0.0, top, n).astype(np.float32)
    shape = (n,) + (1,) * np.ndim(c)
    levels = ops.quantize_weight_levels(grid.reshape(shape), v["c"], v["d"], v["gamma"],
                                        v["bits"]).numpy()
    q = float(ops.weight_levels(layer.w_bits).numpy())
    assert np.all(levels[-1] == q)  # the grid reaches the top level everywhere
    first_nonzero = grid[np.argmax(levels >= 1, axis=0)]
    first_top = grid[np.argmax(levels >= q, axis=0)]
    return first_nonzero, first_top, top / (n - 1)


def _set_interval(layer, gamma, c_over_d):
    """Assign γ and move c to c_over_d · d (c - d > 0: a lower end above zero)."""
    v = layer.kernel_quantizer_vars
    v["gamma"].assign(np.full(v["gamma"].shape, gamma, np.float32))
    v["c"].assign(np.asarray(v["d"].numpy() * c_over_d, np.float32))


@pytest.mark.parametrize("c_over_d", [1.0, 1.3], ids=["c=d", "c>d"])
@pytest.mark.parametrize("gamma", [1.0, 1.7, 0.6])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_weight_thresholds_match_brute_force(model, per_channel_model, per_channel, gamma,
                                             c_over_d):
    m = per_channel_model if per_channel else model
    for layer in _weight_layers(m):
        v = layer.kernel_quantizer_vars
        saved = {k: v[k].numpy() for k in ("c", "d", "gamma")}
        try:
            _set_interval(layer, gamma, c_over_d)
            th = analysis.interval_thresholds(layer)
            first_nonzero, first_top, spacing = _brute_force_weight_thresholds(layer)
        finally:
            for k, value in saved.items():
                v[k].assign(value)
        tol = spacing + 1e-6 * float(np.max(th.upper))
        assert th.kind == "weights" and th.bits == layer.w_bits
        assert th.q == 2 ** (layer.w_bits - 1) - 1
        assert np.shape(th.prune) == v["c"].shape  # arrays per channel
        np.testing.assert_allclose(th.gamma, gamma, rtol=1e-6)
        np.testing.assert_allclose(th.prune, first_nonzero, rtol=0, atol=tol)
        np.testing.assert_allclose(th.clip, first_top, rtol=0, atol=tol)
        np.testing.assert_allclose(th.lower, np.asarray(th.c) - th.d, rtol=1e-12)
        np.testing.assert_allclose(th.upper, np.asarray(th.c) + th.d, rtol=1e-12)
        assert np.all(th.lower <= th.prune) and np.all(th.prune <= th.clip)
        assert np.all(th.clip <= th.upper)
        if th.q == 1:  # ternary: one boundary
            np.testing.assert_allclose(th.prune, th.clip)


def test_weight_thresholds_of_depthwise_per_channel_are_2d(per_channel_model):
    layer = per_channel_model.get_layer("dw")
    th = analysis.interval_thresholds(layer)
    assert np.shape(th.prune) == np.shape(th.clip) == (16, 1)  # (in channels, multiplier)
    assert json.loads(json.dumps(th.to_dict()))["prune"] == np.asarray(th.prune).tolist()


def test_activation_thresholds_match_brute_force(model):
    for layer in _activation_layers(model):
        th = analysis.interval_thresholds(layer)
        c, d = layer.interval()
        top = (c + d) * 1.05
        n = 100_001
        grid = np.linspace(0.0, top, n).astype(np.float32)
        levels = ops.quantize_activation_levels(grid, c, d, layer.a_bits).numpy()
        q = 2 ** layer.a_bits - 1
        assert th.q == q and th.gamma == 1.0
        tol = top / (n - 1) + 1e-6 * top
        assert th.prune == pytest.approx(grid[np.argmax(levels >= 1)], abs=tol)
        assert th.clip == pytest.approx(grid[np.argmax(levels >= q)], abs=tol)
        assert (th.lower, th.upper) == pytest.approx((c - d, c + d))


def test_thresholds_refuse_other_layers(model):
    with pytest.raises(TypeError, match="QIL layer"):
        analysis.interval_thresholds(model.get_layer("bn1"))


# --------------------------------------------------------------------------
# plots, callback, save_analysis
# --------------------------------------------------------------------------

def test_weight_histograms_of_chosen_layers(model, tmp_path):
    path = analysis.plot_weight_histograms(model, tmp_path / "sub" / "w.png", layers=["conv2"])
    assert path == str(tmp_path / "sub" / "w.png")
    _check_png(path, min_bytes=5_000)
    assert _png_size(path)[0] < 1000  # one panel
    with pytest.raises(ValueError, match="no_such_layer"):
        analysis.plot_weight_histograms(model, tmp_path / "x.png", layers=["no_such_layer"])


def test_interval_history_records_each_epoch_and_plots(batch, tmp_path):
    x, y = _digits()
    m = _quantized()
    # eager steps: 4 of them run faster than tracing; the callback reads the
    # variables between steps either way
    m.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    history = analysis.IntervalHistory()
    every = analysis.IntervalHistory(every_n_batches=1)  # 2 steps per epoch
    m.fit(x[:128], y[:128], batch_size=64, epochs=2, verbose=0, callbacks=[history, every])

    names = [layer.name for layer in m.layers
             if isinstance(layer, WEIGHT_CLASSES + (QILActivation,))]
    assert list(history.history) == names
    for name, entries in history.history.items():
        assert [e["epoch"] for e in entries] == [1.0, 2.0]
        assert all(e["batch"] is None for e in entries)
        for e in entries:
            assert e["lower"] == pytest.approx(e["c"] - e["d"])
            assert e["upper"] == pytest.approx(e["c"] + e["d"])
            assert 0.0 <= e["lower"] <= e["c"] <= e["upper"]
        assert entries[0]["kind"] == ("activations" if name.endswith("_qil_act") else "weights")
        # the last record is the model's current interval
        th = analysis.interval_thresholds(m.get_layer(name))
        assert entries[-1]["c"] == pytest.approx(th.c) and entries[-1]["d"] == pytest.approx(th.d)
        assert entries[-1]["gamma"] == pytest.approx(th.gamma)
    # the intervals train: some weight interval moved between the two epochs
    assert any(e[0]["c"] != e[1]["c"] for e in history.history.values())
    assert [e["epoch"] for e in every.history["conv2"]] == [0.5, 1.0, 1.5, 2.0]
    _check_png(history.plot(tmp_path / "intervals.png"))
    # A second fit (a progressive stage at other bits) continues the epoch axis.
    qil_keras.set_bits(m, 3, 3)
    m.fit(x[:128], y[:128], batch_size=64, epochs=2, verbose=0, callbacks=[history])
    for entries in history.history.values():
        assert [e["epoch"] for e in entries] == [1.0, 2.0, 3.0, 4.0]
        assert [e["fit"] for e in entries] == [0, 0, 1, 1]
        assert [e["fit_start"] for e in entries] == [0.0, 0.0, 2.0, 2.0]
    assert [e["bits"] for e in history.history["conv2"]] == [2, 2, 3, 3]
    _check_png(history.plot(tmp_path / "intervals_two_stages.png"))


def test_save_analysis_writes_expected_files(model, batch, tmp_path):
    history = analysis.IntervalHistory()
    history.history = {"conv2": [
        {"epoch": 1.0, "batch": None, "kind": "weights", "bits": 2, "c": 0.1, "d": 0.1,
         "gamma": 1.0, "lower": 0.0, "upper": 0.2},
        {"epoch": 2.0, "batch": None, "kind": "weights", "bits": 2, "c": 0.12, "d": 0.1,
         "gamma": 1.1, "lower": 0.02, "upper": 0.22}]}
    paths = analysis.save_analysis(model, tmp_path / "all", data=batch, interval_history=history)
    names = sorted(p.rsplit("/", 1)[-1] for p in map(str, paths))
    assert names == sorted(["weight_histograms.png", "activation_histograms.png",
                            "pruning_ratios.png", "intervals.png", "pruning.json"])
    for path in map(str, paths):
        if path.endswith(".png"):
            _check_png(path)
    with open(str(paths[-1]), encoding="utf-8") as f:
        report = json.load(f)
    expected = analysis.pruning_ratios(model, batch).to_dict()
    assert list(report) == list(expected)
    for name, row in report.items():
        thresholds = row.pop("thresholds")
        assert row == expected[name]
        th = analysis.interval_thresholds(model.get_layer(name))
        assert thresholds["prune"] == pytest.approx(th.prune)

    assert _png_size(str(tmp_path / "all" / "weight_histograms.png"))[0] > 1500  # 4 columns


def test_save_analysis_without_data_per_channel(per_channel_model, tmp_path):
    """Weights only; the per-channel thresholds are drawn as bands."""
    paths = analysis.save_analysis(per_channel_model, tmp_path / "weights_only")
    assert sorted(p.rsplit("/", 1)[-1] for p in map(str, paths)) == [
        "pruning.json", "pruning_ratios.png", "weight_histograms.png"]
    for path in paths[:-1]:
        _check_png(path)
    with open(paths[-1], encoding="utf-8") as f:
        report = json.load(f)
    assert all("weights" in row for row in report.values())
    assert np.shape(report["dw"]["thresholds"]["prune"]) == (16, 1)
