"""``qil_keras.provenance``: where a result came from (commit, packages, machine).

Shared by the benchmark harness (``qil_keras.harness``) and the scripts in
``bench/``, whose JSON results carry these fields.
"""

import importlib.metadata
import os
import platform

__all__ = ["PACKAGES", "git_commit", "git_changes", "package_versions", "machine_info",
           "thread_settings"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # qil_keras/deployment/
PACKAGES = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "ai_edge_litert", "numpy",
            "matplotlib", "qil_keras")


def git_commit(root=REPO_ROOT):
    """The checked-out commit, read from ``.git`` directly (no git call); ``None`` if unknown."""
    git = os.path.join(root, ".git")
    try:
        if os.path.isfile(git):  # worktree: "gitdir: <path>"
            with open(git) as handle:
                git = os.path.join(root, handle.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as handle:
            head = handle.read().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        bases = [git]
        common = os.path.join(git, "commondir")
        if os.path.isfile(common):
            with open(common) as handle:
                bases.append(os.path.normpath(os.path.join(git, handle.read().strip())))
        for base in bases:
            path = os.path.join(base, ref)
            if os.path.isfile(path):
                with open(path) as handle:
                    return handle.read().strip()
            packed = os.path.join(base, "packed-refs")
            if os.path.isfile(packed):
                with open(packed) as handle:
                    for line in handle:
                        if line.rstrip().endswith(" " + ref):
                            return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def git_changes(root=REPO_ROOT, exclude=("bench/results",), code=("qil_keras/", "bench/")):
    """Files with uncommitted changes (``git status --porcelain``), outside ``exclude`` (a
    benchmark's own results files change while it runs): tracked files, and untracked Python
    files under ``code`` (a new benchmark script or module that ran without being committed,
    listed as ``"<path> (untracked)"``); ``None`` when git cannot tell."""
    import subprocess

    spec = ["."] + [f":(exclude){path}" for path in exclude]
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                              *spec], cwd=root, capture_output=True, text=True, timeout=30,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    changes = []
    for line in out.stdout.splitlines():
        status, path = line[:2], line[3:]
        if status != "??":
            changes.append(path)
        elif path.endswith(".py") and path.startswith(code):
            changes.append(f"{path} (untracked)")
    return changes


def thread_settings():
    """TensorFlow's intra-/inter-op thread counts (0: TensorFlow decides) and the thread
    variables of the environment."""
    settings = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                                                      "TF_NUM_INTEROP_THREADS")}
    try:
        import tensorflow as tf

        settings["tf_intra_op"] = tf.config.threading.get_intra_op_parallelism_threads()
        settings["tf_inter_op"] = tf.config.threading.get_inter_op_parallelism_threads()
    except ImportError:  # pragma: no cover - TensorFlow is a dependency
        pass
    return settings


def package_versions(names=PACKAGES):
    """Installed versions of ``names`` (``None`` where missing)."""
    versions = {}
    for name in names:
        for candidate in (name, name.replace("_", "-")):
            try:
                versions[name] = importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def _meminfo_kb(field):
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


_CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd",
              "sve")


def _cpuinfo(field):
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model():
    return _cpuinfo("model name") or platform.processor() or None


def _cpu_flags():
    """The vector-instruction flags of ``/proc/cpuinfo`` that decide kernel speed."""
    flags = _cpuinfo("flags") or _cpuinfo("Features")
    return None if flags is None else [f for f in _CPU_FLAGS if f in flags.split()]


def machine_info():
    """Platform, CPU model and count, memory, Python, load average."""
    mem = _meminfo_kb("MemTotal")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": _cpu_model(), "cpu_flags": _cpu_flags(), "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity,
            "memory_total_gb": None if mem is None else round(mem / 2**20, 2),
            "python": platform.python_version(), "loadavg_at_start": load}
