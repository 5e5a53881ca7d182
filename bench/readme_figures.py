"""README and docs figures rendered from the committed benchmark results (issue #17, item 5).

``README.md`` and the pages in ``docs/`` hold blocks between ``<!-- figures:NAME -->`` and
``<!-- /figures:NAME -->``; each block's text is what :data:`RENDERERS` ``[NAME]`` renders from
``bench/results/*.json``, so a figure in it is a committed measurement and nothing else.
``python bench/readme_figures.py`` rewrites the blocks; ``--check`` exits with status 1, naming
the blocks that differ (the test ``tests/test_readme_figures.py`` does the same check). Reads
JSON only: no TensorFlow.
"""

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
README = os.path.join(ROOT, "README.md")


def pages():
    """The files that may hold figure blocks: the README and every docs page."""
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"(<!-- figures:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)",
                   re.S)


def _load(name):
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        return json.load(f)


def _source(name, data):
    """The line naming where a block's figures come from: the commits of the runs that wrote
    the rows the file holds now (a run that added none, or whose rows later runs replaced, is
    left out), and the latest of those runs."""
    runs = list(data.get("runs") or []) + [data.get("run", {})]
    writer = {}
    for index, run in enumerate(runs):
        for key in run.get("rows_added") or ():
            writer[key] = index
    if any(key not in writer for key in data.get("rows") or ()):
        writers = runs  # a row no run claims: name every run
    else:
        writers = [runs[i] for i in sorted(set(writer[key] for key in data["rows"]))] or runs
    commits = []
    for run in writers:
        commit = (run.get("git_commit") or "unknown")[:7]
        if commit not in commits:
            commits.append(commit)
    last = writers[-1]
    return (f"Rendered by `bench/readme_figures.py` from `bench/results/{name}.json` "
            f"(rows from runs at commit(s) {', '.join(f'`{c}`' for c in commits)}; latest "
            f"started {last.get('started_utc', 'unknown')}, command "
            f"`{last.get('command', 'unknown')}`).")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_batchnorm():
    """Per BatchNorm arm and optimizer: rows meeting both targets, the largest
    training-minus-inference gap, the worst change from E to 3E epochs."""
    data = _load("batchnorm")
    groups = {}
    for key, row in data["rows"].items():
        if key.startswith("float/"):
            continue
        s, l = row["short"], row["long"]
        gaps = [100 * (m["train_training_mode"] - m["train_inference"]) for m in (s, l)]
        longer = 100 * (l["test"] - s["test"])
        ok = max(abs(g) for g in gaps) <= 1.0 + 1e-9 and longer >= -1.0 - 1e-9
        group = groups.setdefault((row["arm"], row["optimizer"]), [])
        group.append((ok, max(gaps, key=abs), longer, 100 * l["test"]))
    cfg = data["settings"]
    expected = (len(cfg["datasets"]) * len(cfg["archs"]) * len(cfg["bits"]))
    rows = []
    for (arm, optimizer), group in sorted(groups.items()):
        rows.append([f"`{arm}`", optimizer, f"{sum(g[0] for g in group)} of {len(group)}"
                     + ("" if len(group) == expected else f" (of {expected} planned)"),
                     f"{max((g[1] for g in group), key=abs):+.2f}",
                     f"{min(g[2] for g in group):+.2f}",
                     f"{sum(g[3] for g in group) / len(group):.2f}"])
    return "\n".join([
        _table(["BatchNorm", "optimizer", "rows meeting both targets",
                "largest train−inf gap, points", "worst 3E−E, points", "mean test top-1 at 3E, %"],
               rows), "",
        f"E = {cfg['epochs']}, 3E = {3 * cfg['epochs']} epochs; data sets {', '.join(cfg['datasets'])}; "
        f"architectures {', '.join(cfg['archs'])}; bits {', '.join(f'{b}/{b}' for b in cfg['bits'])}; "
        "one seed per row. Targets: |training-mode − inference-mode top-1 on training images| "
        "≤ 1 point after E and 3E epochs, and test top-1 after 3E at most 1 point below E.",
        _source("batchnorm", data)])


TRAIN_COST_LABELS = {
    "float": "float ResNet-20", "qil": "QIL 4/4 (first/last 8-bit)",
    "qil_plain_bn": "QIL 4/4, plain BatchNorm", "qil_frozen_bn": "QIL 4/4, frozen BatchNorm",
    "tfmot": "tfmot 8-bit QAT", "qil_no_wq": "ablation: no weight quantizers",
    "qil_no_aq": "ablation: no activation quantizers"}


def render_train_cost():
    """Step time of each variant over the float step (within-repeat ratios) and peak RSS."""
    data = _load("train_cost")
    s = data["summary"]
    rows = []
    for variant in s["step_s"]:
        if variant.startswith("qil_no_"):
            continue
        ratio = ("1" if variant == "float" else
                 "{median:.3f} [{q1:.3f}–{q3:.3f}]".format(**s[f"{variant}_over_float"]))
        memory = s["memory_mb"].get(variant, {}).get("peak_rss")
        rows.append([TRAIN_COST_LABELS.get(variant, variant), ratio,
                     f"{memory['median'] / 1000:.2f}" if memory else "n/a"])
    return "\n".join([
        _table(["variant", "step / float step, median [IQR]", "peak RSS, GB"], rows), "",
        "QIL / tfmot within repeats: {median:.3f} [{q1:.3f}–{q3:.3f}]; target QIL ≤ {t:.2f} × "
        "float: **{verdict}**.".format(**s["qil_over_tfmot"], t=s["targets"]["qil_over_float"],
                                      verdict="met" if s["meets_qil_target"] else "not met"),
        _site_costs(s), _source("train_cost", data)])


def _site_costs(summary):
    """One line: what one activation site costs under each quantizer, when measured."""
    if "sites_ms" not in summary:
        return ""
    sites = summary["sites_ms"]
    return ("One activation site of the step's largest shape (batch 128, 32×32×16), forward and "
            "backward, median ms: QIL quantizer {q:.2f}, tfmot 8-bit quantizer {t:.2f}, ReLU "
            "{r:.2f}; the QIL quantizer's arithmetic fused by XLA {x:.2f} (kernel by kernel in "
            "`bench/results/train_cost.md`).".format(
                q=sites["qil_activation"]["median"], t=sites["tfmot_activation"]["median"],
                r=sites["relu"]["median"], x=sites["qil_activation_xla"]["median"]))


def pct(value):
    """A share as a percentage with one decimal, ``n/a`` when not measured."""
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "n/a"


def _architecture_rows(data):
    """The quantized rows in the run's order (architectures as listed in its settings, bits
    from high to low, INT8 storage before INT4), whatever order they were added in."""
    archs = list(data["settings"]["archs"])
    storages = list(data["settings"]["storages"])
    rows = [(key, row) for key, row in data["rows"].items() if not key.startswith("float/")]
    return sorted(rows, key=lambda item: (
        archs.index(item[1]["arch"]) if item[1]["arch"] in archs else len(archs),
        -item[1]["bits"], storages.index(item[1]["storage"])
        if item[1]["storage"] in storages else len(storages)))


def render_architectures():
    """Per architecture, bits and storage: export, Keras and file top-1, agreement, latency."""
    data = _load("architectures")
    rows = []
    for key, row in _architecture_rows(data):
        float_row = data["rows"].get(f"float/{row['arch']}", {})
        rows.append([row["arch"], f"{row['bits']}/{row['bits']}", row["storage"].upper(),
                     pct(float_row.get("test_top1", row.get("float_top1"))),
                     pct(row["keras_top1"]), pct(row.get("file_top1_xnnpack")),
                     pct(row.get("agreement_xnnpack")), pct(row.get("agreement_builtin")),
                     pct(row.get("agreement_xnnpack_builtin")),
                     pct(float_row.get("ptq_agreement_xnnpack_builtin")),
                     row.get("integer_reference", "n/a"), _export_verdict(row),
                     f"{row['latency_vs_ptq_int8']:.2f}×" if row.get("latency_vs_ptq_int8")
                     else "n/a"])
    return "\n".join([
        _table(["architecture", "bits", "storage", "float %", "Keras %", "file % (XNNPACK)",
                "agreement with Keras, XNNPACK %", "agreement, builtin %",
                "file, XNNPACK vs builtin %", "PTQ int8 file, XNNPACK vs builtin %",
                "integer reference", "default export", "latency / PTQ int8"], rows), "",
        "Top-1 on 1,000 CIFAR-10 test images at 32×32; agreement: share of images where the "
        "file's top-1 equals the caller's fine-tuned Keras model's (target ≥ 99.5 %). "
        "XNNPACK vs builtin: the same file's top-1 under the two CPU kernel sets, for the QIL "
        "file and for the post-training int8 file of the same float model (the baseline).",
        _source("architectures", data)])


def _export_verdict(row):
    """``passed``, or ``refused`` with the agreement the verification measured."""
    verdict = row.get("default_export") or row.get("quantize_error") or "n/a"
    if verdict.startswith("refused"):
        found = re.search(r"on only ([0-9.]+ %)", verdict)
        return "refused" + (f" ({found.group(1)} agreement)" if found else "")
    return verdict if len(verdict) <= 40 else verdict[:37] + "..."


def render_kernel_dependence():
    """Per layer pattern and bits: the ops whose two kernel sets compute different values
    from the same inputs, and the file's top-1 agreement between the kernel sets."""
    data = _load("kernel_dependence")
    rows = []
    for row in data["rows"].values():
        ops = ", ".join(f"{d['op']} {100 * d['values'] / d['of']:.2g}"
                        for d in row["ops_differing"]) or "none"
        rows.append([row["pattern"], f"{row['bits']}/{row['bits']}",
                     "exact" if row["xnnpack_reference_exact"] else "differs",
                     pct(row["agreement_xnnpack_builtin"]), pct(row["agreement_keras_builtin"]),
                     ops])
    return "\n".join([
        _table(["pattern", "bits", "file under XNNPACK vs integer reference",
                "top-1 agreement, XNNPACK vs builtin %", "Keras vs builtin %",
                "ops whose two kernel sets differ (share of their values)"], rows), "",
        "Default files (written for XNNPACK) of the layer-coverage patterns, trained on 2,000 "
        "MNIST digits (14×14), on the test digits; each op computed with both arithmetics "
        "from the same inputs (`qil_keras.kernel_differences`).",
        _source("kernel_dependence", data)])


def render_divergence_depth():
    """Per architecture and bits: where the float32 Keras model and its integer file part, how
    near a rounding boundary, and how far the difference has spread by the last layers."""
    data = _load("divergence_depth")
    rows = []
    for row in data["rows"].values():
        tensors, first = row["tensors"], row["first"]
        later = [t["values"] / t["total"] for t in tensors[len(tensors) * 3 // 4:]]
        where = "none" if first is None else (
            f"{first['op']} (tensor {[t['layer'] for t in tensors].index(first['layer']) + 1}, "
            f"{first['values']} of {first['total']} values)")
        distance = ("n/a" if first is None or first["boundary_distance_median"] is None else
                    f"{first['boundary_distance_median']:.0e} / {first['boundary_distance_max']:.0e}")
        starts = collections.Counter()
        for t in tensors:
            starts[t["op"]] += t.get("near_boundary") or 0
        started = ", ".join(f"{op} {n}" for op, n in starts.most_common() if n) or "none"
        rows.append([row["arch"], f"{row['bits']}/{row['bits']}", where, distance, started,
                     f"{sum(1 for t in tensors if t['values'])} of {len(tensors)}",
                     f"{100 * max(later):.2g}" if later else "n/a",
                     pct(row["agreement_keras_file"]),
                     f"{row['top2_margin_steps_median']:.1f}"])
    images = sorted({row["test_images"] for row in data["rows"].values()})
    return "\n".join([
        _table(["arch", "bits", "first tensor that differs", "its differing Keras values from "
                "a rounding boundary, steps (median / largest)",
                "values that part at their own op (within 1e-4 steps of a boundary), per op",
                "tensors that differ",
                "largest share differing in the last quarter of the net, %",
                "top-1 agreement, Keras vs file %",
                "Keras top-2 logit margin, output steps (median)"], rows), "",
        f"Default files (XNNPACK arithmetic, integer reference) against the float32 Keras model "
        f"on {', '.join(map(str, images))} CIFAR-10 test images, every quantized tensor "
        "(`qil_keras.divergence_profile`); float models of the architectures benchmark, "
        "quantized and fine-tuned for one epoch on 4,096 images. "
        "Plot: `bench/results/divergence_depth.png`.",
        _source("divergence_depth", data)])


def render_headline():
    """The README's one table: INT8-storage files of the architectures benchmark."""
    data = _load("architectures")
    rows = []
    for key, row in _architecture_rows(data):
        if row.get("storage") != "int8" or "keras_top1" not in row:
            continue
        rows.append([row["arch"], f"{row['bits']}/{row['bits']}", pct(row["keras_top1"]),
                     pct(row.get("file_top1_xnnpack")),
                     f"{pct(row.get('agreement_xnnpack'))} / {pct(row.get('agreement_builtin'))}",
                     f"{row['bytes_vs_float']:.2f}×" if row.get("bytes_vs_float") else "n/a",
                     f"{row['latency_vs_ptq_int8']:.2f}×" if row.get("latency_vs_ptq_int8")
                     else "n/a", _export_verdict(row)])
    return "\n".join([
        _table(["model", "bits (W/A)", "Keras top-1 %", "file top-1 %",
                "top-1 agreement with Keras %, XNNPACK / builtin kernels", "file / float file",
                "latency / PTQ int8 file", "default export"], rows), "",
        "Keras Applications models on 32×32 CIFAR-10 images (float models trained for a few "
        "epochs only: the accuracies are low, the comparison between Keras and the file is the "
        "point), INT8 weight storage, 1,000 test images; latency: batch 1, XNNPACK, one thread, "
        "on the benchmark's CPU. The full table (INT4 storage, the agreement under each "
        "kernel set) is in docs/benchmarks.md.", _kernel_agreement_line(data),
        _source("architectures", data)])


def _kernel_agreement_line(data):
    """One line: how often the same file's top-1 agrees under XNNPACK and the builtin kernels,
    for QIL's INT8-storage files and for TFLite's own post-training int8 files."""
    qil = [row["agreement_xnnpack_builtin"] for key, row in data["rows"].items()
           if not key.startswith("float/") and row.get("storage") == "int8"
           and isinstance(row.get("agreement_xnnpack_builtin"), float)]
    ptq = [row["ptq_agreement_xnnpack_builtin"] for key, row in data["rows"].items()
           if key.startswith("float/") and "ptq_agreement_xnnpack_builtin" in row]
    if not qil or not ptq:
        return ""
    return (f"One file under the two CPU kernel sets (XNNPACK, builtin): its top-1 agrees with "
            f"itself on {pct(min(qil))}–{pct(max(qil))} % of images for these QIL files, on "
            f"{pct(min(ptq))}–{pct(max(ptq))} % for TFLite's own post-training int8 files of the "
            "same float models.")


def render_cifar_study():
    """The study's float model and its rows (final epoch, 10,000 test images): Keras and file
    top-1, the distance to the float model and from Keras to the file, the inner layers' zeros
    against the rounding-only zeros of the initial grid, and the range γ ended in."""
    data = _load("cifar_study")
    float_top1 = data["rows"].get("float", {}).get("test_top1")
    rows = []
    for key, row in data["rows"].items():
        if key == "float":
            rows.append(["float ResNet-20", row.get("epochs_logged", "n/a"),
                         f"{100 * row['test_top1']:.2f}", "", "", "", "", "", ""])
            continue
        files = [row[k] for k in ("file_top1_xnnpack", "file_top1_builtin") if k in row]
        rows.append([
            key, row.get("epochs_per_stage", "n/a"), f"{100 * row['keras_top1']:.2f}",
            f"{100 * (row['keras_top1'] - float_top1):+.2f}" if float_top1 else "n/a",
            f"{100 * row['file_top1_xnnpack']:.2f}" if "file_top1_xnnpack" in row else "n/a",
            f"{100 * row['file_top1_builtin']:.2f}" if "file_top1_builtin" in row else "n/a",
            (f"{100 * max(abs(f - row['keras_top1']) for f in files):.2f}" if files
             else "no file" if "export_error" in row or row.get("converts") is False else "n/a"),
            _zeros_cell(row), _gamma_cell(row)])
    return "\n".join([
        _table(["row", "epochs (per stage)", "Keras top-1 %", "vs float, points",
                "file, XNNPACK %", "file, builtin %", "largest file − Keras, points",
                "zeros of inner layers %: initial grid → learned", "γ at the end"], rows),
        "", "Targets (issue #17): 4/4 within 0.5 points of float, 3/3 within 1.0, 2/2 within "
        "3.0; every file within 0.2 points of its Keras model."] + _superseded(data)
        + [_source("cifar_study", data)])


def _superseded(data):
    """One line per reason: the rows run again, each with its earlier Keras top-1 and commit."""
    by_reason = {}
    for key, entries in data.get("superseded", {}).items():
        for entry in entries:
            by_reason.setdefault(entry["reason"], []).append(
                f"{key} {100 * entry['row']['keras_top1']:.2f} % (`{(entry['commit'] or '?')[:7]}`)")
    return [f"Superseded (kept in the JSON under `superseded`): {', '.join(rows)}; {reason}."
            for reason, rows in by_reason.items()]


def _seeds(rows, name, value=lambda row: row["keras_top1"]):
    """``{seed: value}`` of a study row's finished seeds (keys ``name/seedN``)."""
    found = {}
    for key, row in rows.items():
        if key.split("/")[0] == name and "keras_top1" in row:
            try:
                found[key.split("/seed")[1]] = value(row)
            except (KeyError, IndexError):   # a row written before it recorded this value
                pass
    return found


def _stage_top1(index):
    return lambda row: row["stage_keras_top1"][index]


def _gap(values, reference):
    """Differences in points, paired by seed (a single-model reference, e.g. the float model,
    pairs with every seed); ``None`` when either side has not run."""
    if reference is None:
        return None
    if isinstance(reference, float):
        return [100 * (v - reference) for v in values.values()] or None
    return [100 * (values[s] - reference[s]) for s in values if s in reference] or None


def _mean_text(gaps):
    if len(gaps) == 1:
        return f"{gaps[0]:+.2f} (one seed)"
    return f"{statistics.mean(gaps):+.2f} ± {statistics.stdev(gaps):.2f} (n={len(gaps)})"


def _study_claims(rows):
    """The paper's claims and the issue's targets, each checked on the study's rows: claim,
    paper's figure, ours, criterion, verdict (on the mean over seeds; ``pending`` names the rows
    that have not run)."""
    top1 = {name: _seeds(rows, name) for name in
            ("qil_direct_4", "qil_direct_3", "qil_direct_2", "qil_frozen_2", "qil_direct_2_long",
             "tfmot_4", "tfmot_2", "float_finetune")}
    top1["prog_3"] = _seeds(rows, "qil_progressive", _stage_top1(1))
    top1["prog_2"] = _seeds(rows, "qil_progressive", _stage_top1(2))
    float_top1 = rows.get("float", {}).get("test_top1")
    names = {"float": "float", "qil_direct_4": "direct 4/4", "qil_direct_3": "direct 3/3",
             "qil_direct_2": "direct 2/2", "qil_frozen_2": "frozen 2/2", "prog_3": "prog 3/3",
             "prog_2": "prog 2/2", "qil_direct_2_long": "direct 2/2 (chain's epochs)",
             "tfmot_2": "tfmot 2/2", "tfmot_4": "tfmot 4/4"}
    pairs = [
        ("4/4 keeps full-precision accuracy", "70.1 vs 70.2 float (−0.1)", "qil_direct_4",
         "float", -0.5),
        ("3/3 close to full precision (direct)", "69.2 vs 70.2 (−1.0)", "qil_direct_3", "float",
         -1.0),
        ("3/3 close to full precision (progressive 4/4 → 3/3)", "69.2 vs 70.2 (−1.0)", "prog_3",
         "float", -1.0),
        ("2/2 small loss (direct)", "65.7 vs 70.2 (−4.5)", "qil_direct_2", "float", -3.0),
        ("2/2 small loss (progressive 4/4 → 3/3 → 2/2)", "65.7 vs 70.2 (−4.5)", "prog_2", "float",
         -3.0),
        ("progressive beats direct at 3/3", "+0.2 to +0.5", "prog_3", "qil_direct_3", 0.0),
        ("progressive beats direct at 2/2 by a clear margin", "+9.7", "prog_2", "qil_direct_2",
         1.0),
        ("… and not by its extra epochs alone", "(no control in the paper)", "prog_2",
         "qil_direct_2_long", 0.0),
        ("learned intervals beat frozen ones (2/2)", "(the method's premise; no frozen arm in "
         "the paper)", "qil_direct_2", "qil_frozen_2", 0.0),
        ("QIL ahead of calibrated tfmot at 2/2", "(not in the paper)", "qil_direct_2", "tfmot_2",
         0.0),
        ("QIL ahead of calibrated tfmot at 4/4", "(not in the paper)", "qil_direct_4", "tfmot_4",
         0.0),
    ]
    out = []
    for claim, paper, row, reference, threshold in pairs:
        criterion = f"{names[row]} − {names[reference]} ≥ {threshold:+.1f}"
        gaps = _gap(top1[row], float_top1 if reference == "float" else top1[reference])
        if gaps is None:
            missing = [names[n] for n in (row, reference)
                       if not (float_top1 if n == "float" else top1[n])]
            out.append([claim, paper, "", criterion, "pending: " + ", ".join(missing)])
            continue
        verdict = "met" if statistics.mean(gaps) >= threshold - 1e-9 else "missed"
        out.append([claim, paper, _mean_text(gaps), criterion, verdict])
    out += _study_weight_claims(rows)
    return out


def _study_weight_claims(rows):
    """γ's final values and whether it moved; pruning learned against the rounding-only zeros
    of the initial grid; every file within 0.2 points of its Keras model."""
    out = []
    gammas = {bits: [g for key, row in rows.items() if key.startswith(f"qil_direct_{bits}/")
                     for g in row.get("gamma_final", {}).values()] for bits in (4, 3, 2)}
    if all(gammas.values()):
        moved = {b: sum(abs(g - 1.0) > 0.01 for g in v) for b, v in gammas.items()}
        out.append(["trainable γ: does it move from 1?", "γ helps at 2/2 (+0.9, AlexNet), ≈ 0 "
                    "at 3/3", "; ".join(f"{b}/{b}: {min(v):.3f}–{max(v):.3f}, {moved[b]} of "
                                         f"{len(v)} layers moved > 1 %"
                                         for b, v in gammas.items()),
                    "reported (no γ = 1 arm)", "moved at " + ", ".join(
                        f"{b}/{b}" for b in gammas if moved[b]) if any(moved.values())
                    else "did not move"])
    else:
        missing = ", ".join(f"direct {b}/{b}" for b, v in gammas.items() if not v)
        out.append(["trainable γ: does it move from 1?", "γ helps at 2/2 (+0.9, AlexNet), ≈ 0 "
                    "at 3/3", "", "reported (no γ = 1 arm)", f"pending: {missing}"])
    zeros = {}
    for bits in (4, 3, 2):
        found = [row for key, row in rows.items() if key.startswith(f"qil_direct_{bits}/")
                 and "zeros_final" in row]
        if found:
            initial = [statistics.mean(_inner(r["zeros_initial_grid"])) for r in found]
            final = [statistics.mean(_inner(r["zeros_final"])) for r in found]
            zeros[bits] = (100 * statistics.mean(initial), 100 * statistics.mean(final))
    if len(zeros) == 3:
        learned = {b: f - i for b, (i, f) in zeros.items()}
        out.append(["pruning is learned, beyond the initial grid's rounding",
                    "2/2: ~81 % of ResNet-18 weights zero (~91 % AlexNet)",
                    "; ".join(f"{b}/{b}: {i:.1f} → {f:.1f} % ({f - i:+.1f})"
                              for b, (i, f) in zeros.items()),
                    "learned − initial-grid zeros > 0 at every bit width (inner layers)",
                    "met" if min(learned.values()) > 0 else "missed"])
        order = [zeros[b][1] for b in (4, 3, 2)]
        out.append(["pruning ratio grows as bits shrink", "(the paper's Figure 4 trend)",
                    " < ".join(f"{z:.1f}" for z in order) + " % (4/4, 3/3, 2/2)",
                    "learned zeros 4/4 < 3/3 < 2/2",
                    "met" if order[0] < order[1] < order[2] else "missed"])
    else:
        missing = ", ".join(f"direct {b}/{b}" for b in (4, 3, 2) if b not in zeros)
        out.append(["pruning is learned, beyond the initial grid's rounding",
                    "2/2: ~81 % of ResNet-18 weights zero (~91 % AlexNet)", "",
                    "learned − initial-grid zeros > 0 at every bit width (inner layers)",
                    f"pending: {missing}"])
        out.append(["pruning ratio grows as bits shrink", "(the paper's Figure 4 trend)", "",
                    "learned zeros 4/4 < 3/3 < 2/2", f"pending: {missing}"])
    gaps = [100 * abs(row[k] - row["keras_top1"]) for key, row in rows.items() if key != "float"
            for k in ("file_top1_xnnpack", "file_top1_builtin") if k in row]
    if gaps:
        out.append(["the file keeps the Keras model's accuracy", "(not in the paper)",
                    f"largest file − Keras gap {max(gaps):.2f} points, {len(gaps)} files",
                    "every file within 0.2 points", "met" if max(gaps) <= 0.2 + 1e-9
                    else "missed"])
    return out


def render_cifar_claims():
    """The paper's claims, rebuilt from the converged study's rows (issue #17, item 4)."""
    data = _load("cifar_study")
    rows = data["rows"]
    lines = [_table(["claim", "paper (ImageNet ResNet-18 unless stated)",
                     "ours, top-1 points (mean ± std over seeds)", "criterion", "verdict"],
                    _study_claims(rows)), ""]
    finetune = _seeds(rows, "float_finetune")
    if finetune and "float" in rows:
        lines.append(f"Control for the extra training: the float model fine-tuned for the rows' "
                     f"epochs the same way scores {_mean_text(_gap(finetune, rows['float']['test_top1']))} "
                     "points against the float model every row starts from.")
    lines += ["Every row starts from the same float model (one training run, so its own seed "
              "variance is not sampled: the seeds vary the fine-tuning only, and a gap to the "
              "float model carries that model's single draw). Differences between two QIL rows "
              "are paired by seed.", _source("cifar_study", data)]
    return "\n".join(lines)


def _inner(values):
    """The values of the inner layers (the first and last weight layers stay at 8 bits)."""
    names = list(values)
    return [values[name] for name in names[1:-1]]


def _zeros_cell(row):
    if "zeros_initial_grid" not in row or "zeros_final" not in row:
        return ""
    initial, final = _inner(row["zeros_initial_grid"]), _inner(row["zeros_final"])
    return (f"{100 * sum(initial) / len(initial):.1f} → {100 * sum(final) / len(final):.1f}")


def _gamma_cell(row):
    gammas = list(row.get("gamma_final", {}).values())
    return f"{min(gammas):.3f}–{max(gammas):.3f}" if gammas else ""


def render_deploy_cost():
    """Per network: QIL 2/2 file size against float, its gzip, and host latency against PTQ
    int8 (XNNPACK, one thread)."""
    data = _load("deploy_cost")
    summary, targets = data["summary"], data["summary"]["targets"]
    nets = list(summary["nets"])
    lines = [("QIL 2/2 `int4` file / float file (target ≤ {:.2f})".format(
                 targets["qil2_int4_bytes_over_float"]),
              lambda n: n["files"]["qil_2w2a_int4"]["bytes_over_float"],
              targets["qil2_int4_bytes_over_float"]),
             ("its gzip / float raw bytes (target ≤ {:.2f})".format(
                 targets["qil2_int4_gzip_over_float_raw"]),
              lambda n: n["files"]["qil_2w2a_int4"]["gzip_over_float_raw"],
              targets["qil2_int4_gzip_over_float_raw"]),
             ("QIL 2/2 `int8` latency / PTQ int8 (XNNPACK, 1 thread; target ≤ {:.2f})".format(
                 targets["qil2_int8_latency_over_ptq_xnnpack_1t"]),
              lambda n: n["latency"]["t1/XNNPACK"]["qil_2w2a_int8"]["over_ptq_int8"],
              targets["qil2_int8_latency_over_ptq_xnnpack_1t"]),
             ("PTQ int8 / float latency (XNNPACK, 1 thread)",
              lambda n: n["latency"]["t1/XNNPACK"]["ptq_int8"]["over_float"], None),
             ("QIL 2/2 `int4` latency / PTQ int8 (XNNPACK, 1 thread)",
              lambda n: n["latency"]["t1/XNNPACK"]["qil_2w2a_int4"]["over_ptq_int8"], None)]
    rows = []
    for label, get, target in lines:
        cells = []
        for net in nets:
            value = get(summary["nets"][net])
            verdict = "" if target is None else (", met" if value <= target else ", **not met**")
            cells.append(f"{value:.3f}{verdict}")
        rows.append([label] + cells)
    return "\n".join([_table([""] + nets, rows), "", _source("deploy_cost", data)])


def _interval_contrasts(rows):
    """Per data set and bits: the learned arm's test top-1 minus each other arm's, paired by
    seed (one seed sets the data order and the calibration batch of every arm), mean ± sample
    std; and how far the learned intervals moved: the median relative change of the upper
    threshold ``c + d``, and the lower threshold ``c - d`` as a share of the upper one at the end
    (0 at the start: every interval starts at ``c = d``)."""
    runs = {}
    for key, row in rows.items():
        if not key.startswith("float/"):
            runs.setdefault((key.split("/")[0], row["bits"]), {})[(row["arm"], row["seed"])] = row
    table = []
    for (dataset, bits), arms in sorted(runs.items()):
        seeds = sorted(seed for arm, seed in arms if arm == "learned")
        cells = []
        for other in ("frozen", "clip_only"):
            diff = [100 * (arms[("learned", s)]["test_top1"] - arms[(other, s)]["test_top1"])
                    for s in seeds if (other, s) in arms]
            mean = sum(diff) / len(diff)
            std = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1)) ** 0.5
            cells.append(f"{mean:+.2f} ± {std:.2f}")
        moved, lower = [], []
        for s in seeds:
            row = arms[("learned", s)]
            for name, (low0, high0) in row["thresholds_initial"].items():
                low1, high1 = row["thresholds_final"][name]
                moved.append(100 * abs(high1 - high0) / high0)
                lower.append(100 * low1 / high1)
        table.append([dataset, f"{bits}/{bits}", len(seeds)] + cells
                     + [f"{statistics.median(moved):.1f}",
                        f"{statistics.median(lower):.1f} [{max(lower):.1f}]"])
    return table


def render_intervals():
    """Per data set, bits and arm: test top-1 over seeds, the training-minus-inference gap,
    interval variables left without gradient; and the learned arm's pruning of the inner
    layers against the zeros its initial grid gives by rounding alone."""
    data = _load("intervals")
    cfg = data["settings"]
    groups = {}
    for key, row in data["rows"].items():
        if key.startswith("float/"):
            continue
        groups.setdefault((key.split("/")[0], row["bits"], row["arm"]), []).append(row)
    rows, pruning = [], []
    for (dataset, bits, arm), group in sorted(groups.items()):
        acc = [100 * r["test_top1"] for r in group]
        mean = sum(acc) / len(acc)
        std = (sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5 if len(acc) > 1 else 0.0
        gap = sum(100 * (r["train_top1_training_mode"] - r["train_top1_inference"])
                  for r in group) / len(group)
        dead = sum(sum(1 for g in r["interval_grad_abs"].values() if g == 0.0) for r in group)
        seeds = f"{len(group)}" + ("" if len(group) == len(cfg["seeds"])
                                  else f" (of {len(cfg['seeds'])})")
        rows.append([dataset, f"{bits}/{bits}", f"`{arm}`", seeds, f"{mean:.2f} ± {std:.2f}",
                     f"{gap:+.2f}", dead])
        if arm == "learned":
            layers = list(group[0]["zeros_initial"])[1:-1]  # first and last layers are 8-bit
            initial = [100 * group[0]["zeros_initial"][layer] for layer in layers]
            final = [sum(100 * r["zeros_final"][layer] for r in group) / len(group)
                     for layer in layers]
            pruning.append([dataset, f"{bits}/{bits}", len(layers),
                            f"{sum(initial) / len(initial):.1f}",
                            f"{sum(final) / len(final):.1f}",
                            f"{min(f - i for f, i in zip(final, initial)):+.1f} to "
                            f"{max(f - i for f, i in zip(final, initial)):+.1f}"])
    floats = ", ".join(f"{k.split('/')[1]} {100 * v['test_top1']:.2f} %"
                       for k, v in data["rows"].items() if k.startswith("float/"))
    return "\n".join([
        _table(["data", "bits", "intervals", "seeds", "test top-1 %, mean ± std",
                "train−inf, points", "intervals without gradient"], rows), "",
        _table(["data", "bits", "seed pairs", "learned − frozen, points",
                "learned − clip-only, points", "upper threshold moved, % (median)",
                "lower threshold / upper at the end, % (median [max])"],
               _interval_contrasts(data["rows"])), "",
        f"{cfg['epochs']} epochs of fine-tuning, Adam {cfg['lr']}, batch {cfg['batch']}; float "
        f"models {floats}; CIFAR-10 rows use {cfg['cifar_train']:,} training and "
        f"{cfg['cifar_test']:,} test images. `learned`: QIL; `frozen`: intervals fixed at their "
        "initial values; `clip_only`: lower threshold fixed at 0.", "",
        _table(["data", "bits", "inner layers", "zeros of the initial grid, %",
                "zeros after learning, % (mean over seeds)", "change per layer, points"], pruning),
        "", _source("intervals", data)])


def render_width_floor():
    """The weight width's floor against the width as before: the study's first epoch at 2/2
    (training and validation top-1, layers pruned to all zeros) and the intervals benchmark's
    learned arm with and without it."""
    data = _load("width_floor")
    rows = data["rows"]
    study = [r for k, r in rows.items() if k.startswith("study/")]
    lines = [_table(["intervals", "steps", "training top-1 %", "validation top-1 %",
                     "layers pruned to all zeros"],
                    [[r["arm"].replace("|", "\\|"), r["steps"], f"{100 * r['train_top1']:.1f}",
                      f"{100 * r['val_top1']:.1f}", ", ".join(r["fully_pruned"]) or "none"]
                     for r in study])]
    old = next((r for r in study if r["arm"] == "old width"), None)
    if old and old["fully_pruned"] and len(old["trace"]) > 2:
        # the traced layer's (step, lower threshold, width): two points before the collapse,
        # the first after it
        (s0, _, d0), (s1, _, d1) = old["trace"][:2]
        after = next((t for t in old["trace"] if t[1] > 10 * old["trace"][0][2]), None)
        lines.append(f"\nWith the old width, `layer3_2_conv2`'s width was {d0:.4f} at step {s0} "
                     f"and {d1:.4f} at step {s1}"
                     + (f"; at step {after[0]} it was {after[2]:.2f} and its lower threshold "
                        f"{after[1]:.2f}, above every weight (the layer pruned to all zeros)"
                        if after else "") + ".")
    inner = {}
    for key, r in rows.items():
        if key.startswith("intervals/"):
            inner.setdefault((r["data"], r["bits"]), {})[r["width"]] = r["test_top1"]
    if inner:
        lines += ["", _table(["`bench/intervals.py`, learned arm, seed 0", "test top-1 %, old "
                              "width", "test top-1 %, floor at \\|c\\|/16"],
                             [[f"{d} {b}/{b}", f"{100 * v.get('old width', float('nan')):.2f}",
                               f"{100 * v.get('floor |c|/16', float('nan')):.2f}"]
                              for (d, b), v in sorted(inner.items())])]
    lines += ["", _source("width_floor", data)]
    return "\n".join(lines)


def render_first_layer_bits():
    """The study's ResNet-20 with the first conv's weights at 8 (default) and 4 bits: accuracy,
    the file under each kernel set, their top-1 agreement, the ops whose kernel sets differ."""
    data = _load("first_layer_bits")
    cfg = data["settings"]
    rows = []
    for row in data["rows"].values():
        ops = ", ".join(dict.fromkeys(name for _, name, *_ in row["kernel_differences"]))
        rows.append([f"{row['bits']}/{row['bits']}", row["first_bits"],
                     f"{100 * row['keras_top1']:.2f}", f"{100 * row['file_top1_xnnpack']:.2f}",
                     f"{100 * row['file_top1_builtin']:.2f}",
                     f"{100 * row['agreement_xnnpack_builtin']:.2f}", ops or "none"])
    study = _load("cifar_study")["rows"]
    spreads = []
    for bits in sorted({row["bits"] for row in data["rows"].values()}):
        seeds = [r["keras_top1"] for k, r in study.items() if k.startswith(f"qil_direct_{bits}/")]
        if len(seeds) > 1:
            spreads.append(f"{100 * (max(seeds) - min(seeds)):.2f} at {bits}/{bits}")
    spread = (f"; the study's direct rows differ between seeds by {', '.join(spreads)} points"
              if spreads else "")
    return "\n".join([
        _table(["bits", "first conv weight bits", "Keras top-1 %", "file top-1 %, XNNPACK",
                "file top-1 %, builtin", "top-1 agreement XNNPACK vs builtin %",
                "ops whose kernel sets differ"], rows), "",
        f"The CIFAR-10 study's float ResNet-20 fine-tuned {cfg['epochs']} epoch(s) per row, one "
        f"seed ({cfg['seed']}{spread}), {cfg['test_images']:,} test images, default export "
        "(INT8 storage, written for XNNPACK).", "", _first_conv_study_line(study), "",
        _source("first_layer_bits", data)])


def _first_conv_study_line(study):
    """The recipe at the study's budget: its ``qil_direct_2_conv1_4`` rows against
    ``qil_direct_2``, paired by seed (Keras top-1), and each side's largest difference between
    its file's top-1 under the two kernel sets."""
    four, eight = _seeds(study, "qil_direct_2_conv1_4"), _seeds(study, "qil_direct_2")
    gaps = _gap(four, eight)
    epochs = next((r["epochs_per_stage"] for k, r in study.items()
                   if k.startswith("qil_direct_2/")), "n/a")
    head = (f"At the study's budget ({epochs} epochs at 2/2; its `qil_direct_2_conv1_4` rows, "
            "[The converged CIFAR-10 study](benchmarks.md#the-converged-cifar-10-study)): ")
    if not gaps:
        return head + "not run yet."

    def kernel_gap(name):
        files = [abs(r["file_top1_xnnpack"] - r["file_top1_builtin"]) for k, r in study.items()
                 if k.split("/")[0] == name and "file_top1_builtin" in r]
        return f"{100 * max(files):.2f}" if files else "n/a"

    return head + (f"Keras top-1 with the first conv at 4 bits minus at 8 bits {_mean_text(gaps)} "
                   f"points, paired by seed; the largest difference between a file's top-1 under "
                   f"XNNPACK and under the builtin kernels {kernel_gap('qil_direct_2_conv1_4')} "
                   f"points (first conv at 8 bits: {kernel_gap('qil_direct_2')}).")


RENDERERS = {"kernel_dependence": render_kernel_dependence,
             "divergence_depth": render_divergence_depth, "headline": render_headline, "intervals": render_intervals, "deploy_cost": render_deploy_cost, "batchnorm": render_batchnorm, "train_cost": render_train_cost,
             "architectures": render_architectures, "cifar_study": render_cifar_study,
             "cifar_claims": render_cifar_claims, "width_floor": render_width_floor,
             "first_layer_bits": render_first_layer_bits}


def blocks(text):
    """``{name: body}`` of the figure blocks in ``text``."""
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def render(text):
    """``text`` with every figure block re-rendered; unknown block names are an error."""
    def replace(match):
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"README block {name!r} has no renderer in bench/readme_figures.py")
        return match.group(1) + RENDERERS[name]() + "\n" + match.group(4)
    return BLOCK.sub(replace, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a figure block differs from its rendering")
    args = parser.parse_args(argv)
    stale, count = [], 0
    for path in pages():
        with open(path) as f:
            text = f.read()
        new = render(text)
        old_blocks, new_blocks = blocks(text), blocks(new)
        count += len(new_blocks)
        name = os.path.relpath(path, ROOT)
        stale += [f"{name}: {block}" for block in old_blocks
                  if old_blocks[block] != new_blocks[block]]
        if not args.check and new != text:
            with open(path, "w") as f:
                f.write(new)
    if args.check:
        if stale:
            print("figures differ from bench/results: " + ", ".join(stale)
                  + ". Run: python bench/readme_figures.py", file=sys.stderr)
            return 1
        return 0
    print(f"rendered {count} figure block(s) in {len(pages())} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
