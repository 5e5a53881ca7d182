"""Nested models inlined: one functional graph of layers, for ``quantize``.

Transfer-learning models usually call a whole base model as one layer
(``keras.Sequential([keras.applications.MobileNetV2(include_top=False), ...])``
or ``x = base(inputs, training=False)``). ``quantize`` rewrites a graph layer by
layer, so ``flatten_nested`` first builds an equivalent functional model in which
every nested Functional or Sequential model is replaced by copies of its layers.
"""

from .._keras import keras, tf

__all__ = ["clone_layer", "flatten_nested", "nested_models"]

L = keras.layers


def clone_layer(layer, new_class=None, extra=None):
    """A new, unbuilt layer from ``layer``'s config (``extra`` entries replaced), of
    ``new_class`` if given."""
    config = layer.get_config()
    if getattr(layer, "synchronized", False):  # missing from BatchNormalization.get_config()
        config["synchronized"] = True
    config.update(extra or {})
    return (new_class or type(layer)).from_config(config)


def _is_graph_model(layer):
    return isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False)


def nested_models(model):
    """The Functional or Sequential models ``model`` calls as layers (``flatten_nested``
    inlines them)."""
    return [layer for layer in model.layers if _is_graph_model(layer)]


def flatten_nested(model):
    """A functional copy of ``model`` with every nested Functional/Sequential model inlined.

    Each layer is a fresh copy (``from_config``, weights copied), so ``model`` and its
    layers are left as they were; a layer (or nested model) called twice stays shared. A
    nested model called with a fixed ``training`` (``base(x, training=False)``, the usual
    way to keep a base model's BatchNorm in inference mode) passes it on to every inner
    layer that takes one. Nested subclassed models are kept as one layer (``quantize``
    then reports them); layer names must be unique across the nesting levels.
    """
    clones = {}

    def copy_of(layer):
        if id(layer) not in clones:
            clones[id(layer)] = (layer, clone_layer(layer))
        return clones[id(layer)][1]

    def run(graph, inputs, training):
        tensors = {id(t): x for t, x in zip(graph.inputs, inputs)}

        def mapped(value):   # a symbolic tensor of this graph -> its copy; others as they are
            return tensors.get(id(value), value)

        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                layer = node.layer
                if isinstance(layer, L.InputLayer):
                    continue
                args = tf.nest.map_structure(mapped, node.call_args)
                kwargs = dict(tf.nest.map_structure(mapped, node.call_kwargs))
                if _is_graph_model(layer):
                    inner_inputs = args[0] if args else kwargs["inputs"]
                    if isinstance(inner_inputs, dict):   # Keras maps a dict by input name
                        inner_inputs = [inner_inputs[name] for name in layer.input_names]
                    outputs = run(layer, tf.nest.flatten(inner_inputs),
                                  kwargs.get("training", training))
                    outputs = tf.nest.pack_sequence_as(layer._nested_outputs, outputs)
                else:
                    if training is not None and getattr(layer, "_expects_training_arg", False):
                        kwargs.setdefault("training", training)
                    outputs = copy_of(layer)(*args, **kwargs)
                for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                    tensors[id(old)] = new
        return [tensors[id(t)] for t in graph.outputs]

    names = getattr(model, "input_names", None) or [None] * len(model.inputs)
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=name)
              for t, name in zip(model.inputs, names)]
    outputs = run(model, inputs, None)
    try:
        flat = keras.Model(inputs if len(inputs) > 1 else inputs[0],
                           tf.nest.pack_sequence_as(model._nested_outputs, outputs),
                           name=model.name)
    except ValueError as error:
        if "unique" not in str(error):
            raise
        raise ValueError(
            f"{model.name!r} calls nested models whose layers share names with each other or "
            f"with the outer model's ({error}); quantize inlines nested models into one graph, "
            "so give the layers unique names (e.g. build the outer layers with name=...)."
        ) from None
    for original, copy in clones.values():
        copy.set_weights(original.get_weights())
    return flat
