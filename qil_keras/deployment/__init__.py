"""``qil_keras.deployment``: running and measuring ``.tflite`` files.

Owns: the benchmark harness on the host (``harness``; its rows, tables and files in
``results``), the same over adb on an Android phone
with LiteRT's ``benchmark_model`` (``adb``), the ``qil-keras bench`` command (``bench_cli``),
and the provenance recorded with every result (``provenance``: git commit, versions, machine).

May import: ``qil_keras._keras``, ``integer.tflite_metadata``, ``data``. Nothing here imports
``quantization`` or ``training``: it measures files, whatever made them.
"""
