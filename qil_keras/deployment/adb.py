"""``qil_keras.adb``: on-device accuracy and latency on an Android phone over adb.

``AdbBackend`` is a backend for ``qil_keras.harness.benchmark_models``.
It runs LiteRT's own ``benchmark_model`` binary (a build for the phone's ABI
that you supply, see ``tflite/README.md``) on the phone:

1. checks ``adb`` (on ``PATH`` or ``adb=``) and picks the device
   (``adb devices``; ``serial=`` when several are attached);
2. pushes the binary into ``remote_dir`` (a folder of its own under
   ``/data/local/tmp``, removed at the end, also after an error), makes it
   executable and checks that it runs on the phone;
3. accuracy: pushes each model and each batch of the evaluation inputs as a
   raw little-endian file of the input tensor's type, and runs
   ``benchmark_model --graph=M --input_layer=NAME --input_layer_shape=B,H,W,C
   --input_layer_value_files=NAME:FILE --output_filepath=OUT --num_runs=1
   --warmup_runs=0``; ``OUT`` holds the raw bytes of the output tensor after
   the last run (``OutputSaver`` in LiteRT's ``benchmark_tflite_model.cc``:
   each output tensor's bytes, concatenated), which are pulled back and
   dequantized on the host; a file whose size is not batch × classes ×
   item size is an error;
4. latency: ``repeats`` separate runs at batch 1 (optionally under
   ``taskset MASK`` to pin big cores), each with ``num_runs`` invokes after
   ``warmup_runs``, ``--num_threads`` and ``--use_xnnpack``.
   ``benchmark_model`` prints only averages (``Inference timings in us: ...
   Inference (avg): W``), so the harness's mean, median, p90 and p99 are over
   the ``repeats`` run averages, not over single invokes.
   ``--report_peak_memory_footprint=true`` adds the tool's "Overall peak memory
   footprint (MB) via periodic monitoring" line (whole process), reported as
   memory.

``--min_secs=0 --warmup_min_secs=0`` are passed so that the run counts are
exact (by default the tool keeps running for at least 1 s and 0.5 s).

Reference: ``tflite/tools/benchmark/README.md``, ``benchmark_model.cc`` and
``benchmark_tflite_model.cc`` in google-ai-edge/LiteRT.
"""

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from .harness import dequantize_output, quantize_input

__all__ = ["AdbBackend", "AdbError", "parse_benchmark_output"]

_NUM = r"[-+]?(?:nan|inf|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_TIMINGS = re.compile(r"inference timings in us:(?P<body>[^\n]*)", re.IGNORECASE)
_FIELD = re.compile(rf"(?P<key>[A-Za-z][A-Za-z ()]*?)\s*:\s*(?P<value>{_NUM})", re.IGNORECASE)
_FIELDS = {"init": "init_us", "first inference": "first_inference_us",
           "warmup (avg)": "warmup_avg_us", "warmup": "warmup_avg_us",
           "inference (avg)": "inference_avg_us", "inference": "inference_avg_us"}
_PEAK = re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring:\s*(?P<mb>{_NUM})")
_FOOTPRINT = re.compile(rf"(?:Memory footprint delta from the start of the tool|Peak memory footprint)"
                        rf" \(MB\):\s*init=(?P<init>{_NUM})\s+overall=(?P<overall>{_NUM})")
_RC_MARK = "__QIL_RC="
_ABI_HINT = ("Use a benchmark_model built for the phone's ABI (android_aarch64 for 64-bit ARM phones; "
             "`adb shell getprop ro.product.cpu.abi` tells): see tflite/README.md.")


class AdbError(RuntimeError):
    """adb, the device or benchmark_model did not do what the harness needs (the message says why)."""


def _number(text):
    value = float(text)
    return None if np.isnan(value) else value


def parse_benchmark_output(text):
    """The numbers ``benchmark_model`` prints, as a dict.

    Keys: ``init_us``, ``first_inference_us``, ``warmup_avg_us``,
    ``inference_avg_us`` (from the last ``Inference timings in us: Init: X,
    First inference: Y, Warmup (avg): Z, Inference (avg): W`` line; fields may
    be missing, in another order, in scientific notation such as
    ``2.95034e+06``, or in the older ``Average inference timings in us:
    Warmup: Z, Init: X, Inference: W`` form), ``peak_memory_mb`` (from
    ``--report_peak_memory_footprint``'s "Overall peak memory footprint (MB)
    via periodic monitoring" line) and ``footprint_init_mb`` /
    ``footprint_overall_mb`` (the "Memory footprint delta" line, "Peak memory
    footprint (MB): init= overall=" in older versions); None when absent.

    Raises:
      ValueError: no timings line, with the end of the output.
    """
    matches = list(_TIMINGS.finditer(text))
    if not matches:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise ValueError(f"benchmark_model printed no 'Inference timings in us' line; its output ends "
                         f"with:\n{tail}")
    parsed = dict.fromkeys(("init_us", "first_inference_us", "warmup_avg_us", "inference_avg_us",
                            "peak_memory_mb", "footprint_init_mb", "footprint_overall_mb"))
    for field in _FIELD.finditer(matches[-1].group("body")):
        key = _FIELDS.get(" ".join(field.group("key").lower().split()))
        if key is not None:
            parsed[key] = _number(field.group("value"))
    peaks = list(_PEAK.finditer(text))
    if peaks:
        parsed["peak_memory_mb"] = _number(peaks[-1].group("mb"))
    footprints = list(_FOOTPRINT.finditer(text))
    if footprints:
        parsed["footprint_init_mb"] = _number(footprints[-1].group("init"))
        parsed["footprint_overall_mb"] = _number(footprints[-1].group("overall"))
    return parsed


def _parse_devices(text):
    """``[(serial, state)]`` from ``adb devices`` output."""
    devices = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("*") or line.lower().startswith("list of devices"):
            continue
        parts = line.split()
        if len(parts) >= 2:
            devices.append((parts[0], parts[1]))
    return devices


class AdbBackend:
    """Run models on an Android device with LiteRT's ``benchmark_model`` (see the module doc).

    Args:
      serial: the device (``adb -s``); needed when several are attached.
      benchmark_binary: local path of ``benchmark_model`` built for the phone.
      adb: the adb executable (a name looked up on ``PATH``, or a path).
      remote_dir: folder on the device for everything pushed; it must be a
        sub-folder of ``/data/local/tmp`` and is deleted at the end.
      taskset: CPU mask for the latency runs (``"f0"``: cores 4-7, often the
        big cores; masks vary by phone), or None.
      num_threads: ``--num_threads``.
      use_xnnpack: ``--use_xnnpack`` for models whose kernel choice is
        ``AUTO``/``BUILTIN``; models that ask for
        ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` run with ``--use_xnnpack=false``.
      num_runs, warmup_runs: invokes per latency run, and untimed ones before.
      repeats: separate latency runs; each prints one average, and the
        latency statistics are over these averages.
      report_peak_memory: pass ``--report_peak_memory_footprint=true``.
      timeout: seconds allowed for each adb call.
    """

    name = "adb"

    def __init__(self, serial=None, benchmark_binary=None, adb="adb", remote_dir="/data/local/tmp/qil_keras",
                 taskset=None, num_threads=1, use_xnnpack=True, num_runs=50, warmup_runs=5, repeats=5,
                 report_peak_memory=True, timeout=600):
        if benchmark_binary is None:
            raise ValueError("AdbBackend needs benchmark_binary= (--benchmark-binary): the path of LiteRT's "
                             "benchmark_model built for the phone (android_aarch64); see tflite/README.md.")
        remote = posixpath.normpath("/" + str(remote_dir).strip("/"))
        if not remote.startswith("/data/local/tmp/"):
            raise ValueError(f"remote_dir={remote_dir!r} must be a folder of its own under /data/local/tmp "
                             "(it is deleted at the end), e.g. /data/local/tmp/qil_keras.")
        if taskset is not None and not re.fullmatch(r"(0x)?[0-9a-fA-F]+", str(taskset)):
            raise ValueError(f"taskset={taskset!r} is not a hexadecimal CPU mask such as 'f0'.")
        if min(num_runs, repeats, num_threads) < 1 or warmup_runs < 0:
            raise ValueError("num_runs, repeats and num_threads must be >= 1, warmup_runs >= 0.")
        self.serial = serial
        self.benchmark_binary = os.fspath(benchmark_binary)
        self.adb = adb
        self.remote_dir = remote
        self.taskset = None if taskset is None else str(taskset)
        self.num_threads = int(num_threads)
        self.use_xnnpack = bool(use_xnnpack)
        self.num_runs = int(num_runs)
        self.warmup_runs = int(warmup_runs)
        self.repeats = int(repeats)
        self.report_peak_memory = bool(report_peak_memory)
        self.timeout = timeout
        self._adb_path = None
        self._device = None
        self._local = None
        self._pushed = {}

    # -- context: connect, push the binary, clean up ------------------------------------------

    def __enter__(self):
        if not os.path.isfile(self.benchmark_binary):
            raise FileNotFoundError(f"benchmark_binary {self.benchmark_binary!r} does not exist; see "
                                    "tflite/README.md for where to get benchmark_model for android_aarch64.")
        self._adb_path = self._find_adb()
        self._device = self._select_device()
        self._local = tempfile.TemporaryDirectory(prefix="qil_keras_adb_")
        self._pushed = {}
        try:
            self._shell(f"rm -rf {self._q(self.remote_dir)} && mkdir -p {self._q(self.remote_dir)}",
                        what="create the remote folder")
            self._push(self.benchmark_binary, self._remote_binary)
            self._shell(f"chmod 755 {self._q(self._remote_binary)}", what="make benchmark_model executable")
            self._check_executable()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc):
        self._cleanup()
        return False

    def _cleanup(self):
        try:
            if self._device is not None:
                try:
                    rc, out = self._shell(f"rm -rf {self._q(self.remote_dir)}", check=False)
                except (AdbError, OSError) as error:  # keep the error that brought us here
                    rc, out = -1, str(error)
                if rc != 0:
                    print(f"[qil-keras] could not remove {self.remote_dir} on {self._device}: {out.strip()}",
                          file=sys.stderr)
        finally:
            if self._local is not None:
                self._local.cleanup()
                self._local = None

    @property
    def _remote_binary(self):
        return f"{self.remote_dir}/benchmark_model"

    def describe(self):
        return {"backend": "adb", "serial": self._device or self.serial,
                "benchmark_binary": self.benchmark_binary, "remote_dir": self.remote_dir,
                "taskset": self.taskset, "num_threads": self.num_threads, "use_xnnpack": self.use_xnnpack,
                "num_runs": self.num_runs, "warmup_runs": self.warmup_runs, "repeats": self.repeats,
                "latency_batch": 1,
                "latency_method": f"'Inference (avg)' of {self.repeats} separate benchmark_model runs of "
                                  f"{self.num_runs} invokes (after {self.warmup_runs} warm-up) each; "
                                  "mean/median/p90/p99 are over these run averages",
                "memory_method": "benchmark_model --report_peak_memory_footprint: 'Overall peak memory "
                                 "footprint (MB) via periodic monitoring' (whole tool process, max over "
                                 "runs)"}

    # -- adb plumbing --------------------------------------------------------------------------

    @staticmethod
    def _q(text):
        return shlex.quote(str(text))

    def _find_adb(self):
        found = shutil.which(self.adb)
        if found is None:
            raise AdbError(
                f"adb not found (looked for {self.adb!r} on PATH). Install Android SDK platform-tools "
                "(https://developer.android.com/tools/releases/platform-tools) and put adb on PATH, or pass "
                "adb='/path/to/adb' (--adb).")
        return found

    def _run(self, args, device=True):
        command = [self._adb_path, *(["-s", self._device] if device else []), *args]
        try:
            return subprocess.run(command, capture_output=True, text=True, errors="replace",
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired as error:
            raise AdbError(f"`{' '.join(command)}` did not finish within {self.timeout} s.") from error

    def _select_device(self):
        proc = self._run(["devices"], device=False)
        if proc.returncode != 0:
            raise AdbError(f"`adb devices` failed (exit code {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
        devices = _parse_devices(proc.stdout)
        listing = ", ".join(f"{s} ({state})" for s, state in devices)
        if self.serial is not None:
            states = dict(devices)
            if self.serial not in states:
                raise AdbError(f"Device {self.serial!r} is not attached; `adb devices` lists: "
                               f"{listing or 'none'}.")
            serial = self.serial
        elif not devices:
            raise AdbError("No Android device is attached (`adb devices` lists none). Connect the phone "
                           "by USB with USB debugging enabled, accept the authorization prompt, and check "
                           "with `adb devices`.")
        elif len(devices) > 1:
            raise AdbError(f"Several devices are attached: {listing}. Choose one with serial=... "
                           f"(--serial), e.g. --serial {devices[0][0]}.")
        else:
            serial = devices[0][0]
        state = dict(devices)[serial]
        if state == "unauthorized":
            raise AdbError(f"Device {serial} is unauthorized: unlock the phone and accept the 'Allow USB "
                           "debugging' prompt, then retry.")
        if state != "device":
            raise AdbError(f"Device {serial} is {state}: reconnect it (or run `adb kill-server`) until "
                           "`adb devices` shows it as 'device'.")
        return serial

    def _shell(self, command, check=True, what=None):
        """Run ``command`` in the device shell: ``(exit code, stdout+stderr)``.

        The exit code is echoed by the device shell itself, so it is right with
        adb versions that do not forward it.
        """
        proc = self._run(["shell", f"( {command} ) 2>&1; echo {_RC_MARK}$?"])
        out = proc.stdout
        mark = out.rfind(_RC_MARK)
        if mark >= 0:
            rc = int(re.match(r"\d+", out[mark + len(_RC_MARK):]).group(0))
            out = out[:mark]
        else:  # the device shell did not get to the echo
            rc = proc.returncode if proc.returncode != 0 else 255
        out += proc.stderr
        if check and rc != 0:
            raise AdbError(f"Could not {what or 'run a command'} on {self._device} (exit code {rc}): "
                           f"`{command}`\n{out.strip()}")
        return rc, out

    def _push(self, local, remote):
        proc = self._run(["push", os.fspath(local), remote])
        if proc.returncode != 0:
            raise AdbError(f"`adb push {local} {remote}` failed: {(proc.stderr or proc.stdout).strip()}")

    def _pull(self, remote, local):
        proc = self._run(["pull", remote, os.fspath(local)])
        if proc.returncode != 0 or not os.path.isfile(local):
            raise AdbError(f"`adb pull {remote}` failed: {(proc.stderr or proc.stdout).strip()}")

    def _check_executable(self):
        rc, out = self._shell(f"{self._q(self._remote_binary)} --help", check=False)
        if "--graph" not in out:
            first = out.strip().splitlines()[0] if out.strip() else "(no output)"
            raise AdbError(
                f"benchmark_model {self.benchmark_binary!r} is not executable on {self._device} "
                f"(exit code {rc}: {first}). {_ABI_HINT}")

    # -- models ------------------------------------------------------------------------------

    def _remote_model(self, info):
        if info.path not in self._pushed:
            remote = f"{self.remote_dir}/model_{len(self._pushed)}.tflite"
            self._push(info.path, remote)
            self._pushed[info.path] = remote
        return self._pushed[info.path]

    def _xnnpack(self, info):
        if info.op_resolver == "BUILTIN_REF":
            raise ValueError(f"Model {info.name}: benchmark_model has no reference-kernel option "
                             "(BUILTIN_REF); use op_resolver='BUILTIN_WITHOUT_DEFAULT_DELEGATES' or 'AUTO'.")
        if info.op_resolver == "BUILTIN_WITHOUT_DEFAULT_DELEGATES":
            return "false"
        return "true" if self.use_xnnpack else "false"

    def _command(self, info, remote_input, shape, extra):
        name = info.input["name"]
        if not name or "," in name:  # benchmark_model only warns when the name differs
            name = "input"
        flags = [f"--graph={self._remote_model(info)}", f"--input_layer={name}",
                 f"--input_layer_shape={','.join(str(int(s)) for s in shape)}",
                 f"--input_layer_value_files={name.replace(':', '::')}:{remote_input}",
                 f"--num_threads={self.num_threads}", f"--use_xnnpack={self._xnnpack(info)}",
                 "--min_secs=0", "--warmup_min_secs=0", *extra]
        return " ".join(self._q(part) for part in [self._remote_binary, *flags])

    def _write_input(self, x, info, filename):
        data = quantize_input(x, info.input)
        data = data.astype(data.dtype.newbyteorder("<"), copy=False)
        local = os.path.join(self._local.name, filename)
        with open(local, "wb") as handle:
            handle.write(data.tobytes())
        remote = f"{self.remote_dir}/{filename}"
        self._push(local, remote)
        return remote

    def outputs(self, info, x, batch_size, progress=False):
        """Dequantized outputs ``(N, classes)`` computed on the device, batch by batch."""
        from .harness import _batches, _padded, _progress

        out_sig = info.output["shape_signature"]
        if any(s < 0 for s in out_sig[1:]):
            raise AdbError(f"Model {info.name}: output shape {out_sig} has unknown dimensions besides the "
                           "batch; the output file size cannot be checked.")
        out_dtype = np.dtype(info.output["dtype"]).newbyteorder("<")
        remote_out = f"{self.remote_dir}/output.bin"
        local_out = os.path.join(self._local.name, "output.bin")
        fixed = info.input["shape_signature"][0]
        steps = list(_batches(len(x), batch_size, info.dynamic_batch, fixed))
        results = []
        for start, stop, run_batch in _progress(steps, progress, desc=f"{info.name} on {self._device}"):
            remote_in = self._write_input(_padded(x[start:stop], run_batch), info, "input.bin")
            shape = [run_batch, *x.shape[1:]]
            command = self._command(info, remote_in, shape, [f"--output_filepath={remote_out}",
                                                             "--num_runs=1", "--warmup_runs=0"])
            rc, text = self._shell(f"rm -f {self._q(remote_out)}; {command}", check=False)
            if rc != 0:
                raise AdbError(f"benchmark_model failed on {self._device} for {info.name} (exit code {rc}):"
                               f"\n{_tail(text)}")
            if os.path.exists(local_out):
                os.remove(local_out)
            self._pull(remote_out, local_out)
            shape_out = [run_batch, *out_sig[1:]]
            expected = int(np.prod(shape_out)) * out_dtype.itemsize
            got = os.path.getsize(local_out)
            if got != expected:
                raise AdbError(
                    f"benchmark_model wrote {got} bytes to --output_filepath for {info.name}, expected "
                    f"{expected} bytes (output shape {tuple(shape_out)} x {out_dtype.itemsize} byte(s) "
                    f"of {out_dtype.name}). Check that the binary supports --output_filepath and that "
                    "the model has a single output.")
            raw = np.fromfile(local_out, dtype=out_dtype).reshape(shape_out)[: stop - start]
            results.append(dequantize_output(raw, info.output))
        return np.concatenate(results).reshape(len(x), -1)

    def latency(self, info, x1, progress=False):
        """Batch-1 latency from ``repeats`` benchmark_model runs (see the class doc)."""
        from .harness import _padded, _progress

        batch = 1 if info.dynamic_batch else info.input["shape_signature"][0]
        remote_in = self._write_input(_padded(x1, batch), info, "input_latency.bin")
        extra = [f"--num_runs={self.num_runs}", f"--warmup_runs={self.warmup_runs}"]
        if self.report_peak_memory:
            extra.append("--report_peak_memory_footprint=true")
        command = self._command(info, remote_in, [batch, *x1.shape[1:]], extra)
        if self.taskset:
            command = f"taskset {self._q(self.taskset)} {command}"
        runs = []
        for _ in _progress(range(self.repeats), progress, desc=f"{info.name} latency on {self._device}"):
            rc, text = self._shell(command, check=False)
            if rc != 0:
                raise AdbError(f"benchmark_model failed on {self._device} for {info.name} (exit code {rc}):"
                               f"\n{_tail(text)}")
            try:
                runs.append(parse_benchmark_output(text))
            except ValueError as error:
                raise AdbError(f"{info.name}: {error}") from None
        averages = [r["inference_avg_us"] / 1e3 for r in runs if r["inference_avg_us"] is not None]
        if len(averages) != len(runs):
            raise AdbError(f"{info.name}: benchmark_model printed no 'Inference (avg)' value.")
        peaks = [r["peak_memory_mb"] for r in runs if r["peak_memory_mb"] is not None]

        def mean_ms(key):
            values = [r[key] for r in runs if r[key] is not None]
            return float(np.mean(values)) / 1e3 if values else None

        return {"samples_ms": averages, "latency_batch": int(batch),
                "memory_mb": max(peaks) if peaks else None,
                "run_averages_ms": averages, "init_ms": mean_ms("init_us"),
                "first_inference_ms": mean_ms("first_inference_us"),
                "warmup_avg_ms": mean_ms("warmup_avg_us")}


def _tail(text, lines=12):
    return "\n".join(text.strip().splitlines()[-lines:])
