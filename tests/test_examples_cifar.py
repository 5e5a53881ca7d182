"""The CIFAR-10 examples run end to end with --quick on the shared images (issue #18)."""

import json

from conftest import needs_shared_data
from examples_runner import run_example, signature

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


@needs_shared_data
def test_cifar10_resnet20(cifar_cache, tmp_path):
    archive, cache = cifar_cache
    run_example("cifar10_resnet20", "--data", archive, "--out", str(tmp_path), cache=cache)
    for name in ("float", "int8_ptq", "qil_4w4a", "qil_2w2a"):
        assert (tmp_path / f"{name}.tflite").is_file(), name
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert len(results["rows"]) == 4  # float, post-training int8, QIL 4/4, QIL 2/2


@needs_shared_data
def test_mobilenetv2_android(cifar_cache, tmp_path):
    archive, cache = cifar_cache
    out = run_example("mobilenetv2_android", "--data", archive, "--out", str(tmp_path),
                      cache=cache)
    path = tmp_path / "mobilenetv2_qil_8w8a.tflite"
    inputs, outputs = signature(path)
    assert len(inputs) == 1 and len(outputs) == 1
    import qil_keras

    metadata = qil_keras.read_metadata(str(path))
    assert metadata["class_names"] == CLASSES
    assert "signatures:" in out
