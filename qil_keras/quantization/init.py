"""Interval initialization: the clipping range that minimizes quantization MSE.

For a tensor ``v`` (weight magnitudes, or non-negative activations) and ``q``
levels above zero, the interval starts at ``c = d = h / 2`` (lower end 0, upper
end ``h``) with ``h = argmin_h E[(h/q · round(clip(v, 0, h) · q/h) - v)^2]``
over a grid of candidate ``h`` in ``(0, max v]``. With ``c = d`` and ``γ = 1`` a
QIL quantizer is exactly the uniform quantizer with that range, so this is the
standard MSE-optimal clipping (Banner et al., 2019) and QIL learns from there.
"""

import numpy as np

__all__ = ["mse_optimal_range", "interval_from_values"]

_MAX_SAMPLES = 200_000
_NUM_CANDIDATES = 100


def mse_optimal_range(values, q):
    """Upper end ``h`` of the MSE-optimal range ``[0, h]`` for ``q`` levels."""
    v = np.abs(np.asarray(values, dtype=np.float64).ravel())
    if v.size > _MAX_SAMPLES:  # a deterministic, evenly strided sample
        v = v[:: int(np.ceil(v.size / _MAX_SAMPLES))]
    top = float(v.max()) if v.size else 0.0
    if top <= 0.0:
        return 1.0
    candidates = top * np.linspace(1.0 / _NUM_CANDIDATES, 1.0, _NUM_CANDIDATES)
    errors = []
    for h in candidates:
        step = h / q
        quantized = np.clip(np.floor(v / step + 0.5), 0, q) * step
        errors.append(np.mean((quantized - v) ** 2))
    return float(candidates[int(np.argmin(errors))])


def interval_from_values(values, q, channel_axes=None):
    """``(c, d)`` with ``c = d = h / 2`` for the MSE-optimal ``h``.

    ``channel_axes``: axes kept (one interval per channel); ``None`` for one
    interval for the whole tensor. Returns float32 arrays of the kept shape.
    """
    values = np.asarray(values, dtype=np.float32)
    if not channel_axes:
        h = np.float32(mse_optimal_range(values, q))
        return h / 2, h / 2
    axes = tuple(a % values.ndim for a in channel_axes)
    rest = tuple(a for a in range(values.ndim) if a not in axes)
    moved = np.transpose(values, rest + axes)
    kept_shape = moved.shape[len(rest):]
    flat = moved.reshape(-1, int(np.prod(kept_shape)))
    h = np.array([mse_optimal_range(flat[:, i], q) for i in range(flat.shape[1])], np.float32)
    h = h.reshape(kept_shape)
    return h / 2, h / 2
