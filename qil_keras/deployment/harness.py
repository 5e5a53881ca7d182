"""``qil_keras.harness``: accuracy, agreement, latency, size and memory of ``.tflite`` files.

``benchmark_models`` runs a list of models over one evaluation set and
returns a ``BenchmarkResult`` with one ``ModelResult`` row per model:

* **top-1** (and **top-5** when the model has more than 5 classes) on the
  labels, from a batched pass over the whole set;
* **agreement** with a reference model (share of examples with the same
  arg-max) and the largest absolute difference of the (dequantized) outputs;
* **latency** at batch 1: mean, median, p90, p99 and standard deviation;
* **size** of the file, raw and gzip-compressed; **memory** where measurable.

Two backends share this code. ``"host"`` (``HostBackend``) runs the
LiteRT interpreter (``ai_edge_litert.interpreter.Interpreter``) in this
process: latency samples are the wall times of single ``invoke()`` calls
(``time.perf_counter_ns``) after warm-up, as LiteRT's ``benchmark_model``
times its runs. ``qil_keras.adb.AdbBackend`` runs LiteRT's
``benchmark_model`` binary on an Android phone over adb.

Kernels (``op_resolver``): ``None`` takes the model's own choice from its
``qil_keras`` metadata (``qil_keras.tflite_metadata``; sparse int8 models
ask for ``"BUILTIN_WITHOUT_DEFAULT_DELEGATES"``), else ``"AUTO"`` (builtin
kernels with the default XNNPACK delegate); a name overrides it for every model
(``"AUTO"``, ``"BUILTIN"``, ``"BUILTIN_REF"``,
``"BUILTIN_WITHOUT_DEFAULT_DELEGATES"``, the ``OpResolverType`` members).

Inputs are model-ready: the harness quantizes float data itself for int8/uint8
inputs (``q = round(x / scale) + zero_point``, the tensor's own parameters)
and dequantizes integer outputs. ``write_results``
(``qil_keras.deployment.results``, with the row types) writes ``results.json``,
``results.csv``, ``results.md`` and ``accuracy_vs_latency.png``;
``print_benchmark_table`` is the one-call form for scripts.

Reference: LiteRT "Performance measurement" (benchmark tools) and
``tflite/tools/benchmark/benchmark_model.cc`` in google-ai-edge/LiteRT.
"""

import dataclasses
import gzip
import os
import sys
import time

import numpy as np

from ..data.checks import require_finite
from .results import (BenchmarkResult, ModelResult, _environment, latency_stats,
                      write_results)

__all__ = [
    "OP_RESOLVERS",
    "ModelInfo",
    "ModelResult",
    "BenchmarkResult",
    "HostBackend",
    "benchmark_models",
    "write_results",
    "print_benchmark_table",
    "latency_stats",
    "quantize_input",
    "dequantize_output",
]

#: Kernel choices, the members of ``ai_edge_litert.interpreter.OpResolverType``.
OP_RESOLVERS = ("AUTO", "BUILTIN", "BUILTIN_REF", "BUILTIN_WITHOUT_DEFAULT_DELEGATES")

_INTEGER_TENSOR_TYPES = (np.int8, np.uint8, np.int16)


# ---------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class ModelInfo:
    """What the harness knows about one model file before running it.

    ``input`` and ``output`` are dicts with ``index``, ``name``, ``dtype``
    (a NumPy type), ``shape_signature`` (``-1`` where dynamic), ``scale`` and
    ``zero_point`` (``0.0, 0`` when not quantized). ``op_resolver`` is the
    kernel choice, ``op_resolver_source`` where it came from (``"metadata"``,
    ``"argument"`` or ``"default"``); ``float_weights`` is true when no tensor
    of the model is stored as an integer type.
    """

    name: str
    path: str
    input: dict
    output: dict
    metadata: dict
    op_resolver: str
    op_resolver_source: str
    size_bytes: int
    gzip_bytes: int
    float_weights: bool
    signature: tuple = None   # ("serving_default", input key, output key) when the file has one

    @property
    def num_classes(self):
        return int(self.output["shape_signature"][-1])

    @property
    def dynamic_batch(self):
        return int(self.input["shape_signature"][0]) == -1


def _check_tflite(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model file {path!r} does not exist: pass the path of a .tflite file.")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise ValueError(
            f"{path!r} is not a TFLite flatbuffer (bytes 4-8 are {head[4:8]!r}, expected b'TFL3'): "
            "pass a .tflite file written by tf.lite.TFLiteConverter or qil_keras.export_tflite.")
    return path


def tensor_spec(detail):
    """The fields of an interpreter tensor detail the harness and the exporter use."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return {"index": int(detail["index"]), "name": detail.get("name") or "",
            "dtype": np.dtype(detail["dtype"]).type,
            "shape_signature": [int(s) for s in detail["shape_signature"]],
            "scale": float(scale), "zero_point": int(zero_point)}


def _model_info(name, path, op_resolver):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from ..integer.tflite_metadata import read_metadata

    path = _check_tflite(path)
    with open(path, "rb") as handle:
        content = handle.read()
    metadata = read_metadata(content) or {}
    # Only reads the graph: no delegate, nothing allocated.
    interpreter = Interpreter(model_path=path, experimental_op_resolver_type=getattr(
        OpResolverType, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"))
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"Model {name} ({path}) has {len(inputs)} inputs and {len(outputs)} outputs; the harness "
            "evaluates classifiers with one input (images) and one output (class scores).")
    float_weights = not any(np.dtype(t["dtype"]).type in _INTEGER_TENSOR_TYPES
                            for t in interpreter.get_tensor_details())
    serving = interpreter.get_signature_list().get("serving_default")
    signature = None
    if serving and len(serving["inputs"]) == 1 and len(serving["outputs"]) == 1:
        signature = ("serving_default", serving["inputs"][0], serving["outputs"][0])
    if op_resolver is not None:
        resolver, source = _check_resolver(op_resolver), "argument"
    elif (metadata.get("interpreter") or {}).get("op_resolver"):
        resolver, source = _check_resolver(metadata["interpreter"]["op_resolver"]), "metadata"
    else:
        resolver, source = "AUTO", "default"
    return ModelInfo(name=name, path=path, input=tensor_spec(inputs[0]),
                     output=tensor_spec(outputs[0]),
                     metadata=metadata, op_resolver=resolver, op_resolver_source=source,
                     size_bytes=len(content), gzip_bytes=len(gzip.compress(content, 9)),
                     float_weights=float_weights, signature=signature)


def _check_resolver(name):
    if name not in OP_RESOLVERS:
        raise ValueError(f"Unknown op_resolver {name!r}: use one of {', '.join(OP_RESOLVERS)}, "
                         "or None to take it from the model's metadata.")
    return name


def _named_models(models):
    """``[(name, path)]`` from paths, ``(name, path)`` pairs or a ``{name: path}`` dict."""
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    items = list(models.items()) if isinstance(models, dict) else list(models)
    if not items:
        raise ValueError("No models given: pass a list of .tflite paths.")
    named = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            named.append((str(item[0]), os.fspath(item[1])))
        else:
            path = os.fspath(item)
            named.append((os.path.splitext(os.path.basename(path))[0], path))
    seen = {}
    for i, (name, path) in enumerate(named):  # same file name in two folders: keep both apart
        if name in seen:
            named[i] = (f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}/{name}", path)
        seen[named[i][0]] = True
    if len({n for n, _ in named}) != len(named):
        raise ValueError(f"Model names are not unique: {[n for n, _ in named]}; pass (name, path) pairs.")
    return named


# ---------------------------------------------------------------------------
# Data


def _as_arrays(data, labels, limit):
    """``(x, y)`` NumPy arrays from ``(x, y)``, ``x`` with ``labels=``, or a tf.data.Dataset."""
    if hasattr(data, "as_numpy_iterator"):
        xs, ys = [], []
        for element in data.as_numpy_iterator():
            if isinstance(element, tuple):
                xs.append(element[0])
                ys.append(element[1] if len(element) > 1 else None)
            else:
                xs.append(element)
                ys.append(None)
            if limit is not None and sum(len(b) for b in xs) >= limit:
                break
        if not xs:
            raise ValueError("The dataset yielded no batches.")
        x = np.concatenate(xs)
        y = None if any(b is None for b in ys) else np.concatenate(ys)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), data[1]
    else:
        x, y = np.asarray(data), None
    if labels is not None:
        if y is not None:
            raise ValueError("Labels were given twice: in data=(x, y) and in labels=.")
        y = labels
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"Labels must be integer class indices of shape (N,), got {y.dtype} {y.shape}.")
        if len(y) != len(x):
            raise ValueError(f"{len(x)} examples but {len(y)} labels.")
    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
    if len(x) == 0:
        raise ValueError("The evaluation set is empty.")
    return require_finite(x, "The evaluation set"), y


def _check_input_shape(info, x):
    expected = info.input["shape_signature"][1:]
    got = list(x.shape[1:])
    if len(expected) != len(got) or any(e not in (-1, g) for e, g in zip(expected, got)):
        raise ValueError(
            f"Data shape {tuple(got)} (per example) does not match the input of model {info.name}: "
            f"{tuple(info.input['shape_signature'])} with the batch first (-1 = any). Preprocess the "
            "data to the model's input size and layout (NHWC), e.g. with image_size= in "
            "qil_keras.datasets.load_image_folder.")


def quantize_input(x, tensor):
    """Float ``x`` as the input tensor's type: ``round(x / scale) + zero_point``, saturated.

    ``tensor`` is a dict with ``dtype``, ``scale`` and ``zero_point`` (see
    ``ModelInfo``). Float inputs are only cast; integer inputs without a
    scale are rounded and cast.
    """
    dtype = np.dtype(tensor["dtype"])
    if dtype.kind == "f":
        return np.asarray(x, dtype=dtype)
    x = np.asarray(x, dtype=np.float64)
    if tensor["scale"]:
        x = x / tensor["scale"] + tensor["zero_point"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x), info.min, info.max).astype(dtype)


def dequantize_output(q, tensor):
    """Integer outputs back to real values ``(q - zero_point) * scale`` (float outputs unchanged)."""
    q = np.asarray(q)
    if np.dtype(tensor["dtype"]).kind == "f" or not tensor["scale"]:
        return q.astype(np.float32)
    return ((q.astype(np.float64) - tensor["zero_point"]) * tensor["scale"]).astype(np.float32)


def _batches(n, batch_size, dynamic, fixed):
    """``(start, stop, run_batch)``: slices of the data and the batch the model runs them at."""
    size = batch_size if dynamic else fixed
    for start in range(0, n, size):
        stop = min(start + size, n)
        yield start, stop, (stop - start if dynamic else fixed)


def _padded(x, run_batch):
    if len(x) == run_batch:
        return x
    pad = np.repeat(x[-1:], run_batch - len(x), axis=0)
    return np.concatenate([x, pad])


def _topk(outputs, y, k):
    top = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


# ---------------------------------------------------------------------------
# Host backend


def _rss_mb():
    """Current resident set size of this process (MB) from /proc/self/statm, or None."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb():
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KB on Linux


def _progress(iterable, enabled, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, leave=False, **kwargs)


class HostBackend:
    """Runs models with the LiteRT interpreter in this process.

    ``num_threads`` is passed to the interpreter; latency is measured on a
    separate interpreter at batch 1: ``warmup_runs`` untimed ``invoke()``
    calls, then ``num_runs`` timed ones (input set once, only ``invoke()``
    inside the timer). Memory: the increase of the process's resident set
    (``/proc/self/statm``) from before that interpreter is built to after its
    timed runs ("RSS increase while loaded", the analogue of
    ``benchmark_model``'s "Memory footprint delta"), and, separately, how
    much the process's peak RSS (``ru_maxrss``) rose meanwhile (0 when an
    earlier step, e.g. the batched accuracy pass, had already peaked higher).
    """

    name = "host"

    def __init__(self, num_threads=1, warmup_runs=5, num_runs=50):
        if num_runs < 1 or warmup_runs < 0 or num_threads < 1:
            raise ValueError("num_runs must be >= 1, warmup_runs >= 0 and num_threads >= 1.")
        self.num_threads = int(num_threads)
        self.warmup_runs = int(warmup_runs)
        self.num_runs = int(num_runs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def describe(self):
        return {"backend": "host", "runtime": "ai_edge_litert.interpreter.Interpreter",
                "num_threads": self.num_threads, "warmup_runs": self.warmup_runs,
                "num_runs": self.num_runs, "latency_batch": 1,
                "latency_method": "wall time of each invoke() at batch 1 (time.perf_counter_ns)",
                "memory_method": "RSS increase while the batch-1 interpreter is loaded and run "
                                 "(/proc/self/statm); peak_rss_increase_mb: rise of ru_maxrss"}

    def _interpreter(self, info):
        from ai_edge_litert import interpreter as litert

        return litert.Interpreter(
            model_path=info.path, num_threads=self.num_threads,
            experimental_op_resolver_type=getattr(litert.OpResolverType, info.op_resolver))

    def outputs(self, info, x, batch_size, progress=False):
        """Dequantized outputs ``(N, classes)`` of a batched pass over ``x``.

        Through the file's ``serving_default`` signature runner (as an app using
        signatures runs it) when it has one, else through the input and output tensors.
        """
        interp = self._interpreter(info)
        fixed = info.input["shape_signature"][0]
        if info.signature is not None:
            key, input_key, output_key = info.signature
            runner = interp.get_signature_runner(key)

            def run(batch, run_batch):   # the runner resizes and allocates as needed
                return runner(**{input_key: batch})[output_key]
        else:
            i_in, i_out = info.input["index"], info.output["index"]
            current = [None]

            def run(batch, run_batch):
                if run_batch != current[0]:
                    if info.dynamic_batch:
                        interp.resize_tensor_input(i_in, [run_batch, *x.shape[1:]])
                    interp.allocate_tensors()
                    current[0] = run_batch
                interp.set_tensor(i_in, batch)
                interp.invoke()
                return interp.get_tensor(i_out)
        result = []
        steps = list(_batches(len(x), batch_size, info.dynamic_batch, fixed))
        for start, stop, run_batch in _progress(steps, progress, desc=f"{info.name} accuracy"):
            out = run(quantize_input(_padded(x[start:stop], run_batch), info.input), run_batch)
            result.append(dequantize_output(out[: stop - start], info.output))
        return np.concatenate(result).reshape(len(x), -1)

    def latency(self, info, x1, progress=False):
        """``{"samples_ms": [...], "memory_mb", "peak_rss_increase_mb", ...}`` at batch 1."""
        rss0, peak0 = _rss_mb(), _maxrss_mb()
        interp = self._interpreter(info)
        batch = 1 if info.dynamic_batch else info.input["shape_signature"][0]
        if info.dynamic_batch:
            interp.resize_tensor_input(info.input["index"], [1, *x1.shape[1:]])
        interp.allocate_tensors()
        interp.set_tensor(info.input["index"], quantize_input(_padded(x1, batch), info.input))
        for _ in range(self.warmup_runs):
            interp.invoke()
        samples = []
        bar = _progress(range(self.num_runs), progress, desc=f"{info.name} latency")
        for _ in bar:
            start = time.perf_counter_ns()
            interp.invoke()
            samples.append((time.perf_counter_ns() - start) / 1e6)
        rss1, peak1 = _rss_mb(), _maxrss_mb()
        return {"samples_ms": samples, "latency_batch": int(batch),
                "memory_mb": None if rss0 is None else max(rss1 - rss0, 0.0),
                "peak_rss_increase_mb": None if peak0 is None else max(peak1 - peak0, 0.0)}


# ---------------------------------------------------------------------------
# The harness


def benchmark_models(models, data, *, labels=None, reference=None, backend="host", num_threads=None,
                     op_resolver=None, warmup_runs=None, num_runs=None, batch_size=100, limit=None,
                     preprocess=None, out_dir=None, progress=True):
    """Accuracy, agreement, latency, size and memory of each ``.tflite`` model on one data set.

    Args:
      models: ``.tflite`` paths, ``(name, path)`` pairs or a ``{name: path}``
        dict. Names default to the file names without ``.tflite``.
      data: ``(x, y)`` arrays, ``x`` alone (with ``labels=``, or no labels:
        agreement and latency only) or a ``tf.data.Dataset`` of ``(x, y)``
        batches. ``x`` is model-ready (normalized, NHWC) unless ``preprocess``.
      labels: integer labels ``(N,)`` when ``data`` is ``x`` alone.
      reference: name (or path) of the model whose outputs the others are
        compared with; default the first model whose weights are all float,
        else the first model.
      backend: ``"host"`` or a ``qil_keras.adb.AdbBackend``.
      num_threads, warmup_runs, num_runs: host settings (defaults 1, 5, 50,
        those of ``ai_edge_litert.tools.benchmark_litert_model``). An
        ``AdbBackend`` carries its own; passing them with one is an error.
      op_resolver: None (each model's metadata, else ``"AUTO"``) or one of
        ``OP_RESOLVERS`` for all models.
      batch_size: batch of the accuracy pass (models with a fixed batch size
        run at that size, the last batch padded).
      limit: use only the first ``limit`` examples.
      preprocess: optional ``callable(model_info, x) -> x`` applied per model
        (e.g. the metadata's ``x * scale + offset`` on raw pixels).
      out_dir: when given, ``write_results`` writes the files there.
      progress: tqdm progress bars (on stderr).

    Returns:
      A ``BenchmarkResult``.
    """
    host_settings = {"num_threads": num_threads, "warmup_runs": warmup_runs, "num_runs": num_runs}
    if backend == "host":
        backend = HostBackend(**{k: v for k, v in host_settings.items() if v is not None})
    elif isinstance(backend, str):
        raise ValueError(f"Unknown backend {backend!r}: use 'host' or a qil_keras.adb.AdbBackend(...).")
    elif any(v is not None for v in host_settings.values()):
        given = [k for k, v in host_settings.items() if v is not None]
        raise ValueError(f"{', '.join(given)} are host settings: set them on the {type(backend).__name__} "
                         "instead.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    x_all, y = _as_arrays(data, labels, limit)
    infos = [_model_info(name, path, op_resolver) for name, path in _named_models(models)]
    model_x = {}
    for info in infos:
        x = x_all if preprocess is None else np.asarray(preprocess(info, x_all))
        _check_input_shape(info, x)
        model_x[info.name] = x
        if y is not None and (y.min() < 0 or y.max() >= info.num_classes):
            raise ValueError(f"Labels range over [{y.min()}, {y.max()}] but model {info.name} has "
                             f"{info.num_classes} classes.")
    ref = _pick_reference(infos, reference)

    rows, outputs = [], {}
    with backend:
        for info in infos:
            x = model_x[info.name]
            out = backend.outputs(info, x, int(batch_size), progress=progress)
            lat = backend.latency(info, x[:1], progress=progress)
            outputs[info.name] = out
            rows.append(_row(info, backend, out, y, lat, len(x)))
    ref_out = outputs[ref]
    for row in rows:
        out = outputs[row.name]
        row.is_reference = row.name == ref
        if out.shape == ref_out.shape:
            row.agreement = float(np.mean(out.argmax(1) == ref_out.argmax(1)))
            row.max_abs_diff = float(np.max(np.abs(out - ref_out)))
    result = BenchmarkResult(rows=rows, reference=ref,
                             settings={**backend.describe(), "batch_size": int(batch_size),
                                       "op_resolver": op_resolver},
                             environment=_environment(), outputs=outputs)
    if out_dir is not None:
        write_results(result, out_dir)
    return result


def _pick_reference(infos, reference):
    if reference is None:
        return next((i.name for i in infos if i.float_weights), infos[0].name)
    for info in infos:
        if reference in (info.name, info.path) or os.path.abspath(reference) == os.path.abspath(info.path):
            return info.name
    raise ValueError(f"reference={reference!r} is none of the models: {[i.name for i in infos]}.")


def _row(info, backend, out, y, lat, n):
    stats = latency_stats(lat["samples_ms"])
    row = ModelResult(
        name=info.name, path=info.path, backend=backend.name,
        input_dtype=np.dtype(info.input["dtype"]).name, num_classes=info.num_classes, num_examples=n,
        op_resolver=info.op_resolver, op_resolver_source=info.op_resolver_source,
        size_bytes=info.size_bytes, gzip_bytes=info.gzip_bytes,
        latency_mean_ms=stats["mean"], latency_median_ms=stats["median"], latency_p90_ms=stats["p90"],
        latency_p99_ms=stats["p99"], latency_std_ms=stats["std"], latency_min_ms=stats["min"],
        latency_max_ms=stats["max"], latency_n=stats["n"], latency_batch=lat.get("latency_batch", 1),
        memory_mb=lat.get("memory_mb"), memory_method=backend.describe().get("memory_method"),
        peak_rss_increase_mb=lat.get("peak_rss_increase_mb"),
        extra={k: v for k, v in lat.items()
               if k not in ("samples_ms", "memory_mb", "peak_rss_increase_mb", "latency_batch")})
    if backend.name == "host":   # the host backend's accuracy pass uses the signature runner
        row.extra["signature_runner"] = info.signature[0] if info.signature else None
    if y is not None:
        row.top1 = float(np.mean(out.argmax(1) == y))
        if info.num_classes > 5:
            row.top5 = _topk(out, y, 5)
    return row


def print_benchmark_table(models, x, y=None, *, out_dir=None, progress=False, **kwargs):
    """Run ``benchmark_models`` on ``(x, y)`` on the host, print the Markdown table, return the result.

    ``kwargs`` go to ``benchmark_models`` (``reference``, ``num_runs``,
    ``op_resolver``...).
    """
    result = benchmark_models(models, (x, y) if y is not None else x, out_dir=out_dir,
                              progress=progress, **kwargs)
    print(result.markdown())
    return result
