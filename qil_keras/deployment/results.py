"""``qil_keras.deployment.results``: what ``benchmark_models`` returns and writes.

``ModelResult`` (one model's row: accuracy, agreement, latency statistics, size,
memory), ``BenchmarkResult`` (all rows, the reference, the backend settings and the
environment: git commit, package versions, machine), ``latency_stats``, the Markdown
table, and ``write_results`` (``results.json``, ``.csv``, ``.md`` and the
accuracy-vs-latency / accuracy-vs-size plot).
"""

import csv
import dataclasses
import datetime
import json
import os
import sys

import numpy as np

from .provenance import git_commit, machine_info, package_versions

__all__ = ["ModelResult", "BenchmarkResult", "latency_stats", "write_results"]

_KERNEL_LABELS = {"AUTO": "XNNPACK", "BUILTIN": "XNNPACK", "BUILTIN_REF": "reference",
                  "BUILTIN_WITHOUT_DEFAULT_DELEGATES": "builtin"}


def latency_stats(samples_ms):
    """``{"mean", "median", "p90", "p99", "std", "min", "max", "n"}`` of latency samples (ms).

    Percentiles use NumPy's default (linear interpolation); ``std`` is the
    population standard deviation.
    """
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.size == 0:
        raise ValueError("No latency samples.")
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    return {"mean": float(s.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99),
            "std": float(s.std()), "min": float(s.min()), "max": float(s.max()), "n": int(s.size)}




@dataclasses.dataclass
class ModelResult:
    """One model's row. Accuracies and agreement are fractions in [0, 1].

    ``top5`` is None when the model has 5 classes or fewer, ``top1``/``top5``
    when no labels were given. Latency fields are in milliseconds at
    ``latency_batch``; ``latency_n`` counts the samples behind them (invokes
    on the host; ``benchmark_model`` runs, each an average, on Android).
    ``memory_mb`` is None where it could not be measured; ``memory_method``
    says what it is.
    """

    name: str
    path: str
    backend: str
    input_dtype: str
    num_classes: int
    num_examples: int
    op_resolver: str
    op_resolver_source: str
    size_bytes: int
    gzip_bytes: int
    top1: float = None
    top5: float = None
    is_reference: bool = False
    agreement: float = None
    max_abs_diff: float = None
    latency_mean_ms: float = None
    latency_median_ms: float = None
    latency_p90_ms: float = None
    latency_p99_ms: float = None
    latency_std_ms: float = None
    latency_min_ms: float = None
    latency_max_ms: float = None
    latency_n: int = None
    latency_batch: int = 1
    memory_mb: float = None
    memory_method: str = None
    peak_rss_increase_mb: float = None
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchmarkResult:
    """All rows, the reference model's name, the backend settings and the environment.

    ``outputs`` maps each model name to its dequantized outputs ``(N, classes)``
    (kept in memory only; not written by ``write_results``).
    """

    rows: list
    reference: str
    settings: dict
    environment: dict
    outputs: dict = dataclasses.field(default_factory=dict, repr=False)

    def row(self, name):
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No model named {name!r}; models: {[r.name for r in self.rows]}")

    def to_dict(self):
        return {"reference": self.reference, "settings": self.settings,
                "environment": self.environment, "rows": [r.to_dict() for r in self.rows]}

    def markdown(self):
        """The results as a Markdown table, with a line saying how latency was measured."""
        return _markdown(self)


def _pct(v):
    return "" if v is None else f"{100 * v:.2f} %"


def _num(v, fmt):
    return "" if v is None else format(v, fmt)


def _markdown(result):
    lines = ["| model | input | kernels | size (KB) | gzip (KB) | top-1 | top-5 | agreement | "
             "max abs diff | latency mean (ms) | median | p90 | p99 | memory (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        name = f"{r.name} (ref)" if r.is_reference else r.name
        lines.append(
            f"| {name} | {r.input_dtype} | {_KERNEL_LABELS.get(r.op_resolver, r.op_resolver)} | "
            f"{r.size_bytes / 1024:.1f} | {r.gzip_bytes / 1024:.1f} | {_pct(r.top1)} | {_pct(r.top5)} | "
            f"{_pct(r.agreement)} | {_num(r.max_abs_diff, '.3g')} | {_num(r.latency_mean_ms, '.4g')} | "
            f"{_num(r.latency_median_ms, '.4g')} | {_num(r.latency_p90_ms, '.4g')} | "
            f"{_num(r.latency_p99_ms, '.4g')} | {_num(r.memory_mb, '.1f')} |")
    s = result.settings
    n = result.rows[0].num_examples if result.rows else 0
    if s.get("backend") == "adb":
        how = (f"Android device {s.get('serial')} via benchmark_model, {s.get('num_threads')} thread(s)"
               f"{', taskset ' + s['taskset'] if s.get('taskset') else ''}; latency over "
               f"{s.get('repeats')} runs of {s.get('num_runs')} invokes (each run reports an average)")
    else:
        how = (f"host LiteRT interpreter, {s.get('num_threads')} thread(s); latency over "
               f"{s.get('num_runs')} invokes after {s.get('warmup_runs')} warm-up")
    lines.append("")
    lines.append(f"{n} examples; agreement = same arg-max as {result.reference}; {how}; batch 1.")
    return "\n".join(lines)


def _environment():
    return {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "git_commit": git_commit(),
            "packages": package_versions(), **machine_info()}




def write_results(result, out_dir):
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``accuracy_vs_latency.png``.

    The plot needs matplotlib (the ``examples``/``test`` extras); without it
    the PNG is skipped with a note on stderr. Returns ``{kind: path}``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in (
        ("json", "results.json"), ("csv", "results.csv"), ("md", "results.md"))}
    with open(paths["json"], "w") as handle:
        json.dump(result.to_dict(), handle, indent=1, default=str)
    rows = [r.to_dict() for r in result.rows]
    fields = [f.name for f in dataclasses.fields(ModelResult)]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "extra": json.dumps(row["extra"], default=str)})
    with open(paths["md"], "w") as handle:
        handle.write(result.markdown() + "\n")
    try:
        paths["png"] = _plot(result, os.path.join(out_dir, "accuracy_vs_latency.png"))
    except ImportError:
        print("[qil-keras] matplotlib is not installed: no accuracy_vs_latency.png "
              "(pip install 'qil_keras[examples]')", file=sys.stderr)
    return paths


def _plot(result, path):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    labelled = all(r.top1 is not None for r in result.rows)
    metric = "top-1 accuracy (%)" if labelled else f"agreement with {result.reference} (%)"
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (key, xlabel) in zip(axes, (("latency_median_ms", "median latency, batch 1 (ms)"),
                                        ("size_bytes", "file size (KB)"))):
        xs = []
        for r in result.rows:
            value = r.top1 if labelled else r.agreement
            xv = getattr(r, key) / (1024 if key == "size_bytes" else 1)
            xs.append(xv)
            ax.scatter([xv], [100 * value], s=30)
            ax.annotate(r.name, (xv, 100 * value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlim(0, 1.2 * max(xs) if max(xs) > 0 else 1)  # from zero: ratios read off the axis
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"accuracy vs latency ({result.settings.get('backend')})")
    axes[1].set_title("accuracy vs size")
    fig.savefig(path, dpi=120, format="png")
    fig.clear()
    return path
