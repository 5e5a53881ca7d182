"""QIL training under ``tf.distribute`` matches a single-device run.

Three runs of ``tests/distribute_worker.py`` train the same seeded QIL model
(``qil_keras.quantize(..., 3, 3)`` of Conv-BN-ReLU x2 -> GAP -> Dense, built
and quantized under ``strategy.scope()``) for 5 plain-SGD steps with
``model.fit`` on the same global batches of 32 real digits (scikit-learn's
8x8 scans, in order):

- ``single``: one device, no strategy;
- ``mirrored``: ``MirroredStrategy`` over 2 logical CPU devices in one process;
- ``multiworker``: ``MultiWorkerMirroredStrategy``, 2 processes with
  ``TF_CONFIG`` on 127.0.0.1 ports, one replica each.

Logical devices and ``TF_CONFIG`` must be set before TensorFlow initializes,
so every run is a subprocess; the four processes run concurrently, started
once per module. Each writes every model variable to an ``.npz`` file.

What is compared, and the tolerance: every variable (kernels, biases, the
intervals ``c``, ``d``, ``γ``, BatchNorm's moving statistics, ``FakeQuant8``'s
``range_min``/``range_max``/``num_updates``, the bit widths) of the
distributed runs against the single run. Integers must be equal. Floats must
agree to ``rtol=1e-5, atol=1e-6``: the only arithmetic difference is that a
gradient (or a synchronized BatchNorm moment) is the all-reduced sum of two
16-example partial sums instead of one 32-example sum, a re-association that
costs a few float32 ulps per step; measured differences are at most ~2e-7,
5x inside the tolerance, and at most 3e-4 of the change training made to the
variable. Quantizers are discontinuous, so such differences can send the runs
apart where a weight lies that close to a rounding boundary or to the pruning
or clipping threshold: here, after four equal steps, a ``conv1`` weight lay
6e-7 from its clipping threshold entering the fifth, whose updates then
differ by up to 8e-4. Every step is therefore compared, and a parting is
accepted only after ``MIN_CLEAN_STEPS`` equal steps and where the single
run's record shows such a weight (``test_distributed_run_matches_single_device``).
Training moves every trainable variable by more than 1e-5 here (the least, 1.6e-5, is a
gamma), so the comparison has teeth: with BatchNorm left
unsynchronized (replicas normalizing their own halves) the same comparison
measured differences of 1e-5 to 3e-3. FakeQuant8's EMA (decay 0.99) moves its
range too little in 5 steps for this comparison to judge its aggregation, so a
dedicated probe (``fakequant8_probe`` in the worker) gives the replicas batches
with very different ranges and checks the distributed range against the
single-device one.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distribute_worker.py")
TIMEOUT_S = 240  # for all four processes together
STEPS = 5
RTOL, ATOL = 1e-5, 1e-6
# Training must move every trainable variable by much more than ATOL, or the
# comparison would not show that the distributed updates happened.
MIN_TRAINING_CHANGE = 10 * ATOL  # smallest measured change: 1.6e-5 (conv0 kernel_gamma)
# Scale-free check of the same: for every float variable, the distributed
# run's total change (final - initial) equals the single run's to 1 % of the
# largest element of the change (measured: at most ~3e-4).
UPDATE_RTOL = 1e-2
# The runs may part where re-associated sums meet a discontinuity of a quantizer (see
# test_distributed_run_matches_single_device): not before this many equal steps, and only
# where a weight lies within NEAR_FACTOR x the state difference of one (the clipping threshold
# c' + d' = 3d - c, where c < d, moves by up to 4x the difference of c and d).
MIN_CLEAN_STEPS = 3
NEAR_FACTOR = 10


def _free_loopback_ports(n):
    """``n`` distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_env(tf_config=None):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    for proxy in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                  "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)  # gRPC would send 127.0.0.1 traffic through a proxy
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["TF_USE_LEGACY_KERAS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    # Four TensorFlow processes share the machine: keep each one's pools small.
    env["TF_NUM_INTRAOP_THREADS"] = "2"
    env["TF_NUM_INTEROP_THREADS"] = "2"
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


class _Run:
    def __init__(self, name, mode, out_dir, tf_config=None):
        self.name = name
        self.out = out_dir / f"{name}.npz"
        self.log = out_dir / f"{name}.log"
        self.killed = None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), mode, str(self.out)],
                stdout=log, stderr=subprocess.STDOUT, env=_child_env(tf_config),
                cwd=str(WORKER.parent), start_new_session=True)

    def stop(self, reason):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only this worker
            self.proc.wait()
            self.killed = reason

    def log_tail(self, chars=4000):
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the four processes at once, wait (bounded), return ``{name: _Run}``."""
    out_dir = tmp_path_factory.mktemp("distribute")
    ports = _free_loopback_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    started = []
    try:
        for index in (0, 1):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            started.append(_Run(f"multiworker{index}", "multiworker", out_dir, config))
        started.append(_Run("single", "single", out_dir))
        started.append(_Run("mirrored", "mirrored", out_dir))
        workers = started[:2]
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = {r.name: r.proc.poll() for r in started}
            if None not in codes.values():
                break
            if any(codes[r.name] not in (None, 0) for r in workers):
                for worker in workers:  # its peer would wait for it until the deadline
                    worker.stop("its peer worker failed")
            time.sleep(0.2)
    finally:
        for run in started:
            run.stop(f"still running after {TIMEOUT_S} s")  # no-op once finished
    return {run.name: run for run in started}


def _load(runs, name):
    run = runs[name]
    if run.proc.returncode != 0 or not run.out.exists():
        others = "".join(f"\n--- {other.name} (rc {other.proc.returncode}) ---\n"
                         f"{other.log_tail(1500)}" for other in runs.values()
                         if other is not run and other.proc.returncode != 0)
        killed = f", killed: {run.killed}" if run.killed else ""
        pytest.fail(f"{name} worker failed (rc {run.proc.returncode}{killed}):\n"
                    f"{run.log_tail()}{others}")
    with np.load(run.out) as data:
        return {key: data[key] for key in data.files}


def _variables(result, prefix="var/"):
    return {key[len(prefix):]: value for key, value in result.items() if key.startswith(prefix)}


def _assert_same_variables(distributed, single, label, prefix="var/"):
    dist_vars, single_vars = _variables(distributed, prefix), _variables(single, prefix)
    assert sorted(dist_vars) == sorted(single_vars), label
    worst = {}
    for name, expected in single_vars.items():
        actual = dist_vars[name]
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
        if np.issubdtype(expected.dtype, np.integer):
            np.testing.assert_array_equal(actual, expected, err_msg=f"{label}: {name}")
        else:
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{label}: {name}")
        worst[name] = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    return worst


def _expected_names():
    """The variables that prove every kind of state took part."""
    return {
        "trainable": ["conv0/kernel:0", "conv1/kernel_c:0", "conv1/kernel_d:0",
                      "conv1/kernel_gamma:0", "relu0_qil_act/c:0", "relu1_qil_act/d:0",
                      "logits/kernel_gamma:0", "bn0/gamma:0"],
        "updated_in_call": ["bn0/moving_mean:0", "bn1/moving_variance:0",
                            "gap_fq8/range_max:0", "gap_fq8/num_updates:0",
                            "image_fq8/num_updates:0"],
    }


def test_single_device_run_trains_every_kind_of_state(runs):
    single = _load(runs, "single")
    assert int(single["num_replicas"]) == 1
    assert int(single["iterations"]) == STEPS
    names = _variables(single)
    expected = _expected_names()
    for name in expected["trainable"] + expected["updated_in_call"]:
        assert name in names, f"{name} missing from {sorted(names)}"
    # Every trainable variable moves well beyond the comparison tolerance.
    for name, value in names.items():
        if bool(single[f"trainable/{name}"]):
            change = np.max(np.abs(value.astype(np.float64) - single[f"init/{name}"]))
            assert change > MIN_TRAINING_CHANGE, (name, change)
    for name in expected["updated_in_call"]:
        assert np.any(names[name] != single[f"init/{name}"]), name
    assert int(names["gap_fq8/num_updates:0"]) == 1 + STEPS  # calibration + 5 steps


def _parts(actual, expected):
    if np.issubdtype(expected.dtype, np.integer):
        return not np.array_equal(actual, expected)
    return not np.allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _first_parting_step(distributed, single):
    """The first training step after which some variable of the two runs differs beyond the
    tolerance (``STEPS`` if none)."""
    for k in range(STEPS):
        expected = _variables(single, f"step{k}/")
        actual = _variables(distributed, f"step{k}/")
        if any(_parts(actual[name], value) for name, value in expected.items()):
            return k
    return STEPS


@pytest.mark.parametrize("name", ["mirrored", "multiworker0", "multiworker1"])
def test_distributed_run_matches_single_device(runs, name):
    """Every variable after every step, as the module docstring says. The runs may part after
    a few steps for one reason only: they enter the step with states a few ulps apart (the
    re-associated sums) and some weight lies that close to a discontinuity of its quantizer
    (a rounding boundary, the pruning or the clipping threshold), where the same computation
    takes a different branch. That is allowed after ``MIN_CLEAN_STEPS`` equal steps, and only
    where the single run's record (``near/<k>``) shows such a weight within ``NEAR_FACTOR``
    times the state difference; a wrong aggregation parts the runs at the first step, from
    equal states."""
    single, distributed = _load(runs, "single"), _load(runs, name)
    assert int(distributed["num_replicas"]) == 2
    assert int(distributed["iterations"]) == STEPS
    for var in _variables(single, "init/"):
        np.testing.assert_array_equal(distributed[f"init/{var}"], single[f"init/{var}"],
                                      err_msg=f"{name}: initial {var}")
    parting = _first_parting_step(distributed, single)
    last = f"step{parting - 1}/"  # the last step after which the runs still agree
    if parting < STEPS:
        assert parting >= MIN_CLEAN_STEPS, (
            f"{name}: the runs part after step {parting}; fewer than {MIN_CLEAN_STEPS} equal "
            "steps (at the first step they start from the same state)")
        single_last = _variables(single, last)
        drift = max(float(np.max(np.abs(value.astype(np.float64) - single_last[var])))
                    for var, value in _variables(distributed, last).items()
                    if value.dtype.kind == "f")
        near = float(single[f"near/{parting}"])
        assert near <= NEAR_FACTOR * drift, (
            f"{name}: the runs part at step {parting} from states {drift:.2g} apart, but no "
            f"weight lies within {NEAR_FACTOR} x that of a discontinuity (nearest: {near:.2g})")
    worst = _assert_same_variables(distributed, single, name, prefix=last)
    assert max(worst.values()) <= ATOL
    for var, final in _variables(single, last).items():
        if final.dtype.kind != "f":
            continue
        step = final.astype(np.float64) - single[f"init/{var}"]
        dist_step = distributed[f"{last}{var}"].astype(np.float64) - distributed[f"init/{var}"]
        assert np.max(np.abs(dist_step - step)) <= UPDATE_RTOL * np.max(np.abs(step)), var
    if parting == STEPS:  # the whole run, the end-of-fit snap included
        worst = _assert_same_variables(distributed, single, name)
        assert max(worst.values()) <= ATOL
        np.testing.assert_allclose(distributed["loss"], single["loss"], rtol=RTOL)


def test_workers_end_identical(runs):
    chief, other = _load(runs, "multiworker0"), _load(runs, "multiworker1")
    for name, value in _variables(chief).items():
        np.testing.assert_array_equal(_variables(other)[name], value, err_msg=name)


@pytest.mark.parametrize("name", ["mirrored", "multiworker0", "multiworker1"])
def test_local_copies_of_every_variable_agree(runs, name):
    result = _load(runs, name)
    copies = 2 if name == "mirrored" else 1
    for var in _variables(result):
        assert int(result[f"num_copies/{var}"]) == copies, var
        assert float(result[f"replica_diff/{var}"]) <= ATOL, var


def test_each_replica_gets_its_half_of_the_global_batch(runs):
    """The strategies split every global batch of 32 into examples [0:16) and [16:32)."""
    mirrored = _load(runs, "mirrored")
    labels = mirrored["global_labels"]
    np.testing.assert_array_equal(mirrored["first_step_labels"], labels[:32].reshape(2, 16))
    for index in (0, 1):
        worker = _load(runs, f"multiworker{index}")
        np.testing.assert_array_equal(worker["first_step_labels"],
                                      labels[16 * index:16 * (index + 1)][None])


@pytest.mark.parametrize("name", ["mirrored", "multiworker0", "multiworker1"])
def test_fakequant8_range_is_the_global_batch_range(runs, name):
    """Replicas whose own ranges differ still track the single-device range."""
    result = _load(runs, name)
    for key in ("range_min", "range_max"):
        reference = result[f"probe_reference/{key}"]
        np.testing.assert_allclose(result[f"probe/{key}"],
                                   np.broadcast_to(reference, result[f"probe/{key}"].shape),
                                   rtol=RTOL, atol=ATOL, err_msg=key)
    np.testing.assert_array_equal(result["probe/num_updates"], 2)
    # The probe is built so that averaging per-replica ranges would be far off.
    for key in ("range_min", "range_max"):
        naive, reference = result[f"probe_naive/{key}"], result[f"probe_reference/{key}"]
        assert abs(float(naive) - float(reference)) > 0.1, (key, naive, reference)


def test_quantize_keeps_synchronized_batchnorm(runs):
    """quantize() keeps BatchNormalization(synchronized=True), which get_config() omits."""
    single = _load(runs, "single")
    assert len(single["bn_synchronized"]) == 2 and all(single["bn_synchronized"])
