"""Test configuration: select tf-keras and silence TensorFlow's C++ logging.

Both variables must be set before anything imports TensorFlow.
"""

import os

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ["TF_USE_LEGACY_KERAS"] = "1"


import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("QIL_DATA_DIR", os.path.join(REPO_ROOT, "..", "shared", "data"))
CIFAR10_ARCHIVE = os.path.join(SHARED_DATA, "cifar10-jpg.tar.gz")

needs_shared_data = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA), reason=f"shared data folder {SHARED_DATA} is absent"
)


@pytest.fixture(scope="session")
def cifar_cache():
    """``(archive, cache)``: the shared CIFAR-10 archive, extracted once into a cache.

    Extracting 60,000 files is slow, so, as the loader itself does, the
    extraction is kept between runs: in ``$QIL_CACHE_DIR`` when set, else in a
    per-user folder under the system temporary folder (never the home folder).
    """
    from qil_keras import datasets

    assert os.path.isfile(CIFAR10_ARCHIVE), f"{CIFAR10_ARCHIVE} is missing from the shared data"
    cache = os.environ.get("QIL_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"qil_keras-test-cache-{os.getuid() if hasattr(os, 'getuid') else 0}")
    datasets.extract_archive(CIFAR10_ARCHIVE, cache_dir=cache)
    return CIFAR10_ARCHIVE, cache
