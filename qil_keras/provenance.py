"""``qil_keras.provenance``: where a result came from (commit, packages, machine).

Shared by the benchmark harness (:mod:`qil_keras.harness`) and the scripts in
``bench/``, whose JSON results carry these fields.
"""

import importlib.metadata
import os
import platform

__all__ = ["PACKAGES", "git_commit", "package_versions", "machine_info"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


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
            "processor": _cpu_model(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
            "memory_total_gb": None if mem is None else round(mem / 2**20, 2),
            "python": platform.python_version(), "loadavg_at_start": load}
