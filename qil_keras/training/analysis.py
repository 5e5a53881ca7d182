"""Look at what a QIL model learned: pruning ratios, interval thresholds, plots.

The figures are those of the paper's analysis (Jung et al., CVPR 2019,
Figures 3-5): the distribution of each layer's float weights (or of the
activations entering each activation quantizer) with the learned interval
drawn on it, the share of values that the interval prunes to exact zeros, and
how the intervals move during training.

* ``pruning_ratios``: fraction of weights at level 0 per weight layer and,
  given a batch of inputs, fraction of zero outputs per ``QILActivation``.
* ``interval_thresholds``: the input values at which a quantizer starts
  to output a non-zero level (pruning) and its top level (clipping).
* ``plot_weight_histograms``, ``plot_activation_histograms``,
  ``plot_pruning_ratios``, ``IntervalHistory`` (a callback that
  records the intervals during ``fit``, with its own ``plot``) and
  ``save_analysis``, which writes all of them to a folder.

Plots need matplotlib (the ``examples`` or ``test`` extra). It is imported
only when a plot is drawn, and figures are drawn on a bare
``matplotlib.figure.Figure`` (no ``pyplot``): nothing changes the backend a
notebook or script has chosen, and no figure is left open.
"""

import dataclasses
import json
import math
import os

import numpy as np

from ..quantization import ops
from .._keras import keras
from ..quantization.layers import QILActivation, QILConv2D, QILDense, QILDepthwiseConv2D

__all__ = [
    "PruningRatios",
    "IntervalThresholds",
    "IntervalHistory",
    "pruning_ratios",
    "interval_thresholds",
    "plot_weight_histograms",
    "plot_activation_histograms",
    "plot_pruning_ratios",
    "save_analysis",
]

_WEIGHT_LAYERS = (QILConv2D, QILDense, QILDepthwiseConv2D)
_DPI = 120
_BATCH = 256  # examples per forward pass of the sub-models

# Colours: weights, activations, pruned region, clipped region.
_C_WEIGHTS, _C_ACTS, _C_PRUNE, _C_CLIP = "#3572a5", "#e07b39", "#7f7f7f", "#c0392b"


# --------------------------------------------------------------------------
# layers of a model
# --------------------------------------------------------------------------

def _qil_layers(model):
    """QIL weight layers and ``QILActivation`` layers of ``model``, in layer order.

    Nested models are walked into (their layers follow in their own order).
    """
    found = []

    def walk(layers):
        for layer in layers:
            if isinstance(layer, _WEIGHT_LAYERS + (QILActivation,)):
                found.append(layer)
            elif isinstance(layer, keras.Model):
                walk(layer.layers)

    walk(model.layers)
    return found


def _activation_layers(model):
    """The ``QILActivation`` layers of the model's own graph (not of nested models)."""
    return [layer for layer in model.layers if isinstance(layer, QILActivation)]


def _run_submodel(model, tensors, data, batch_size=_BATCH):
    """Numpy values of ``tensors`` (symbolic tensors of ``model``) for ``data``.

    Runs ``keras.Model(model.inputs, tensors)`` in inference mode
    (``training=False``) in batches of ``batch_size``; ``data`` is an array (or
    a list of arrays for several inputs).
    """
    if not tensors:
        return []
    sub = keras.Model(model.inputs, list(tensors))
    arrays = [np.asarray(a) for a in data] if isinstance(data, (list, tuple)) else [
        np.asarray(data)]
    n = len(arrays[0])
    chunks = []
    for start in range(0, n, batch_size):
        batch = [a[start:start + batch_size] for a in arrays]
        out = sub(batch if len(batch) > 1 else batch[0], training=False)
        out = out if isinstance(out, (list, tuple)) else [out]
        chunks.append([np.asarray(o) for o in out])
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(tensors))]


# --------------------------------------------------------------------------
# pruning ratios
# --------------------------------------------------------------------------

@dataclasses.dataclass
class PruningRatios:
    """Fractions of exact zeros per QIL layer, in layer order.

    ``rows``: ``{layer name: {"weights": f, "bits": b}}`` for weight layers
    (``f`` = fraction of kernel entries at integer level 0) and
    ``{layer name: {"activations": f, "bits": b}}`` for ``QILActivation``
    layers (``f`` = fraction of the layer's outputs equal to 0 on the data).
    """

    rows: dict

    def to_dict(self):
        """``{layer: {"weights" | "activations": fraction, "bits": bits}}`` (a copy)."""
        return {name: dict(row) for name, row in self.rows.items()}

    @property
    def weights(self):
        """``{layer: fraction}`` for the weight layers."""
        return {n: r["weights"] for n, r in self.rows.items() if "weights" in r}

    @property
    def activations(self):
        """``{layer: fraction}`` for the ``QILActivation`` layers (empty without data)."""
        return {n: r["activations"] for n, r in self.rows.items() if "activations" in r}

    def __getitem__(self, name):
        return self.rows[name]

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self):
        width = max([len("layer")] + [len(n) for n in self.rows])
        lines = [f"{'layer':<{width}}  {'tensor':<11}  {'bits':>4}  {'zeros':>7}"]
        for name, row in self.rows.items():
            kind = "weights" if "weights" in row else "activations"
            lines.append(f"{name:<{width}}  {kind:<11}  {row['bits']:>4}  {row[kind]:>7.2%}")
        return "\n".join(lines)


def pruning_ratios(model, data=None):
    """Fraction of values a QIL model prunes to exact zeros, per layer.

    Args:
      model: a model with QIL layers (e.g. from ``qil_keras.quantize``).
      data: optional batch of model inputs (array, or list of arrays). When
        given, every ``QILActivation`` of the model's graph gets the fraction
        of its outputs that are 0 on ``data``, computed in inference mode
        with a sub-model ``keras.Model(model.inputs, [layer.output, ...])``.

    Returns:
      ``PruningRatios``; weight fractions are ``mean(levels == 0)`` of
      the integer levels the forward pass uses (as in
      ``qil_keras.quantized_weights``).
    """
    activations = _activation_layers(model) if data is not None else []
    outputs = dict(zip([a.name for a in activations],
                       _run_submodel(model, [a.output for a in activations], data)))
    rows = {}
    for layer in _qil_layers(model):
        if isinstance(layer, QILActivation):
            if layer.name in outputs:
                rows[layer.name] = {"activations": float(np.mean(outputs[layer.name] == 0)),
                                    "bits": int(layer.a_bits)}
        else:
            rows[layer.name] = {"weights": float(np.mean(layer.integer_levels() == 0)),
                                "bits": int(layer.w_bits)}
    return PruningRatios(rows)


# --------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------

@dataclasses.dataclass
class IntervalThresholds:
    """A quantizer's thresholds in input units (floats, or arrays per channel).

    ``lower = c' - d'`` and ``upper = c' + d'`` are the interval ends; inputs
    (weight magnitudes, or activations) below ``prune`` get level 0, inputs
    from ``clip`` on get the top level ``q``. ``lower ≤ prune ≤ clip ≤ upper``.
    """

    layer: str
    kind: str  # "weights" or "activations"
    bits: int
    q: int  # levels above zero
    c: object
    d: object
    gamma: object
    lower: object
    upper: object
    prune: object
    clip: object

    def to_dict(self):
        """JSON-ready dict (arrays become nested lists)."""
        def plain(v):
            return np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}


def _as_value(x):
    """A 0-d array becomes a float; others stay (float64) arrays."""
    x = np.asarray(x, np.float64)
    return float(x) if x.ndim == 0 else x


def interval_thresholds(layer):
    """Pruning and clipping thresholds of a QIL layer's quantizer, in input units.

    Derivation (weights; ``c, d, γ`` are the effective values
    ``d' = max(d, ε)``, ``c' = d' + |c - d'|``, ``γ' = max(γ, ε)`` of
    ``qil_keras.ops.effective_interval``, with a weight interval's width first reflected
    at ``|c|/16``, ``ops.effective_weight_interval``). For an input magnitude ``|w|``::

        u     = (|w| - c + d) / 2d           # 0 at |w| = c - d, 1 at |w| = c + d
        ŵ     = clip(u, 0, 1) ** γ           # transformer output in [0, 1]
        level = round(q · ŵ)                 # half away from zero, 0 ≤ level ≤ q

    with ``q = 2^(N-1) - 1``. ``level`` leaves 0 at the first rounding boundary
    ``q · ŵ = 0.5``, i.e. ``ŵ = 0.5/q``, ``u = (0.5/q)^(1/γ)``::

        prune = c - d + 2d · (0.5 / q) ** (1/γ)

    and reaches the top level ``q`` at ``q · ŵ = q - 0.5``, i.e.
    ``ŵ = (q - 0.5)/q``::

        clip  = c - d + 2d · ((q - 0.5) / q) ** (1/γ)

    Weights with ``|w| < prune`` are pruned to exact zeros; weights with
    ``|w| ≥ clip`` all get ``±q`` (with ``q = 1`` at 2 bits, the two
    thresholds coincide: a ternary quantizer has one boundary). Activations
    use the same formulas with ``γ = 1`` and ``q = 2^N - 1``, for the input
    ``x ≥ 0`` instead of ``|w|``. The raw interval ends ``c - d`` and
    ``c + d`` are returned as ``lower`` and ``upper``.

    Args:
      layer: a built ``QILConv2D``, ``QILDepthwiseConv2D``, ``QILDense`` or
        ``QILActivation``.

    Returns:
      ``IntervalThresholds``; with per-channel intervals every value
      (``c``, ``d``, ``gamma``, ``lower``, ``upper``, ``prune``, ``clip``) is an
      array of the interval's shape.
    """
    if isinstance(layer, _WEIGHT_LAYERS):
        quantizer, variables = layer.kernel_quantizer, layer.kernel_quantizer_vars
        bits = int(layer.w_bits)
        q = float(ops.weight_levels(bits).numpy())
        gamma = np.maximum(np.asarray(variables["gamma"].numpy(), np.float64), ops.EPSILON)
        kind = "weights"
    elif isinstance(layer, QILActivation):
        quantizer, variables = layer.quantizer, layer.quantizer_vars
        bits = int(layer.a_bits)
        q = float(ops.activation_levels(bits).numpy())
        gamma = np.float64(1.0)
        kind = "activations"
    else:
        raise TypeError(
            f"interval_thresholds needs a QIL layer (QILConv2D, QILDepthwiseConv2D, "
            f"QILDense or QILActivation), got {type(layer).__name__} {layer.name!r}.")
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} is not built: it has no interval yet.")
    c, d = quantizer.effective_interval(variables["c"], variables["d"])
    c, d = np.asarray(c.numpy(), np.float64), np.asarray(d.numpy(), np.float64)
    lower = c - d
    prune = lower + 2.0 * d * (0.5 / q) ** (1.0 / gamma)
    clip = lower + 2.0 * d * ((q - 0.5) / q) ** (1.0 / gamma)
    return IntervalThresholds(
        layer=layer.name, kind=kind, bits=bits, q=int(q), c=_as_value(c), d=_as_value(d),
        gamma=_as_value(gamma), lower=_as_value(lower), upper=_as_value(c + d),
        prune=_as_value(prune), clip=_as_value(clip))


# --------------------------------------------------------------------------
# plotting helpers
# --------------------------------------------------------------------------

def _figure(n_panels, panel_size=(4.0, 2.9), max_cols=4):
    """A bare matplotlib Figure with a grid of ``n_panels`` axes (extra ones hidden)."""
    from matplotlib.figure import Figure

    cols = max(1, min(max_cols, n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows + 0.4),
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path):
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    fig.clear()  # a bare Figure is not registered with pyplot: nothing stays open
    return path


def _summary(v):
    """Representative value of a threshold (the mean over channels) and its range."""
    a = np.asarray(v, np.float64)
    return float(a.mean()), float(a.min()), float(a.max())


def _draw_thresholds(ax, th, symmetric):
    """Shade the pruned and clipped regions and draw the threshold lines.

    Per-channel thresholds are drawn at their mean over channels, with a
    light band over their range.
    """
    prune, p_lo, p_hi = _summary(th.prune)
    clip, c_lo, c_hi = _summary(th.clip)
    lower, _, _ = _summary(th.lower)
    upper, _, _ = _summary(th.upper)
    x_lo, x_hi = ax.get_xlim()
    signs = (-1.0, 1.0) if symmetric else (1.0,)
    per_channel = np.ndim(th.prune) > 0
    for s in signs:
        inner = (min(s * prune, 0.0), max(s * prune, 0.0))
        ax.axvspan(*inner, color=_C_PRUNE, alpha=0.25, lw=0)
        outer = (s * clip, x_hi) if s > 0 else (x_lo, s * clip)
        if outer[0] < outer[1]:
            ax.axvspan(*outer, color=_C_CLIP, alpha=0.1, lw=0)
        if per_channel:
            ax.axvspan(*sorted((s * p_lo, s * p_hi)), color=_C_PRUNE, alpha=0.3, lw=0)
            ax.axvspan(*sorted((s * c_lo, s * c_hi)), color=_C_CLIP, alpha=0.25, lw=0)
        ax.axvline(s * prune, color=_C_PRUNE, lw=1.3,
                   label="pruning threshold" if s > 0 else None)
        ax.axvline(s * clip, color=_C_CLIP, lw=1.3,
                   label="clipping threshold" if s > 0 else None)
        ax.axvline(s * lower, color="black", lw=0.9, ls="--",
                   label="interval c−d, c+d" if s > 0 else None)
        ax.axvline(s * upper, color="black", lw=0.9, ls="--")
    ax.set_xlim(x_lo, x_hi)


def _legend(fig, ax, per_channel=False):
    """One legend for the whole figure, below the panels."""
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=_C_PRUNE, alpha=0.3), Patch(color=_C_CLIP, alpha=0.2)]
    labels += ["pruned to level 0", "clipped to the top level"]
    if per_channel:
        labels[0] += " (mean over channels; band: range)"
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8,
               frameon=False)


def _nothing_to_plot(fig_path, message):
    fig, (ax,) = _figure(1, panel_size=(6.0, 2.0))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
    return _save(fig, fig_path)


# --------------------------------------------------------------------------
# histograms
# --------------------------------------------------------------------------

def plot_weight_histograms(model, path, layers=None, bins=101):
    """Histograms of the float kernels of the QIL weight layers, with thresholds.

    One panel per layer (a grid for many layers): the histogram of the float
    kernel values (the quantizer's inputs), grey for the pruned region
    ``|w| < prune``, red beyond the clipping thresholds ``±clip``, and dashed
    lines at the interval ends ``±(c - d)`` and ``±(c + d)``. Titles give the
    layer, its bits and the fraction of weights pruned to exact zeros.
    Per-channel thresholds are drawn at their mean over channels with a band
    over their range.

    Args:
      model: a model with QIL weight layers.
      path: the PNG file to write (folders are created).
      layers: optional list of layer names (or layers) to plot; default all.
      bins: histogram bins.

    Returns:
      ``path``.
    """
    selected = [layer for layer in _qil_layers(model) if isinstance(layer, _WEIGHT_LAYERS)]
    if layers is not None:
        wanted = [getattr(n, "name", n) for n in layers]
        by_name = {layer.name: layer for layer in selected}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"No QIL weight layer named {unknown}; the model has "
                             f"{sorted(by_name)}.")
        selected = [by_name[n] for n in wanted]
    if not selected:
        return _nothing_to_plot(path, "no QIL weight layers in this model")
    fig, axes = _figure(len(selected))
    for ax, layer in zip(axes, selected):
        w = np.asarray(layer.float_kernel.numpy()).ravel()
        th = interval_thresholds(layer)
        pruned = float(np.mean(layer.integer_levels() == 0))
        span = max(float(np.abs(w).max()), _summary(th.upper)[2]) * 1.08
        ax.hist(w, bins=bins, range=(-span, span), color=_C_WEIGHTS, alpha=0.85,
                histtype="stepfilled")
        ax.set_xlim(-span, span)
        _draw_thresholds(ax, th, symmetric=True)
        gamma = _summary(th.gamma)[0]
        mean = "mean " if np.ndim(th.prune) else ""
        ax.set_title(f"{layer.name}: W{th.bits}, {mean}γ={gamma:.2f}, {pruned:.1%} pruned",
                     fontsize=9)
        if th.q == 1:
            ax.text(0.02, 0.97, "ternary: pruning = clipping\nthreshold", fontsize=7,
                    transform=ax.transAxes, va="top",
                    bbox=dict(facecolor="white", alpha=0.8, lw=0, pad=1.5))
        ax.set_xlabel("weight value", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("count", fontsize=8)
    _legend(fig, axes[0], per_channel=any(
        getattr(getattr(layer, "kernel_quantizer", None), "per_channel", False)
        for layer in selected))
    fig.suptitle("Float weights and learned QIL intervals", fontsize=12)
    return _save(fig, path)


def plot_activation_histograms(model, data, path, bins=101):
    """Histograms of the inputs of each ``QILActivation``, with thresholds.

    The inputs (the ReLU outputs that the quantizer sees) are computed on
    ``data`` in inference mode with a sub-model on ``layer.input``. The y axis
    is logarithmic, as ReLU zeros dominate; values below ``prune`` become 0,
    values from ``clip`` on the top level ``2^N - 1``. Titles give the layer,
    its bits and the fraction of the layer's *outputs* that are 0.

    Returns:
      ``path``.
    """
    acts = _activation_layers(model)
    if not acts:
        return _nothing_to_plot(path, "no QILActivation layers in this model")
    values = _run_submodel(model, [a.input for a in acts] + [a.output for a in acts], data)
    inputs, outputs = values[:len(acts)], values[len(acts):]
    fig, axes = _figure(len(acts))
    for ax, layer, x, y in zip(axes, acts, inputs, outputs):
        x = x.ravel()
        th = interval_thresholds(layer)
        span = max(float(x.max()) if x.size else 0.0, th.upper) * 1.05 or 1.0
        ax.hist(x, bins=bins, range=(min(0.0, float(x.min())), span), color=_C_ACTS,
                alpha=0.85, log=True, histtype="stepfilled")
        ax.set_xlim(min(0.0, float(x.min())), span)
        _draw_thresholds(ax, th, symmetric=False)
        zeros = float(np.mean(y == 0))
        relu_zeros = float(np.mean(x <= 0))
        ax.set_title(f"{layer.name}: A{th.bits}, {zeros:.1%} zero outputs", fontsize=10)
        ax.text(0.98, 0.62, f"inputs ≤ 0: {relu_zeros:.1%}",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
        ax.set_xlabel("activation value (quantizer input)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("count (log)", fontsize=8)
    _legend(fig, axes[0])
    fig.suptitle("Activations entering each QIL activation quantizer", fontsize=12)
    return _save(fig, path)


def plot_pruning_ratios(ratios, path):
    """Bar chart of the fraction of exact zeros per layer (weights and activations).

    ``ratios``: a ``PruningRatios`` or its ``to_dict()``. Bars are in
    layer order, blue for weights, orange for activation outputs, labelled
    with the percentage; tick labels give the layer and its bits.

    Returns:
      ``path``.
    """
    rows = ratios.to_dict() if isinstance(ratios, PruningRatios) else dict(ratios)
    if not rows:
        return _nothing_to_plot(path, "no QIL layers")
    from matplotlib.patches import Patch

    names, values, colours, labels = [], [], [], []
    for name, row in rows.items():
        kind = "weights" if "weights" in row else "activations"
        names.append(name)
        values.append(row[kind])
        colours.append(_C_WEIGHTS if kind == "weights" else _C_ACTS)
        bits = row.get("bits")
        labels.append(f"{name} ({'W' if kind == 'weights' else 'A'}{bits})"
                      if bits is not None else name)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.5 * len(names) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(names))
    bars = ax.bar(positions, values, color=colours)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.0%}", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("fraction of exact zeros")
    ax.yaxis.set_major_formatter("{x:.0%}")
    ax.legend(handles=[Patch(color=_C_WEIGHTS, label="weights (level 0)"),
                       Patch(color=_C_ACTS, label="activation outputs = 0")],
              fontsize=8, loc="upper left")
    ax.set_title("Values pruned to zero by the QIL intervals")
    return _save(fig, path)


# --------------------------------------------------------------------------
# intervals during training
# --------------------------------------------------------------------------

class IntervalHistory(keras.callbacks.Callback):
    """Records every QIL quantizer's interval during training.

    At each epoch end (and every ``every_n_batches`` training batches, if
    set) it appends to ``self.history[layer name]`` a dict::

        {"epoch": e, "batch": b or None, "kind": "weights" | "activations",
         "bits": N, "c": c', "d": d', "gamma": γ', "lower": c'-d', "upper": c'+d',
         "fit": k, "fit_start": e0}

    with the effective values (``ops.effective_interval``,
    ``ops.effective_weight_interval`` for weights); per-channel
    intervals are averaged over channels. ``epoch`` counts completed epochs
    (1.0 after the first; a fraction for batch records, none on an epoch's
    last batch, which the epoch-end record covers); ``gamma`` is 1 for
    activations. Fitting again appends to the same history on one continuous
    axis: the ``k``-th ``fit`` (from 0; a progressive stage each) starts at
    ``epoch = fit_start``, the last epoch recorded before it.
    """

    def __init__(self, every_n_batches=None):
        super().__init__()
        if every_n_batches is not None and int(every_n_batches) < 1:
            raise ValueError(f"every_n_batches must be >= 1 or None, got {every_n_batches!r}.")
        self.every_n_batches = int(every_n_batches) if every_n_batches else None
        self.history = {}
        self._epoch = 0
        self._fit, self._start = -1, 0.0
        self._supports_tf_logs = True  # logs are not read: no per-batch host sync

    def on_train_begin(self, logs=None):
        self._fit += 1
        self._start = max((e["epoch"] for entries in self.history.values() for e in entries),
                          default=0.0)

    def record(self, epoch, batch=None):
        """Append the current intervals of every QIL layer of ``self.model``."""
        for layer in _qil_layers(self.model):
            if not layer.built:
                continue
            if isinstance(layer, QILActivation):
                variables, kind, bits = layer.quantizer_vars, "activations", layer.a_bits
                quantizer, gamma = layer.quantizer, 1.0
            else:
                variables, kind, bits = layer.kernel_quantizer_vars, "weights", layer.w_bits
                quantizer = layer.kernel_quantizer
                gamma = float(np.mean(np.maximum(variables["gamma"].numpy(), ops.EPSILON)))
            c, d = quantizer.effective_interval(variables["c"], variables["d"])
            c, d = np.asarray(c.numpy(), np.float64), np.asarray(d.numpy(), np.float64)
            self.history.setdefault(layer.name, []).append({
                "epoch": self._start + float(epoch), "batch": batch, "kind": kind,
                "bits": int(bits), "c": float(c.mean()), "d": float(d.mean()), "gamma": gamma,
                "lower": float((c - d).mean()), "upper": float((c + d).mean()),
                "fit": max(self._fit, 0), "fit_start": self._start,
            })

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_batches and (batch + 1) % self.every_n_batches == 0:
            steps = (self.params or {}).get("steps") or 0
            if steps and batch + 1 >= steps:
                return  # the last batch: on_epoch_end records this state
            position = self._epoch + ((batch + 1) / steps if steps else 0.0)
            self.record(position, batch=int(batch))

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch + 1, batch=None)

    def plot(self, path):
        """Draw each quantizer's interval over training; returns ``path``.

        One panel per quantizer: the band ``[c - d, c + d]`` (shaded), ``c``
        (line) and, for weight quantizers, ``γ`` on a right-hand axis; one epoch
        axis across fits, a dashed line where each later ``fit`` (stage) starts.
        """
        return plot_interval_history(self.history, path)


def plot_interval_history(history, path):
    """Plot an ``IntervalHistory``'s ``history`` dict (see its ``plot``)."""
    history = getattr(history, "history", history)
    names = [n for n, entries in history.items() if entries]
    if not names:
        return _nothing_to_plot(path, "no intervals recorded")
    fig, axes = _figure(len(names), panel_size=(4.0, 2.6))
    any_starts = False
    for ax, name in zip(axes, names):
        entries = history[name]
        x = np.array([e["epoch"] for e in entries])
        lower = np.array([e["lower"] for e in entries])
        upper = np.array([e["upper"] for e in entries])
        centre = np.array([e["c"] for e in entries])
        weights = entries[-1]["kind"] == "weights"
        colour = _C_WEIGHTS if weights else _C_ACTS
        marker = "o" if len(x) <= 30 else None
        ax.fill_between(x, lower, upper, color=colour, alpha=0.25, lw=0)
        ax.plot(x, lower, color=colour, lw=0.8)
        ax.plot(x, upper, color=colour, lw=0.8)
        ax.plot(x, centre, color=colour, lw=1.6, marker=marker, ms=3)
        ax.set_ylim(bottom=min(0.0, float(lower.min())))
        starts = sorted({e["fit_start"] for e in entries if e.get("fit", 0) > 0})
        for start in starts:  # stage boundaries
            ax.axvline(start, color="grey", ls="--", lw=0.8)
        any_starts = any_starts or bool(starts)
        bits = []
        for e in entries:  # the bits of each fit, in order
            if not bits or bits[-1] != e["bits"]:
                bits.append(e["bits"])
        letter = "W" if weights else "A"
        ax.set_title(f"{name}: " + " → ".join(f"{letter}{b}" for b in bits), fontsize=10)
        ax.set_xlabel("epoch" + (" (all stages)" if starts else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        if weights:
            gamma = np.array([e["gamma"] for e in entries])
            twin = ax.twinx()
            twin.plot(x, gamma, color="black", ls=":", lw=1.2, marker=marker, ms=2)
            # at least 0.9-1.1, so that noise around γ = 1 does not look like a trend
            twin.set_ylim(min(0.9, float(gamma.min()) - 0.02), max(1.1, float(gamma.max()) + 0.02))
            twin.tick_params(labelsize=7)
    axes[0].set_ylabel("input units", fontsize=8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=_C_WEIGHTS, alpha=0.3), Patch(color=_C_ACTS, alpha=0.3),
               Line2D([], [], color="grey", lw=1.6), Line2D([], [], color="black", ls=":")]
    labels = ["weights [c−d, c+d]", "activations [c−d, c+d]", "c (centre)",
              "γ (weights, right axis)"]
    if any_starts:
        handles.append(Line2D([], [], color="grey", ls="--", lw=0.8))
        labels.append("a stage (fit) starts")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8,
               frameon=False)
    fig.suptitle("QIL intervals during training", fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------

def save_analysis(model, out_dir, data=None, interval_history=None):
    """Write the analysis of a QIL model to ``out_dir``; return the written paths.

    Files: ``weight_histograms.png``, ``pruning_ratios.png`` and
    ``pruning.json`` (``PruningRatios.to_dict`` plus each layer's
    thresholds under ``"thresholds"``) always; ``activation_histograms.png``
    when ``data`` (a batch of inputs) is given; ``intervals.png`` when
    ``interval_history`` (an ``IntervalHistory`` or its ``history``) has
    records.
    """
    os.makedirs(out_dir, exist_ok=True)
    ratios = pruning_ratios(model, data)
    paths = [plot_weight_histograms(model, os.path.join(out_dir, "weight_histograms.png"))]
    if data is not None:
        paths.append(plot_activation_histograms(
            model, data, os.path.join(out_dir, "activation_histograms.png")))
    paths.append(plot_pruning_ratios(ratios, os.path.join(out_dir, "pruning_ratios.png")))
    if interval_history is not None and any(getattr(interval_history, "history",
                                                    interval_history).values()):
        paths.append(plot_interval_history(interval_history,
                                           os.path.join(out_dir, "intervals.png")))
    report = ratios.to_dict()
    for layer in _qil_layers(model):
        if layer.name in report and layer.built:
            th = interval_thresholds(layer).to_dict()
            report[layer.name]["thresholds"] = {
                k: th[k] for k in ("c", "d", "gamma", "lower", "upper", "prune", "clip")}
    json_path = os.path.join(out_dir, "pruning.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    paths.append(json_path)
    return paths
