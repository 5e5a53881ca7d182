"""The MNIST examples run end to end with --quick (issue #18): each writes verified integer
files with a serving signature, and prints what its prose says it prints."""

import re

from examples_runner import run_example, signature


def test_quickstart(tmp_path):
    out = run_example("quickstart", "--out", str(tmp_path))
    assert re.search(r"QIL 2/2\s+\d+\.\d+ %", out), out[-2000:]
    for bits in ("4w4a", "2w2a"):
        for suffix in ("", "_int4"):
            inputs, outputs = signature(tmp_path / f"qil_{bits}{suffix}.tflite")
            assert inputs == ["image"] and outputs == ["logits"]  # the float model's names
    assert (tmp_path / "bench" / "results.json").is_file()
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())


def test_tfmot_path(tmp_path):
    out = run_example("tfmot_path", "--out", str(tmp_path))
    assert "tfmot-path QIL model:" in out and "top-1 agreement with Keras" in out
    inputs, outputs = signature(tmp_path / "tfmot_qil_3w3a.tflite")
    assert len(inputs) == 1 and len(outputs) == 1


def test_other_class_data():
    out = run_example("other_class_data")
    rows = dict(re.findall(r"^  (.+?)\s+(\d+\.\d+) %$", out, re.M))
    assert set(rows) == {"float", "QIL 2/2, no training", "QIL 2/2, distilled on digits 5-9"}, out
