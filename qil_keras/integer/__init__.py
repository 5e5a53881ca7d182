"""``qil_keras.integer``: the integer TFLite model.

Owns: the inference graph whose FakeQuant ops carry the learned grids (``lowering`` walks the
Keras graph, ``emission`` writes the ops and chooses each requantization), the moves that put a
Keras model on the file's integer grid and off rounding ties (``snap``, ``ties``),
``qil_keras.export_tflite`` with its verification (``export``; ``divergence`` locates where a
file and its Keras model part), the numpy integer reference
of LiteRT's kernels (``integer_reference``), and reading and writing the flatbuffer and its
metadata (``tflite_inspect``, ``tflite_metadata``).

May import: ``qil_keras._keras``, ``quantization``, ``data.checks``; ``export`` imports
``deployment.harness`` to run files with the LiteRT interpreter.
"""
