"""The Android backend (qil_keras.adb) end to end, through stand-ins: no phone is attached here.

``tests/stand_ins/adb`` maps ``push``/``pull``/``shell`` onto a local folder
per device serial; ``tests/stand_ins/benchmark_model`` honours the real tool's
flags with the LiteRT Python interpreter and prints its lines. They are
installed into a temporary ``bin`` folder (first on ``PATH``) with the
shebang replaced by this interpreter, so that the stand-in tool imports
``ai_edge_litert`` from the test environment. Numbers for a real phone need a
real phone (see tflite/README.md).

The parser is also checked on ``benchmark_model`` output quoted from LiteRT /
TensorFlow documentation and public reports (sources next to each).
"""

import json
import os
import sys

import numpy as np
import pytest

from qil_keras import harness
from qil_keras.deployment.adb import AdbBackend, AdbError, parse_benchmark_output

STAND_INS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stand_ins")
SERIAL = "emulator-5554"


# ---------------------------------------------------------------------------
# The parser, on real output


def test_parse_documented_line():
    # https://www.tensorflow.org/lite/performance/measurement (LiteRT "Performance measurement",
    # Android benchmark app, as logcat shows it)
    text = ("... tflite  : Inference timings in us: Init: 5685, First inference: 18535, "
            "Warmup (avg): 14462.3, Inference (avg): 14575.2")
    assert parse_benchmark_output(text) == {
        "init_us": 5685.0, "first_inference_us": 18535.0, "warmup_avg_us": 14462.3,
        "inference_avg_us": 14575.2, "peak_memory_mb": None, "footprint_init_mb": None,
        "footprint_overall_mb": None}


def test_parse_scientific_notation():
    # https://github.com/NobuoTsukamoto/meta-tensorflow-lite/blob/f4c6491d28834322563a5ed5f8d51d5d9b0f28d7/doc/tensorflow-lite-benchmark.md
    text = """count=50 first=2990275 curr=2913402 min=2727568 max=3189954 avg=2.95034e+06 std=109798

Inference timings in us: Init: 17187, First inference: 3512391, Warmup (avg): 3.51239e+06, Inference (avg): 2.95034e+06
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Memory footprint delta from the start of the tool (MB): init=4.21094 overall=46.0859
"""
    parsed = parse_benchmark_output(text)
    assert parsed["inference_avg_us"] == 2.95034e6 and parsed["warmup_avg_us"] == 3.51239e6
    assert parsed["init_us"] == 17187 and parsed["first_inference_us"] == 3512391
    assert (parsed["footprint_init_mb"], parsed["footprint_overall_mb"]) == (4.21094, 46.0859)
    assert parsed["peak_memory_mb"] is None


def test_parse_phone_output_with_older_memory_line():
    # https://github.com/tensorflow/tensorflow/issues/42507 (adb shell on an Android phone)
    text = """Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=32891 curr=33978 min=32641 max=34005 avg=33209.4 std=450

Inference timings in us: Init: 855, First inference: 49060, Warmup (avg): 34825.1, Inference (avg): 33209.4
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Peak memory footprint (MB): init=0 overall=12.8672
"""
    parsed = parse_benchmark_output(text)
    assert parsed["inference_avg_us"] == 33209.4 and parsed["init_us"] == 855
    assert (parsed["footprint_init_mb"], parsed["footprint_overall_mb"]) == (0.0, 12.8672)


def test_parse_taskset_run_and_variants():
    # https://gist.github.com/Rexhaif/a73d899a8ae837f9a3b4cbdd5653d71d (adb shell taskset f0 ... --num_threads=1)
    gist = ("Inference timings in us: Init: 20283, First inference: 339304, Warmup (avg): 302814, "
            "Inference (avg): 266473")
    assert parse_benchmark_output(gist)["inference_avg_us"] == 266473
    # The older field order, https://github.com/google-ai-edge/LiteRT/blob/383870e03d1dca192a40cce17787eed85a534d10/tflite/tools/benchmark/README.md
    old = parse_benchmark_output(
        "Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9")
    assert (old["init_us"], old["warmup_avg_us"], old["inference_avg_us"]) == (38467, 83235, 79760.9)
    # No quoted report with the peak line was found; this one is assembled from the format string in
    # google-ai-edge/LiteRT tflite/tools/benchmark/benchmark_model.cc (commit 7d88950e):
    # "Overall peak memory footprint (MB) via periodic monitoring: " << peak_mem_mb. Numbers illustrative.
    text = ("INFO: Inference timings in us: Init: 1200, First inference: 900, Warmup (avg): 850, "
            "Inference (avg): 800\nINFO: Overall peak memory footprint (MB) via periodic monitoring: "
            "12.5\n")
    assert parse_benchmark_output(text)["peak_memory_mb"] == 12.5
    # Optional fields and a missing value stay None; the last timings line wins.
    two = "Inference timings in us: Init: 1\nInference timings in us: Inference (avg): 7e2\n"
    parsed = parse_benchmark_output(two)
    assert parsed["inference_avg_us"] == 700 and parsed["init_us"] is None
    with pytest.raises(ValueError, match="(?s)no 'Inference timings in us' line.*Failed to apply"):
        parse_benchmark_output("STARTING!\nFailed to apply XNNPACK delegate.\nBenchmarking failed.\n")


# ---------------------------------------------------------------------------
# End to end through the stand-ins


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from test_harness import make_models

    paths, (x, y) = make_models(tmp_path_factory.mktemp("adb_models"))
    return paths, (x[:200], y[:200])


def _install(source, folder):
    with open(os.path.join(STAND_INS, source)) as handle:
        body = handle.read().split("\n", 1)[1]
    path = os.path.join(folder, source)
    with open(path, "w") as handle:
        handle.write(f"#!{sys.executable}\n{body}")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def device(tmp_path, monkeypatch):
    """Stand-in adb on PATH, one attached stand-in device; the stand-in benchmark_model to push."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _install("adb", bin_dir)
    binary = _install("benchmark_model", bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("QIL_FAKE_ADB_ROOT", str(tmp_path / "devices"))
    monkeypatch.setenv("QIL_FAKE_ADB_LOG", str(tmp_path / "adb.log"))
    monkeypatch.setenv("QIL_FAKE_ADB_DEVICES", f"{SERIAL}:device")
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    monkeypatch.delenv("QIL_FAKE_BENCHMARK_TRUNCATE", raising=False)

    class Device:
        root = tmp_path / "devices"
        log = tmp_path / "adb.log"
        benchmark_binary = binary

        def remote(self, serial=SERIAL):
            return self.root / serial / "data/local/tmp/qil_keras"

        def calls(self):
            if not self.log.exists():
                return []
            return [json.loads(line) for line in self.log.read_text().splitlines()]

    return Device()


def test_on_device_outputs_match_host_and_remote_folder_is_removed(models, device):
    paths, (x, y) = models
    backend = AdbBackend(benchmark_binary=device.benchmark_binary, taskset="f0", num_runs=8,
                         warmup_runs=2, repeats=3)
    chosen = [paths["int8"], paths["float"], paths["float_meta"]]
    phone = harness.benchmark_models(chosen, (x, y), backend=backend, batch_size=64, progress=False)
    host = harness.benchmark_models(chosen, (x, y), batch_size=64, num_runs=2, progress=False)
    for name in ("int8", "float", "float_meta"):
        # Same LiteRT kernels on both sides of the stand-in: the outputs are identical.
        np.testing.assert_array_equal(phone.outputs[name], host.outputs[name])
        assert phone.row(name).top1 == host.row(name).top1
        assert np.mean(phone.outputs[name].argmax(1) == host.outputs[name].argmax(1)) == 1.0
        row = phone.row(name)
        assert row.backend == "adb" and row.latency_n == 3 and len(row.extra["run_averages_ms"]) == 3
        assert row.latency_p99_ms >= row.latency_p90_ms >= row.latency_median_ms > 0
        assert row.memory_mb > 0  # the stand-in prints the peak-memory line as the tool does
    assert phone.reference == "float" and phone.row("float").agreement == 1.0
    assert phone.settings["serial"] == SERIAL
    assert "over these run averages" in phone.settings["latency_method"]
    assert not device.remote().exists()  # rm -rf at the end

    calls = device.calls()
    argvs = [c["argv"] for c in calls if "argv" in c]
    assert all(a[:2] == ["-s", SERIAL] for a in argvs if a != ["devices"])
    assert any(a[2] == "push" and a[-1].endswith("/benchmark_model") for a in argvs if len(a) > 2)
    shells = [a[-1] for a in argvs if len(a) > 2 and a[2] == "shell"]
    batches = [s for s in shells if "--output_filepath=" in s]
    assert len(batches) == 3 * 4  # 200 examples in batches of 64: 64, 64, 64, 8
    assert all("--num_runs=1" in s and "--warmup_runs=0" in s for s in batches)
    timed = [s for s in shells if "--report_peak_memory_footprint=true" in s]
    assert len(timed) == 3 * 3 and all(s.startswith("( taskset f0 ") for s in timed)
    assert all("--input_layer_shape=1,28,28,1" in s and "--num_runs=8" in s for s in timed)
    assert [c["taskset"] for c in calls if "taskset" in c] == ["f0"] * 9
    # The model whose metadata asks for builtin kernels runs without XNNPACK on the phone too.
    meta_model = [s for s in shells if "model_2.tflite" in s]
    assert meta_model and all("--use_xnnpack=false" in s for s in meta_model)
    assert all("--use_xnnpack=true" in s for s in shells if "model_1.tflite" in s)


def test_adb_missing_from_path(models, device, tmp_path, monkeypatch):
    paths, (x, y) = models
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AdbError, match="adb not found.*platform-tools.*adb='/path/to/adb'"):
        harness.benchmark_models([paths["float"]], (x, y), progress=False,
                                 backend=AdbBackend(benchmark_binary=device.benchmark_binary))


def test_no_device(models, device, monkeypatch):
    paths, (x, y) = models
    monkeypatch.setenv("QIL_FAKE_ADB_DEVICES", "")
    with pytest.raises(AdbError, match="No Android device is attached"):
        harness.benchmark_models([paths["float"]], (x, y), progress=False,
                                 backend=AdbBackend(benchmark_binary=device.benchmark_binary))


def test_several_devices_need_a_serial(models, device, monkeypatch):
    paths, (x, y) = models
    monkeypatch.setenv("QIL_FAKE_ADB_DEVICES", f"{SERIAL}:device,R58M40ABCD:device")
    with pytest.raises(AdbError, match=f"Several devices.*{SERIAL}.*R58M40ABCD.*--serial"):
        harness.benchmark_models([paths["float"]], (x, y), progress=False,
                                 backend=AdbBackend(benchmark_binary=device.benchmark_binary))
    backend = AdbBackend(serial="R58M40ABCD", benchmark_binary=device.benchmark_binary, num_runs=2,
                         warmup_runs=0, repeats=1)
    row = harness.benchmark_models([paths["float"]], (x[:30], y[:30]), backend=backend,
                                   progress=False).rows[0]
    assert row.top1 is not None and row.latency_n == 1
    argvs = [c["argv"] for c in device.calls() if "argv" in c and c["argv"][0] == "-s"]
    assert argvs and all(a[1] == "R58M40ABCD" for a in argvs)
    assert (device.root / "R58M40ABCD").is_dir() and not device.remote("R58M40ABCD").exists()
    assert not (device.root / SERIAL).exists()


def test_unauthorized_or_unknown_device(models, device, monkeypatch):
    paths, (x, y) = models
    monkeypatch.setenv("QIL_FAKE_ADB_DEVICES", "R58M40ABCD:unauthorized")
    with pytest.raises(AdbError, match="R58M40ABCD is unauthorized.*Allow USB debugging"):
        harness.benchmark_models([paths["float"]], (x, y), progress=False,
                                 backend=AdbBackend(benchmark_binary=device.benchmark_binary))
    with pytest.raises(AdbError, match="'XYZ' is not attached.*R58M40ABCD \\(unauthorized\\)"):
        harness.benchmark_models([paths["float"]], (x, y), progress=False,
                                 backend=AdbBackend(serial="XYZ", benchmark_binary=device.benchmark_binary))


def test_binary_not_executable_on_the_device(models, device, tmp_path):
    paths, (x, y) = models
    # An ELF header for another machine (e_machine 0xB7 = AArch64, 64-bit, little-endian) with
    # nothing behind it: the device shell refuses to run it, as a phone refuses an x86 build.
    wrong = tmp_path / "benchmark_model_linux_x86"
    wrong.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + b"\xb7\x00" + bytes(44))
    with pytest.raises(AdbError, match="benchmark_model_linux_x86.* is not executable on "
                                       f"{SERIAL}.*android_aarch64"):
        harness.benchmark_models([paths["float"]], (x, y), progress=False,
                                 backend=AdbBackend(benchmark_binary=str(wrong)))
    assert not device.remote().exists()  # cleaned up after the error too


def test_output_file_size_mismatch(models, device, monkeypatch):
    paths, (x, y) = models
    monkeypatch.setenv("QIL_FAKE_BENCHMARK_TRUNCATE", "1")  # the stand-in writes half the bytes
    # 20 float32 examples x 10 classes = 800 bytes expected; the stand-in writes 400.
    with pytest.raises(AdbError, match=r"wrote 400 bytes .* expected 800 bytes \(output shape \(20, 10\)"):
        harness.benchmark_models([paths["float"]], (x[:20], y[:20]), batch_size=32, progress=False,
                                 backend=AdbBackend(benchmark_binary=device.benchmark_binary))
    assert not device.remote().exists()


def test_backend_arguments_are_checked(device, models):
    paths, (x, y) = models
    with pytest.raises(ValueError, match="needs benchmark_binary="):
        AdbBackend()
    with pytest.raises(ValueError, match="folder of its own under /data/local/tmp"):
        AdbBackend(benchmark_binary=device.benchmark_binary, remote_dir="/data/local/tmp")
    with pytest.raises(ValueError, match="folder of its own under /data/local/tmp"):
        AdbBackend(benchmark_binary=device.benchmark_binary, remote_dir="/data/local/tmp/../..")
    with pytest.raises(ValueError, match="not a hexadecimal CPU mask"):
        AdbBackend(benchmark_binary=device.benchmark_binary, taskset="big")
    with pytest.raises(ValueError, match="num_threads are host settings: set them on the AdbBackend"):
        harness.benchmark_models([paths["float"]], (x, y), num_threads=4, progress=False,
                                 backend=AdbBackend(benchmark_binary=device.benchmark_binary))


def test_bench_command_over_adb(models, device, tmp_path, capsys):
    from test_harness import _bench

    paths, (x, y) = models
    np.savez(tmp_path / "digits.npz", x=np.round(x[:40] * 255).astype(np.uint8), y=y[:40])
    out = tmp_path / "out"
    assert _bench([paths["float_meta"], "--data", str(tmp_path / "digits.npz"), "--device", "adb",
                   "--benchmark-binary", device.benchmark_binary, "--serial", SERIAL, "--taskset", "f0",
                   "--repeats", "2", "--num-runs", "3", "--warmup-runs", "1", "--no-progress",
                   "--out", str(out)]) == 0
    assert f"Android device {SERIAL} via benchmark_model" in capsys.readouterr().out
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["backend"] == "adb" and row["latency_n"] == 2 and row["num_examples"] == 40
    assert _bench([paths["float_meta"], "--data", "mnist", "--device", "adb", "--benchmark-binary",
                   device.benchmark_binary, "--adb", "no-such-adb", "--out", str(out)]) == 1
    assert "adb not found (looked for 'no-such-adb'" in capsys.readouterr().err
