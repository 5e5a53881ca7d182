"""The figure blocks of the README and the docs pages equal their rendering from
bench/results (issue #17)."""

import os
import sys

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import readme_figures  # noqa: E402


def _pages():
    texts = {}
    for path in readme_figures.pages():
        with open(path) as f:
            texts[os.path.relpath(path, REPO_ROOT)] = f.read()
    return texts


def test_every_figure_block_is_rendered_from_the_committed_results():
    found = set()
    for name, text in _pages().items():
        blocks = readme_figures.blocks(text)
        found |= set(blocks)
        rendered = readme_figures.blocks(readme_figures.render(text))
        stale = [block for block in blocks if blocks[block] != rendered[block]]
        assert not stale, (f"{name}: figures {stale} differ from bench/results; "
                           "run: python bench/readme_figures.py")
    assert set(readme_figures.RENDERERS) <= found, "a renderer has no block in any page"
    assert "headline" in readme_figures.blocks(_pages()["README.md"])
    assert readme_figures.main(["--check"]) == 0


def test_a_hand_edited_figure_is_caught():
    text = _pages()[os.path.join("docs", "benchmarks.md")]
    body = readme_figures.blocks(text)["train_cost"]
    edited = text.replace(body, body.replace("|", "| 0.999 |", 1), 1)
    assert readme_figures.blocks(edited)["train_cost"] != readme_figures.blocks(
        readme_figures.render(edited))["train_cost"]


def _interval_row(arm, seed, top1, final_thresholds):
    return {"arm": arm, "bits": 2, "seed": seed, "test_top1": top1,
            "thresholds_initial": {"conv1": [0.0, 1.0]},
            "thresholds_final": {"conv1": final_thresholds}}


def test_interval_contrasts_pair_arms_by_seed():
    rows = {"float/mnist": {"test_top1": 0.95}}
    for seed, (learned, frozen, clip_only, final) in enumerate([
            (0.90, 0.85, 0.90, [0.1, 1.1]), (0.80, 0.85, 0.70, [0.0, 0.9])]):
        rows[f"mnist/2/learned/{seed}"] = _interval_row("learned", seed, learned, final)
        rows[f"mnist/2/frozen/{seed}"] = _interval_row("frozen", seed, frozen, [0.0, 1.0])
        rows[f"mnist/2/clip_only/{seed}"] = _interval_row("clip_only", seed, clip_only, [0.0, 1.0])
    [row] = readme_figures._interval_contrasts(rows)
    # learned - frozen per seed: +5, -5 points -> mean 0, sample std sqrt(50) = 7.07;
    # learned - clip_only: 0, +10 -> mean 5, std 7.07. Upper threshold moved |1.1 - 1| and
    # |0.9 - 1| = 10 % in both seeds; lower / upper at the end: 0.1 / 1.1 = 9.09 % and 0 %,
    # median 4.5, max 9.1.
    assert row == ["mnist", "2/2", 2, "+0.00 ± 7.07", "+5.00 ± 7.07", "10.0", "4.5 [9.1]"]


def test_study_cells_leave_out_the_8_bit_edge_layers():
    row = {"zeros_initial_grid": {"conv1": 0.0, "a": 0.2, "b": 0.4, "fc": 0.0},
           "zeros_final": {"conv1": 0.5, "a": 0.3, "b": 0.5, "fc": 0.9},
           "gamma_final": {"a/kernel_gamma": 0.9, "b/kernel_gamma": 1.0}}
    # inner layers a, b: initial (20 + 40) / 2 = 30.0 %, learned (30 + 50) / 2 = 40.0 %
    assert readme_figures._zeros_cell(row) == "30.0 → 40.0"
    assert readme_figures._gamma_cell(row) == "0.900–1.000"
    assert readme_figures._zeros_cell({}) == "" and readme_figures._gamma_cell({}) == ""


def _study_row(top1, seed=0, **extra):
    return dict({"keras_top1": top1, "seed": seed}, **extra)


def test_study_claims_pair_seeds_and_name_the_rows_not_run():
    zeros = lambda inner: {"conv1": 0.0, "a": inner, "fc": 0.0}  # noqa: E731
    rows = {"float": {"test_top1": 0.90},
            "qil_direct_4/seed0": _study_row(0.897, zeros_initial_grid=zeros(0.10),
                                             zeros_final=zeros(0.12), gamma_final={"a": 0.98},
                                             file_top1_xnnpack=0.897, file_top1_builtin=0.896),
            "qil_direct_3/seed0": _study_row(0.88, zeros_initial_grid=zeros(0.20),
                                             zeros_final=zeros(0.25), gamma_final={"a": 1.0}),
            "qil_direct_2/seed0": _study_row(0.85, zeros_initial_grid=zeros(0.40),
                                             zeros_final=zeros(0.38), gamma_final={"a": 0.995}),
            "qil_direct_2/seed1": _study_row(0.87, 1),
            "qil_frozen_2/seed0": _study_row(0.84),
            "qil_frozen_2/seed1": _study_row(0.87, 1),
            "qil_progressive/seed0": _study_row(0.86, stage_keras_top1=[0.9, 0.885, 0.86])}
    claims = {row[0]: row[2:] for row in readme_figures._study_claims(rows)}
    # 4/4: 89.7 - 90.0 = -0.30 >= -0.5; direct 3/3: -2.00 < -1.0
    assert claims["4/4 keeps full-precision accuracy"][:1] == ["-0.30 (one seed)"]
    assert claims["4/4 keeps full-precision accuracy"][-1] == "met"
    assert claims["3/3 close to full precision (direct)"][-1] == "missed"
    # the chain's second stage is its 3/3 model: 88.5 - 90.0 = -1.50; against direct 3/3 +0.50
    assert claims["3/3 close to full precision (progressive 4/4 → 3/3)"][0] == "-1.50 (one seed)"
    assert claims["progressive beats direct at 3/3"][0] == "+0.50 (one seed)"
    # direct 2/2 - frozen 2/2 paired by seed: +1, 0 -> mean +0.50, std sqrt(0.5) = 0.71
    assert claims["learned intervals beat frozen ones (2/2)"] == [
        "+0.50 ± 0.71 (n=2)", "direct 2/2 − frozen 2/2 ≥ +0.0", "met"]
    # direct 2/2 against float: -5 and -3 points
    assert claims["2/2 small loss (direct)"][0] == "-4.00 ± 1.41 (n=2)"
    assert claims["QIL ahead of calibrated tfmot at 2/2"][-1] == "pending: tfmot 2/2"
    assert claims["… and not by its extra epochs alone"][-1] == \
        "pending: direct 2/2 (chain's epochs)"
    # inner layer a: 10 -> 12, 20 -> 25, 40 -> 38: 2/2 pruned less than its grid rounds to zero
    assert claims["pruning is learned, beyond the initial grid's rounding"][-1] == "missed"
    assert claims["pruning ratio grows as bits shrink"][0] == "12.0 < 25.0 < 38.0 % (4/4, 3/3, 2/2)"
    # γ: |0.98 - 1| > 1 % at 4/4 only (0.995 is within 1 %)
    assert claims["trainable γ: does it move from 1?"][-1] == "moved at 4/4"
    # files: |89.7 - 89.7| = 0, |89.6 - 89.7| = 0.10 points
    assert claims["the file keeps the Keras model's accuracy"][0] == \
        "largest file − Keras gap 0.10 points, 2 files"


def test_study_claims_without_the_float_model_are_pending():
    rows = {"qil_direct_4/seed0": _study_row(0.897)}
    claims = {row[0]: row[2:] for row in readme_figures._study_claims(rows)}
    assert claims["4/4 keeps full-precision accuracy"][-1] == "pending: float"


def test_first_conv_study_line_pairs_the_recipe_with_direct_2_by_seed():
    def row(top1, xnnpack, builtin):
        return {"keras_top1": top1, "epochs_per_stage": 15, "file_top1_xnnpack": xnnpack,
                "file_top1_builtin": builtin}
    study = {"float": {"test_top1": 0.87},
             "qil_direct_2/seed0": row(0.8000, 0.8000, 0.7962),
             "qil_direct_2/seed1": row(0.8100, 0.8100, 0.8090)}
    assert readme_figures._first_conv_study_line(study).endswith("not run yet.")
    study["qil_direct_2_conv1_4/seed0"] = row(0.7900, 0.7900, 0.7900)
    study["qil_direct_2_conv1_4/seed1"] = row(0.8050, 0.8050, 0.8049)
    line = readme_figures._first_conv_study_line(study)
    # paired gaps 79.00 - 80.00 = -1.00 and 80.50 - 81.00 = -0.50: mean -0.75, sample std
    # sqrt(((-0.25)^2 + 0.25^2) / 1) = 0.35; kernel gaps: recipe max(0, 0.01) = 0.01 points,
    # direct max(0.38, 0.10) = 0.38
    assert "15 epochs" in line
    assert "minus at 8 bits -0.75 ± 0.35 (n=2) points" in line
    assert "kernels 0.01 points (first conv at 8 bits: 0.38)" in line


def test_source_names_the_runs_that_wrote_the_rows_held_now():
    """A run that added no row (interrupted, or resumed later), or whose rows a later run
    replaced, is not named as a source of the figures; the latest run named is the last one
    that wrote a row held now. Without a record of which run added a row, every run is named."""
    def run(commit, started, added):
        return {"git_commit": commit * 40, "started_utc": started, "command": f"run {commit}",
                "rows_added": added}

    runs = [run("a", "t1", ["x", "y"]), run("b", "t2", ["y"]), run("c", "t3", []),
            run("d", "t4", [])]
    data = {"runs": runs, "run": dict(runs[-1], rows_added=None), "rows": {"x": {}, "y": {}}}
    line = readme_figures._source("study", data)
    assert "commit(s) `aaaaaaa`, `bbbbbbb`; latest started t2, command `run b`" in line, line
    data["rows"]["z"] = {}  # a row no run claims
    line = readme_figures._source("study", data)
    assert "`aaaaaaa`, `bbbbbbb`, `ccccccc`, `ddddddd`; latest started t4" in line, line
