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
