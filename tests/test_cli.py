"""``qil-keras train`` end to end on the shared CIFAR-10 copy (one short stage)."""

import json
import os

import pytest

from conftest import needs_shared_data
from qil_keras import cli


def test_parse_stages():
    """W/A pairs parse, a lone number means W=A, garbage names the fix."""
    assert cli.parse_stages("5/5,4/4, 2/2") == [(5, 5), (4, 4), (2, 2)]
    assert cli.parse_stages("3") == [(3, 3)]
    with pytest.raises(Exception, match="W/A pairs"):
        cli.parse_stages("four")


@needs_shared_data
def test_train_runs_writes_outputs_and_resumes(cifar_cache, tmp_path, monkeypatch, capsys):
    """One float epoch and one 4/4 stage of ResNet-20 on 10 images per class."""
    archive, cache = cifar_cache
    monkeypatch.setenv("QIL_CACHE_DIR", cache)
    out = tmp_path / "run"
    argv = ["train", "--model", "resnet20", "--data", archive, "--limit-per-class", "10",
            "--stages", "4/4", "--epochs", "1", "--float-epochs", "1", "--batch-size", "25",
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4/4 [" in printed or "4/4 -" in printed  # Keras progress bar, 100 images / 25
    assert "| 4w4a | 4/4 |" in printed  # the summary table
    for name in ("summary.md", "history.json", "results.json", "log.csv", "float_log.csv",
                 "float/final.weights.h5", "checkpoints/stage_1_4w4a/final.weights.h5",
                 "checkpoints/stage_1_4w4a/history.json", "plots/weight_histograms.png",
                 "plots/activation_histograms.png", "plots/pruning_ratios.png",
                 "plots/intervals.png", "plots/pruning.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["stage"] for r in results] == ["float", "4w4a"]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in results)
    history = json.loads((out / "history.json").read_text())
    assert history["stages"] == ["4w4a"] and len(history["histories"][0]["loss"]) == 1

    # The same command again loads the float weights and the finished stage.
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "float weights:" in printed and "already done" in printed
    assert os.path.getsize(out / "summary.md") > 0
