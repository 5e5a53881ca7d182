"""``qil_keras.tflite_metadata``: the JSON record stored inside exported ``.tflite`` files.

``qil_keras.export_tflite`` writes one entry named ``"qil_keras"`` into the
flatbuffer's ``metadata`` table (``Model.metadata[i].name`` / ``.buffer``, see
the LiteRT schema); its buffer holds UTF-8 JSON. Apps and the benchmark
harness read it with ``read_metadata``. Keys (all optional for readers):

- ``format``: ``"qil_keras.tflite/1"``;
- ``interpreter``: ``{"op_resolver": "AUTO" | "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
  "reason": str}``: the ``OpResolverType`` the model needs (sparse int8
  models fail to prepare under the default XNNPACK delegate);
- ``class_names``: list of class names, or ``null``;
- ``preprocessing``: ``{"scale": float, "offset": float, "layout": "NHWC",
  "input_range": [lo, hi]}``: ``model_input = raw_pixel * scale + offset``;
- ``input`` / ``output``: ``{"dtype", "shape", "scale", "zero_point"}``;
- ``weight_layers``: a table ``{"columns": [...], "rows": [[...], ...]}``
  with columns ``name``, ``op``, ``w_bits``, ``storage``, ``c``, ``d``,
  ``gamma`` (the learned interval; lists when per channel);
- ``activations``: the same kind of table for the QIL activation quantizers,
  columns ``name``, ``a_bits``, ``c``, ``d``, ``step``, ``levels``;
- ``options``: the export options used.
"""

import json

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

__all__ = ["METADATA_NAME", "FORMAT", "read_metadata", "add_metadata", "strip_names",
           "table_rows"]

METADATA_NAME = "qil_keras"
FORMAT = "qil_keras.tflite/1"


def _model_bytes(model):
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    with open(model, "rb") as f:
        return f.read()


def read_metadata(model):
    """The ``qil_keras`` metadata dict of a ``.tflite`` file (path or bytes), or ``None``."""
    obj = flatbuffer_utils.convert_bytearray_to_object(_model_bytes(model))
    for entry in obj.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            data = obj.buffers[entry.buffer].data
            return json.loads(bytes(bytearray(data)).decode("utf-8"))
    return None


def _edit(model_bytes, edit):
    obj = flatbuffer_utils.convert_bytearray_to_object(model_bytes)
    edit(obj)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def add_metadata(model_bytes, record):
    """Return ``model_bytes`` with ``record`` (a JSON-able dict) stored as ``qil_keras`` metadata.

    An existing ``qil_keras`` entry is replaced.
    """
    payload = json.dumps({"format": FORMAT, **record}, sort_keys=True,
                         separators=(",", ":")).encode("utf-8")

    def edit(obj):
        buffer = schema.BufferT()
        buffer.data = list(payload)
        obj.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(obj.buffers) - 1
        kept = [m for m in (obj.metadata or [])
                if (m.name.decode() if isinstance(m.name, bytes) else m.name) != METADATA_NAME]
        obj.metadata = kept + [entry]

    return _edit(model_bytes, edit)


def strip_names(model_bytes, keep_signatures=True):
    """Drop tensor and subgraph names (``flatbuffer_utils.strip_strings``), keeping the
    signatures (``serving_default`` with its input and output names, which an app's signature
    runner looks up) unless ``keep_signatures=False``.

    Saves the names' bytes; inputs and outputs stay
    reachable by index (``Interpreter.get_input_details()``) and, with the
    signatures, by name (``Interpreter.get_signature_runner()``).
    """
    def edit(obj):
        signatures = obj.signatureDefs
        flatbuffer_utils.strip_strings(obj)
        if keep_signatures:
            obj.signatureDefs = signatures  # they refer to tensors by index, not by name

    return _edit(model_bytes, edit)


def table_rows(table):
    """A metadata table (``{"columns", "rows"}``) as a list of dicts."""
    return [dict(zip(table["columns"], row)) for row in table["rows"]]
