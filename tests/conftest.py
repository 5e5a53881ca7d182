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

# `make test` runs two pytest-xdist workers with --dist loadfile, which hands out whole files
# in the order of the collection (the Makefile's --no-loadscope-reorder keeps it: xdist's own
# order, most tests first, left the long example files for last). Starting with the longest
# files (longest processing time first) lets both workers finish together. Simulated on the
# per-file times of `make test` on efc261d (2 cores, nothing else running; measured 798 s in
# xdist's order): 820 s in xdist's order, 717 s longest first, 713 s for the sum of all files'
# times halved; the clean clone of eb32377 then ran pytest in 704 s (make test 12 min 48 s, was
# 14 min 23 s). Seconds per file in the efc261d run:
LONGEST_FIRST = (
    "tests/integer/test_layer_coverage.py",        # 326
    "tests/integer/test_export.py",                # 228
    "tests/test_examples_cifar.py",                # 204
    "tests/training/test_batchnorm.py",            # 105
    "tests/test_cli.py",                           # 90
    "tests/test_examples.py",                      # 85
    "tests/integer/test_integer_reference.py",     # 57
    "tests/quantization/test_quantize.py",         # 48
    "tests/training/test_learning.py",             # 45
    "tests/training/test_progressive.py",          # 35
)


def pytest_collection_modifyitems(session, config, items):
    """The files of ``LONGEST_FIRST`` first, in that order; the others after them in collection
    order (a stable sort: tests keep their order within a file)."""
    missing = [p for p in LONGEST_FIRST if not os.path.isfile(os.path.join(REPO_ROOT, p))]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST names missing files {missing}")
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


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


def digits_cnn(momentum=0.99):
    """``(model, x, y)``: a small float conv net for scikit-learn's 8x8 digits (two 3x3 convs
    with BatchNorm and ReLU, global average pooling, a dense head; untrained, seed 0) and the
    1,797 digits in [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_digits

    from qil_keras import keras

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int32)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for filters in (8, 16):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization(momentum=momentum)(h)
        h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs), x, y
