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


def _stderr_of(code, **env):
    """stderr of a fresh interpreter running ``code`` (TensorFlow not yet imported there)."""
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k not in ("QIL_KERAS_VERBOSE",
                                                                     "TF_CPP_MIN_LOG_LEVEL")}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=300, check=True)
    return done.stderr


def _tensorflow_log_lines(text):
    # TensorFlow's C++ log lines start with a severity letter and the date field "0000".
    return [line for line in text.splitlines()
            if line[:5] in ("I0000", "W0000", "E0000") or "absl::InitializeLog" in line]


def test_tensorflow_start_up_log_is_hidden_by_default_and_shown_on_request():
    quiet = _stderr_of("import qil_keras, sys; "
                       "sys.stdout.write(qil_keras._keras.tensorflow_startup_log())")
    assert _tensorflow_log_lines(quiet) == [], quiet
    # Control: the same import with QIL_KERAS_VERBOSE=1 lets TensorFlow's lines through, so
    # the check above would see them.
    loud = _stderr_of("import qil_keras", QIL_KERAS_VERBOSE="1")
    assert _tensorflow_log_lines(loud), "TensorFlow printed no start-up log to compare with"
    # `qil-keras --verbose` replays what was captured.
    replayed = _stderr_of("import sys; from qil_keras import cli; "
                          "sys.argv = ['qil-keras', '--verbose', 'export', '--help']; cli.main()")
    assert _tensorflow_log_lines(replayed)
