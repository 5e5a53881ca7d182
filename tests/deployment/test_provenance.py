"""Provenance of results: whether the tree was dirty is checked with git, not assumed."""

import os
import subprocess

from qil_keras import provenance


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_git_changes_lists_modified_tracked_files_outside_results(tmp_path):
    root = str(tmp_path)
    _git(root, "init", "-q")
    os.makedirs(os.path.join(root, "bench", "results"))
    for name in ("code.py", os.path.join("bench", "results", "run.json")):
        with open(os.path.join(root, name), "w") as handle:
            handle.write("a\n")
    _git(root, "add", "-A")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert provenance.git_changes(root) == []
    with open(os.path.join(root, "bench", "results", "run.json"), "w") as handle:
        handle.write("b\n")  # a running benchmark's own results: not a change of the code
    with open(os.path.join(root, "untracked.py"), "w") as handle:
        handle.write("b\n")  # a scratch file outside the package and bench/
    assert provenance.git_changes(root) == []
    # a benchmark script that ran before it was committed is a change of the code that ran
    with open(os.path.join(root, "bench", "new_benchmark.py"), "w") as handle:
        handle.write("b\n")
    with open(os.path.join(root, "bench", "notes.txt"), "w") as handle:
        handle.write("b\n")
    assert provenance.git_changes(root) == ["bench/new_benchmark.py (untracked)"]
    os.remove(os.path.join(root, "bench", "new_benchmark.py"))
    with open(os.path.join(root, "code.py"), "w") as handle:
        handle.write("b\n")
    assert provenance.git_changes(root) == ["code.py"]


def test_git_changes_is_none_outside_a_repository(tmp_path):
    assert provenance.git_changes(str(tmp_path)) is None


def test_machine_info_records_cpu_flags_and_thread_settings():
    info = provenance.machine_info()
    if os.path.exists("/proc/cpuinfo"):  # Linux: every listed flag is one the CPU reports
        with open("/proc/cpuinfo") as handle:
            reported = {word for line in handle if line.startswith(("flags", "Features"))
                        for word in line.split(":", 1)[1].split()}
        assert info["cpu_flags"] == [f for f in provenance._CPU_FLAGS if f in reported]
    threads = provenance.thread_settings()
    assert {"OMP_NUM_THREADS", "tf_intra_op", "tf_inter_op"} <= set(threads)


def test_git_commit_reads_this_checkout():
    """The commit recorded with every benchmark result is the checked-out one (it read ``None``
    after the module moved one folder down and its repository root pointed into the package)."""
    import subprocess

    from conftest import REPO_ROOT
    from qil_keras.deployment.provenance import git_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert git_commit() == head
