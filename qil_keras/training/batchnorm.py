"""BatchNorm in quantization-aware training: batch statistics, re-estimated after ``fit``.

Low-bit weights jump between levels from one step to the next, and BatchNorm's moving
statistics (an average over past steps) then describe an average of past weights, not the final
ones. A model trained with batch statistics but evaluated with the moving ones loses accuracy in
inference mode, and loses more the longer it trains (issue #16; the ``plain`` rows of
``bench/results/batchnorm.json``).

The default, after Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", ICML
2022, §4.1: BatchNorm trains as Keras' own (batch statistics, Keras' gradient), and the model
``qil_keras.quantize`` returns (``qil_keras.model``) ends each ``fit``
by setting every BatchNorm's moving statistics to the population statistics of its input under
the final weights (``reestimate_batchnorm``, via ``BatchNormReestimation``). The export
folds those statistics into the conv, as before.

The option ``quantize(bn_freeze_after=N)`` gives ``QILBatchNormalization`` instead (Jacob et
al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018, §3.2): batch statistics for ``N`` training steps, then the moving ones,
frozen, in training as in inference, with Batch Renormalization's gradient (see
``QILBatchNormalization._with_batch_gradient``; the plain gradient of the frozen
normalization made SGD fine-tuning collapse). Over the last ``freeze_ramp`` steps before the
freeze the output blends linearly from the batch-normalized to the moving-normalized one (see
DEFAULT_FREEZE_RAMP). ``qil_keras.set_bits`` restarts the count when a layer's bits change.
Once frozen, nothing pulls the statistics of the layer's input back to the frozen ones: in
``quantize_with_distillation`` at 2/2 they drifted and top-1 fell (``tests/training/test_distill.py``),
which is why re-estimation replaced the freeze as the default (``bench/results/batchnorm.md``).

The step count is a non-trainable int32 variable (checkpointed with the model; under
``tf.distribute`` it is updated once per step, ``ONLY_FIRST_REPLICA``). While counting, the
moving statistics of a replica follow its own batch, as in Keras' BatchNormalization.
"""

import contextlib

import numpy as np

from .._keras import keras, tf
from .last_epoch import LastEpochCallback

__all__ = ["QILBatchNormalization", "DEFAULT_FREEZE_AFTER", "restart_batchnorm_statistics",
           "reestimate_batchnorm", "BatchNormReestimation"]

# Steps of batch statistics before the freeze, where one is asked for (bn_freeze_after): long
# enough for a moving average of momentum 0.99 (time constant 100 steps) to settle on the
# quantized weights' statistics.
DEFAULT_FREEZE_AFTER = 200
# Steps of the blend before the freeze. On the quickstart CNN at 2/2, SGD(0.01, momentum 0.9)
# with the interval learning rate at 0.01x: test top-1 58.6 % after 4 epochs with an abrupt
# freeze at step 200, 75.7 % with this ramp (one seed, constant learning rate).
DEFAULT_FREEZE_RAMP = 100
# Training inputs that re-estimation after fit reads by default (about 1.5 % of an
# epoch of CIFAR-10).
DEFAULT_REESTIMATE_IMAGES = 2048


def check_freeze_after(value, name="freeze_after"):
    """``value`` if it is a step count (an int >= 0) or ``None``, else a ValueError naming it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be an int >= 0 (training steps) or None, got {value!r}.")
    return value


@keras.utils.register_keras_serializable(package="qil_keras")
class QILBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose statistics freeze after ``freeze_after`` steps.

    Args:
      freeze_after: training steps that use (and update) batch statistics; after them the layer
        normalizes with its moving statistics in training as in inference. ``None``: never
        freeze (a plain BatchNormalization). ``0``: frozen from the first step.
      freeze_ramp: the last this many of those steps blend the output towards the
        moving-statistics one (weight ``1/R, 2/R, ...``); ``0``: an abrupt freeze.
      **kwargs: ``keras.layers.BatchNormalization``'s arguments.
    """

    def __init__(self, *args, freeze_after=DEFAULT_FREEZE_AFTER, freeze_ramp=DEFAULT_FREEZE_RAMP,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.freeze_after = check_freeze_after(freeze_after)
        self.freeze_ramp = check_freeze_after(freeze_ramp, "freeze_ramp") or 0

    def build(self, input_shape):
        super().build(input_shape)  # the four BatchNorm weights first: set_weights order
        self.batch_steps = self.add_weight(
            "batch_steps", (), dtype=tf.int32, initializer="zeros", trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @property
    def frozen(self):
        """Whether training now normalizes with the moving statistics (Python bool)."""
        return self.freeze_after is not None and int(self.batch_steps.numpy()) >= self.freeze_after

    def restart(self):
        """Use batch statistics again for the next ``freeze_after`` training steps."""
        self.batch_steps.assign(0)

    def call(self, inputs, training=None, mask=None):
        training = self._get_training_value(training)
        if self.freeze_after is None or training is False:
            return super().call(inputs, training=training, mask=mask)
        steps = self.batch_steps
        use_batch = tf.logical_and(tf.cast(training, tf.bool), steps < self.freeze_after)
        parent = super()
        ramp = min(self.freeze_ramp, self.freeze_after)

        in_ramp = tf.logical_and(use_batch, steps >= self.freeze_after - ramp)
        weight = tf.clip_by_value(
            tf.cast(steps - (self.freeze_after - ramp) + 1, self.compute_dtype) / max(ramp, 1),
            0.0, 1.0)
        # share of the moving-statistics normalization in this step's output: 0 while counting,
        # rising over the ramp, 1 once frozen
        moving_share = tf.where(use_batch, tf.where(in_ramp, weight, 0.0), 1.0)
        # the moving statistics before this step's update (the forward pass normalizes with them)
        moving_mean = tf.identity(self.moving_mean)
        moving_variance = tf.identity(self.moving_variance)
        with tf.control_dependencies([moving_mean, moving_variance]):
            if self.synchronized:
                # A synchronized BatchNorm all-reduces its moments across replicas, which
                # tf.distribute refuses inside tf.cond: compute both normalizations on every step
                # and blend (a second BatchNorm per step).
                # (y's gradient is used only while counting, when `moving` has weight 0)
                moving = tf.stop_gradient(parent.call(inputs, training=False, mask=mask))
                with tf.control_dependencies([moving]):
                    batch = parent.call(inputs, training=use_batch, mask=mask)
                value = batch + moving_share * (moving - batch)
            else:
                def counting():
                    return parent.call(inputs, training=True, mask=mask)

                # Only the counting branch's own gradient is used (see _with_batch_gradient): the
                # other two stop it, so the backward pass does not run Keras' gradient for nothing.
                def blended():
                    moving = parent.call(inputs, training=False, mask=mask)  # before the update
                    with tf.control_dependencies([moving]):
                        batch = parent.call(inputs, training=True, mask=mask)
                    return tf.stop_gradient(batch + weight * (moving - batch))

                def frozen():
                    return tf.stop_gradient(parent.call(inputs, training=False, mask=mask))

                # 0: batch statistics; 1: the ramp's blend; 2: frozen
                branch = tf.where(use_batch, tf.cast(in_ramp, tf.int32) if ramp else 0, 2)
                value = tf.switch_case(branch, [counting, blended, frozen])
        outputs = self._with_batch_gradient(value, inputs, moving_share, moving_mean,
                                            moving_variance)
        with tf.control_dependencies([outputs]):
            self.batch_steps.assign_add(tf.cast(use_batch, tf.int32))
        return outputs

    def _with_batch_gradient(self, value, inputs, moving_share, moving_mean, moving_variance):
        """``value`` (this step's output) with the gradient of batch normalization.

        With ``w`` the moving statistics' share of the output (0 while counting, 1 once frozen)
        the forward value is ``(1 - w) BN_B(x) + w BN_M(x)``, where ``BN_M(x) = γ (x - μ)/σ + β``
        uses the moving statistics. ``BN_B``'s gradient is batch normalization's own. For
        ``BN_M`` the gradient is the one Batch Renormalization gives (Ioffe, NeurIPS 2017,
        Alg. 1, unclipped): the batch statistics ``μ_B``, ``σ_B`` with the corrections
        ``r = σ_B/σ``, ``d = (μ_B - μ)/σ`` held constant, whose forward value equals ``BN_M``'s.
        Together, with ``g = ∂L/∂y`` and ``x̂_B = (x - μ_B)/σ_B``::

            ∂L/∂x = γ ((1 - w)/σ_B + w/σ) (g - mean(g) - x̂_B · mean(g · x̂_B))
            ∂L/∂γ = Σ g ((1 - w) x̂_B + w (x - μ)/σ),    ∂L/∂β = Σ g

        The plain moving-statistics gradient ``(γ/σ) g`` lacks the two projections that keep a
        normalized network stable: with it, a QIL ResNet-20 at 4/4 fine-tuned with SGD (lr
        0.01, momentum 0.9, intervals at 0.01x) fell to chance within steps of the freeze
        (issue #16, development runs).
        """
        ndim = inputs.shape.rank
        axes = [i for i in range(ndim) if i not in self.axis]
        shape = [1] * ndim
        for a in self.axis:
            shape[a] = inputs.shape[a]
        gamma = (tf.reshape(self.gamma, shape) if self.scale
                 else tf.ones(shape, self.compute_dtype))
        beta = (tf.reshape(self.beta, shape) if self.center
                else tf.zeros(shape, self.compute_dtype))
        synchronized, epsilon = self.synchronized, self.epsilon

        def mean_over_batch(t):
            total = tf.reduce_sum(t, axes, keepdims=True)
            count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(t), axes)), t.dtype)
            context = tf.distribute.get_replica_context()
            if synchronized and context is not None and context.num_replicas_in_sync > 1:
                total, count = context.all_reduce("sum", [total, count])
            return total / count

        fused = not synchronized and ndim == 4 and axes == [0, 1, 2]

        def fused_gradient(dy, x, gamma, w, mean, variance):
            """The same gradient from TensorFlow's FusedBatchNormGrad kernel (NHWC): it returns
            ``(γ'/σ_B) (g - mean(g) - x̂_B mean(g x̂_B))``, ``Σ g x̂_B`` and ``Σ g``; with
            ``γ' = γ ((1 - w) + w σ_B/σ)`` the first is ``∂L/∂x``, and
            ``Σ g (x - μ)/σ = (σ_B/σ) Σ g x̂_B + ((μ_B - μ)/σ) Σ g`` gives ``∂L/∂γ``."""
            batch_mean, batch_var = tf.nn.moments(x, axes)
            gamma, mean, variance = (tf.reshape(t, [-1]) for t in (gamma, mean, variance))
            ratio = tf.sqrt((batch_var + epsilon) / (variance + epsilon))  # σ_B / σ
            d_x, sum_g_hat, sum_g, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=gamma * ((1.0 - w) + w * ratio),
                reserve_space_1=batch_mean, reserve_space_2=batch_var,
                reserve_space_3=tf.zeros([0], x.dtype), epsilon=epsilon, data_format="NHWC",
                is_training=True)
            d_gamma = ((1.0 - w) * sum_g_hat + w * (ratio * sum_g_hat + (batch_mean - mean)
                                                   * tf.math.rsqrt(variance + epsilon) * sum_g))
            return d_x, tf.reshape(d_gamma, shape), tf.reshape(sum_g, shape)

        @tf.custom_gradient
        def attach(y, x, gamma, beta, w, mean, variance):
            def ours(dy):
                if fused:
                    return fused_gradient(dy, x, gamma, w, mean, variance)
                centred = x - mean_over_batch(x)
                inv_batch = tf.math.rsqrt(mean_over_batch(tf.square(centred)) + epsilon)
                batch_hat = centred * inv_batch
                inv_moving = tf.math.rsqrt(tf.reshape(variance, shape) + epsilon)
                bracket = dy - mean_over_batch(dy) - batch_hat * mean_over_batch(dy * batch_hat)
                d_x = gamma * ((1.0 - w) * inv_batch + w * inv_moving) * bracket
                moving_hat = (x - tf.reshape(mean, shape)) * inv_moving
                d_gamma = tf.reduce_sum(dy * ((1.0 - w) * batch_hat + w * moving_hat), axes,
                                        keepdims=True)
                d_beta = tf.reduce_sum(dy, axes, keepdims=True)
                return d_x, d_gamma, d_beta

            def grad(dy):
                # While counting (w = 0) the output is Keras' BatchNorm in training mode and its
                # own gradient flows through y, bit for bit as in keras.layers.BatchNormalization.
                counting = tf.equal(w, 0.0)
                if synchronized:  # no all-reduce inside tf.cond (tf.distribute refuses it)
                    keep = 1.0 - tf.cast(counting, dy.dtype)
                    d_x, d_gamma, d_beta = [keep * g for g in ours(dy)]
                else:
                    d_x, d_gamma, d_beta = tf.cond(
                        counting, lambda: (tf.zeros_like(x), tf.zeros_like(gamma),
                                           tf.zeros_like(beta)), lambda: ours(dy))
                return (dy * tf.cast(counting, dy.dtype), d_x, d_gamma, d_beta, None, None, None)

            return tf.identity(y), grad

        return attach(value, inputs, gamma, beta, moving_share, moving_mean, moving_variance)

    def get_config(self):
        config = super().get_config()
        config["freeze_after"] = self.freeze_after
        config["freeze_ramp"] = self.freeze_ramp
        return config


def restart_batchnorm_statistics(model):
    """Restart the batch-statistics phase of every ``QILBatchNormalization`` in ``model``."""
    count = 0
    for layer in model.layers:
        if isinstance(layer, QILBatchNormalization) and layer.built:
            layer.restart()
            count += 1
    return count


def _input_batches(data, batch_size, max_images):
    """Input batches of ``data`` (an array or nested arrays, a ``tf.data.Dataset`` or a
    ``keras.utils.Sequence`` of ``x`` or ``(x, y, ...)``), up to ``max_images`` inputs."""
    def first(batch):
        return keras.utils.unpack_x_y_sample_weight(batch)[0] if isinstance(batch, tuple) else batch

    def take(x, count):
        return tf.nest.map_structure(lambda a: a[:count], x)

    if isinstance(data, (tf.data.Dataset, keras.utils.Sequence)):
        batches = (first(data[i]) for i in range(len(data))) if isinstance(
            data, keras.utils.Sequence) else (first(batch) for batch in data)
        seen = 0
        for x in batches:
            x = take(x, max_images - seen)
            seen += int(tf.shape(tf.nest.flatten(x)[0])[0])
            yield x
            if seen >= max_images:
                return
    else:
        total = min(int(tf.shape(tf.nest.flatten(data)[0])[0]), max_images)
        for start in range(0, total, batch_size):
            yield tf.nest.map_structure(lambda a: a[start:min(start + batch_size, total)], data)


@contextlib.contextmanager
def batch_statistics_pass(layers):
    """Within the block, the BatchNormalization ``layers`` normalize with each batch's own
    statistics whatever the ``training`` flag (as in training; a ``QILBatchNormalization`` as
    before its freeze), so that a pass in inference mode sees the activations training sees.
    Their moving statistics and freeze settings are restored afterwards: the pass's own
    moving-average updates are undone. A ``synchronized`` layer computes its moments locally
    in the pass (one call sees the whole batch): Keras computes them by another formula in a
    replica context than outside one, and a pass run under ``tf.distribute`` must give the
    same result as on one device."""
    saved = [(layer.moving_mean.numpy(), layer.moving_variance.numpy(),
              getattr(layer, "freeze_after", None), layer.synchronized) for layer in layers]
    try:
        for layer in layers:
            layer._get_training_value = lambda training=None: True
            layer.synchronized = False
            if isinstance(layer, QILBatchNormalization):
                layer.freeze_after = None
        yield
    finally:
        for layer, (mean, variance, freeze_after, synchronized) in zip(layers, saved):
            layer.synchronized = synchronized
            if "_get_training_value" in vars(layer):
                del layer._get_training_value
            if isinstance(layer, QILBatchNormalization):
                layer.freeze_after = freeze_after
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)


def _input_in(model, layer):
    """The input tensor of ``layer`` in ``model``'s graph. A layer can belong to several graphs
    (tfmot's ``quantize_apply`` reuses the unannotated layers, BatchNorm among them, of the
    model it was given), and ``layer.input`` is the one of its first graph."""
    for index in range(len(layer._inbound_nodes)):
        if f"{layer.name}_ib-{index}" in model._network_nodes:
            return layer.get_input_at(index)
    return layer.input


def reestimate_batchnorm(model, data, *, batch_size=128, max_images=None, only_training=False):
    """Set every BatchNorm's moving statistics to the population statistics of its input in
    inference mode.

    With the model's current weights, over up to ``max_images`` (default 2048) inputs of
    ``data`` (an array or nested arrays, a ``tf.data.Dataset`` or a ``keras.utils.Sequence`` of
    ``x`` or ``(x, y)`` batches): ``moving_mean = E[x]``, ``moving_variance = E[(x - E[x])²]``
    per channel, over all inputs and positions, where ``x`` is the layer's input with the whole
    model in inference mode. Layers are estimated in order of depth: a layer's input is
    measured once every BatchNorm before it holds its new statistics, so each layer's
    statistics describe the inputs it will see at inference. Where all inputs fit in memory
    as one batch (``ONE_PASS_MAX_BYTES``), that is one pass: each BatchNorm sets its statistics
    from the whole batch (in float64) and normalizes with them in inference mode before the
    next layer runs. Otherwise one pass over the data per depth, through one traced function
    (layers at the same depth share a pass), several times slower (both timed in
    ``bench/results/train_cost.md``).

    This is Nagel et al., "Overcoming Oscillations in Quantization-Aware Training", ICML 2022,
    §4.1 (BatchNorm re-estimation): low-bit weights that oscillate between levels leave the
    moving averages of training describing an average of past weights, not the final ones.
    Unlike one pass with every BatchNorm on batch statistics (PyTorch's
    ``torch.optim.swa_utils.update_bn``), the inputs of later layers are the inference-mode
    ones: between BatchNorms, low-bit quantizers turn the small differences between batch and
    population normalization into different levels: a 2/2 ResNet-20 fine-tuned with Adam on
    MNIST and re-estimated in one batch-statistics pass scored lower in inference mode than
    with Keras' moving averages (a superseded run of ``bench/batchnorm.py``, which now runs
    every arm with this estimator, issue #16). Only top-level BatchNormalization layers are
    re-estimated (``only_training``: only those re-estimated after ``fit``: trainable, in
    batch-statistics mode). Returns their count.
    """
    max_images = DEFAULT_REESTIMATE_IMAGES if max_images is None else max_images
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images!r}.")
    layers = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization)
              and (not only_training or _reestimated_by_fit(layer))]
    if not layers:
        return 0
    inputs = [_input_in(model, layer) for layer in layers]
    if _fits_one_pass(inputs, max_images):
        _reestimate_in_one_pass(model, layers, data, batch_size, max_images)
        return len(layers)
    ids = {id(layer): i for i, layer in enumerate(layers)}
    upstream = [{ids[id(other)] for other in _layers_upstream(tensor) if id(other) in ids}
                for tensor in inputs]
    moments = _moments_function(model, layers, inputs)
    done = set()
    while len(done) < len(layers):
        ready = [i for i in range(len(layers)) if i not in done and upstream[i] <= done]
        totals = _merged_moments(moments, ready, data, batch_size, max_images)
        for i, (n, mean, m2) in zip(ready, totals):
            shape = layers[i].moving_mean.shape
            layers[i].moving_mean.assign(np.reshape(mean, shape).astype(np.float32))
            layers[i].moving_variance.assign(np.reshape(m2 / n, shape).astype(np.float32))
        done |= set(ready)
    return len(layers)


# Largest estimated working set (bytes) of the one-pass re-estimation: all inputs as one batch,
# the largest BatchNorm input in float32 and float64 with the tensors around it. ResNet-20 on
# 2,048 CIFAR-10 images: about 0.8 GB; a 224x224 MobileNetV2 would need about 20 GB and takes
# one pass per depth instead.
ONE_PASS_MAX_BYTES = 2 ** 31


def _fits_one_pass(inputs, max_images):
    """Whether ``max_images`` inputs fit ``ONE_PASS_MAX_BYTES`` as one batch (inputs of unknown
    spatial size: never)."""
    if any(d is None for t in inputs for d in t.shape[1:]):
        return False
    largest = max(int(np.prod(t.shape[1:])) for t in inputs)
    return max_images * largest * 4 * 6 <= ONE_PASS_MAX_BYTES


def _reestimate_in_one_pass(model, layers, data, batch_size, max_images):
    """Every BatchNorm of ``layers`` takes the float64 moments of its input over all of
    ``data`` (one batch) as moving statistics, then normalizes with them in inference mode:
    the next layers see what they see at inference.

    The pass runs eagerly: each call patches the layers anew, so a ``tf.function`` would be
    traced on every call (TensorFlow then warns about retracing after five of them) for one
    run of large ops, where tracing saves nothing (``bench/train_cost.py`` times this pass)."""
    batches = list(_input_batches(data, batch_size, max_images))
    if not batches:
        raise ValueError("reestimate_batchnorm: `data` yielded no inputs.")
    x = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *batches)
    with _population_statistics(layers):
        model(x, training=False)


@contextlib.contextmanager
def _population_statistics(layers):
    """Within the block, each layer of ``layers``, when called, assigns the moments of its input
    to its moving statistics and normalizes with them (inference mode)."""
    for layer in layers:
        original = layer.call

        def call(inputs, *args, _layer=layer, _original=original, **kwargs):
            axes = [i for i in range(inputs.shape.rank) if i not in _layer.axis]
            x = tf.cast(inputs, tf.float64)
            mean = tf.reduce_mean(x, axes, keepdims=True)
            variance = tf.reduce_mean(tf.square(x - mean), axes)
            updates = [_layer.moving_mean.assign(tf.cast(tf.reshape(
                           mean, tf.shape(_layer.moving_mean)), tf.float32)),
                       _layer.moving_variance.assign(tf.cast(tf.reshape(
                           variance, tf.shape(_layer.moving_variance)), tf.float32))]
            with tf.control_dependencies(updates):
                kwargs["training"] = False
                return _original(tf.identity(inputs), *args, **kwargs)

        layer.call = call
    try:
        yield
    finally:
        for layer in layers:
            if "call" in vars(layer):
                del layer.call


def _layers_upstream(tensor):
    """Every layer whose output the Keras ``tensor`` depends on, itself's producer included (a
    walk back over the graph's nodes)."""
    layer, node_index, _ = tensor._keras_history
    stack, seen, layers = [layer._inbound_nodes[node_index]], set(), []
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            layers.append(node.layer)
            stack.extend(node.parent_nodes)
    return layers


def _moments_function(model, layers, tensors):
    """``moments(x) -> [(count, mean, variance)]`` per channel of each of ``tensors`` (the
    inputs of ``layers``) on a batch, in inference mode. Traced once: it reads the moving
    statistics as they are at each call, so every depth's pass reuses the same trace."""
    probe = keras.Model(model.inputs, tensors)

    @tf.function(reduce_retracing=True)
    def moments(x):
        result = []
        for layer, y in zip(layers, tf.nest.flatten(probe(x, training=False))):
            axes = [i for i in range(y.shape.rank) if i not in layer.axis]
            mean, variance = tf.nn.moments(tf.cast(y, tf.float32), axes)
            count = tf.reduce_prod(tf.gather(tf.shape(y), axes))
            result.append((count, mean, variance))
        return result

    return moments


def _merged_moments(moments, chosen, data, batch_size, max_images):
    """``[(count, mean, sum of squared deviations)]`` per channel of the ``chosen`` outputs of
    ``moments(x)`` over ``data``, merged batch by batch (Chan et al.'s pairwise update)."""
    totals = [None] * len(chosen)
    for x in _input_batches(data, batch_size, max_images):
        result = moments(x)
        for i, (count, mean, variance) in enumerate(result[j] for j in chosen):
            n, m = float(count), mean.numpy().astype(np.float64)
            v = variance.numpy().astype(np.float64)
            if totals[i] is None:
                totals[i] = [n, m, v * n]
                continue
            total_n, total_m, total_m2 = totals[i]
            delta = m - total_m
            merged = total_n + n
            totals[i] = [merged, total_m + delta * n / merged,
                         total_m2 + v * n + delta ** 2 * total_n * n / merged]
    if totals[0] is None:
        raise ValueError("reestimate_batchnorm: `data` yielded no inputs.")
    return totals


def called_in_inference_mode(layer):
    """Whether every call of ``layer`` fixes ``training=False``, as in a transfer-learning base
    model called as ``base(x, training=False)`` once ``quantize`` has inlined it: such a
    BatchNorm normalizes with its moving statistics in training too."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    return bool(nodes) and all((node.call_kwargs or {}).get("training") is False
                               for node in nodes)


def _reestimated_by_fit(layer):
    """Whether re-estimation after ``fit`` applies to ``layer``: a trainable BatchNormalization
    that normalizes with batch statistics in training (not a frozen QILBatchNormalization, nor
    one called with ``training=False``, whose moving statistics are the model's own)."""
    return (isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            and getattr(layer, "freeze_after", None) is None
            and not called_in_inference_mode(layer))


def _fit_inputs(x):
    """What ``BatchNormReestimation`` can read the training inputs from, else ``None``."""
    if isinstance(x, (tf.data.Dataset, keras.utils.Sequence)):
        return x
    flat = tf.nest.flatten(x) if x is not None else []
    if flat and all(isinstance(a, (np.ndarray, tf.Tensor)) for a in flat):
        return x
    return None


class BatchNormReestimation(LastEpochCallback):
    """Re-estimates BatchNorm statistics (``reestimate_batchnorm``) at the end of ``fit``
    and, inside ``fit``, before each validation run, so validation metrics use them too (in
    the last epoch, as soon as its training steps are done: ``LastEpochCallback``, so that a
    ``qil_keras.IntegerSnap`` after it snaps the re-estimated model before that validation).

    Args:
      data: the inputs to estimate from (an array or nested arrays, a ``tf.data.Dataset`` or
        a ``keras.utils.Sequence``; labels are ignored).
      max_images, batch_size: as for ``reestimate_batchnorm``.
      model: the model to re-estimate; default the model ``fit`` trains (a distillation
        wrapper passes its student).

    A model returned by ``qil_keras.quantize`` adds this callback to its own ``fit`` (with
    the ``x`` given to ``fit``): see ``qil_keras.model.QILModel``.
    """

    def __init__(self, data, *, max_images=None, batch_size=128, model=None, only_training=False):
        super().__init__()
        self.data, self.batch_size, self.target = data, batch_size, model
        self.max_images = DEFAULT_REESTIMATE_IMAGES if max_images is None else max_images
        self.only_training = only_training
        self._in_fit = self._current = False

    def reestimate(self):
        reestimate_batchnorm(self.target or self.model, self.data, batch_size=self.batch_size,
                             max_images=self.max_images, only_training=self.only_training)
        self._current = True

    def before_last_validation(self):
        self.reestimate()

    def on_train_begin(self, logs=None):
        self._in_fit, self._current = True, False

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._current = False  # the weights are about to change

    def on_test_begin(self, logs=None):
        if self._in_fit and not self._current:
            self.reestimate()

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self._in_fit = False
        if not self._current:  # else: re-estimated for the last validation, same weights
            self.reestimate()
