"""``qil_keras.training``: training a quantized model.

Owns: the model classes ``quantize`` returns and the callbacks that end their ``fit``
(``model``; the hook between the last epoch's training and its validation that they share,
``last_epoch``), BatchNorm re-estimation and the frozen-statistics option (``batchnorm``), the
optimizer wrapper that gives intervals their own learning rate (``optimizers``), progressive
schedules (``progressive``), distillation with unlabelled data (``distill``), and the analysis
plots and callbacks (``analysis``).

May import: ``qil_keras._keras``, ``quantization``; ``model`` imports ``integer.snap`` and
``integer.lowering`` inside functions (the snap that ends ``fit``). Nothing here imports
``deployment``.
"""
