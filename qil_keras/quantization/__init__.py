"""``qil_keras.quantization``: the QIL maths, its quantizers and layers, and the model rewrite.

Owns: the quantizer functions with their gradients (``ops``), the tfmot ``Quantizer`` classes
(``quantizers``), the Keras layers (``layers``: QIL conv/dense/activation, ``FakeQuant8``),
interval initialization (``init``), ``qil_keras.quantize`` and ``set_bits`` (``quantize``)
with their report (``report``), the integer grids of a trained model (``inspection``), and the
tfmot ``QuantizeConfig`` path (``tfmot_config``, ``from_tfmot``).

May import: ``qil_keras._keras``, ``data.checks`` (the checks on user data); ``quantize``
also imports ``training.model`` and ``training.batchnorm`` (the model class and BatchNorm
layer it builds with) and, inside a function, ``integer.ties``. Nothing here imports
``deployment``.
"""
