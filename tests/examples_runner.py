"""Run an example script the way a reader does, and read back the files it wrote."""

import os
import subprocess
import sys

from conftest import REPO_ROOT


def run_example(name, *args, cache=None, timeout=900):
    """Run ``examples/<name>.py --quick <args>`` in a fresh interpreter; return its stdout.

    The example must exit with status 0 (an export that disagrees with its Keras model raises,
    so a wrong file fails here). stderr is shown when it does not.
    """
    env = dict(os.environ)
    if cache is not None:
        env["QIL_CACHE_DIR"] = cache
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "examples", f"{name}.py"),
                           "--quick", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def signature(path):
    """``(input names, output names)`` of the file's ``serving_default`` signature."""
    from ai_edge_litert.interpreter import Interpreter

    serving = Interpreter(model_path=str(path)).get_signature_list()["serving_default"]
    return serving["inputs"], serving["outputs"]
