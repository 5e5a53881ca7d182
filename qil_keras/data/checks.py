"""Checks on the arrays users pass as data (calibration, representative, validation and
benchmark sets) that no other check would catch before they silently spoil a result."""

import numpy as np

__all__ = ["require_finite"]


def require_finite(array, where, error=ValueError):
    """``array``, refused with ``error`` when it holds NaN or infinite values: ranges and
    intervals are set from such data, and a file is verified on it."""
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise error(f"{where} holds {bad:,} NaN or infinite values (of {array.size:,}); check "
                    "the preprocessing that produced it.")
    return array
