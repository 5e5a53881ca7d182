"""Tests of ``qil_keras.datasets``: tfds pipelines (on tfds's mock data), the
image-folder loader on the shared CIFAR-10 JPEG archive, and on small folders
of real photographs (crops of scikit-learn's two sample images) written here.

The shared data folder is ``$QIL_DATA_DIR``, default ``<repo>/../shared/data``;
only the tests that read it are skipped when that folder does not exist.
"""

import io
import os
import tarfile

import numpy as np
import pytest

from qil_keras import datasets as qd
from qil_keras._keras import tf
from qil_keras.data.pipeline import _resize_shorter_centre_crop

from conftest import SHARED_DATA, needs_shared_data
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")



def _batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def _crop_matches(aug, padded):
    """True when ``aug`` is a 32x32 window of ``padded`` (40x40), maybe mirrored."""
    for dy in range(9):
        for dx in range(9):
            window = padded[dy:dy + 32, dx:dx + 32]
            if np.allclose(aug, window, atol=1e-5) or np.allclose(aug, window[:, ::-1], atol=1e-5):
                return True
    return False


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------

def test_preprocessing_constants_and_round_trip():
    prep = qd.CIFAR10_PREPROCESSING
    assert prep.mean == (0.4914, 0.4822, 0.4465) and prep.std == (0.2470, 0.2435, 0.2616)
    assert qd.IMAGENET_PREPROCESSING.mean == (0.485, 0.456, 0.406)
    assert qd.IMAGENET_PREPROCESSING.std == (0.229, 0.224, 0.225)
    assert qd.IMAGENET_PREPROCESSING.image_size == (224, 224)
    assert qd.IMAGENET_PREPROCESSING.resize_shorter == 256
    assert qd.CIFAR100_PREPROCESSING.mean == (0.5071, 0.4865, 0.4409)

    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 5, 5, 3)).astype(np.uint8)
    x = prep.normalize(pixels)
    expected = (pixels / 255.0 - np.array(prep.mean)) / np.array(prep.std)
    np.testing.assert_allclose(x, expected, atol=1e-5)
    np.testing.assert_allclose(prep.normalize(tf.constant(pixels)).numpy(), x, atol=1e-6)
    np.testing.assert_allclose(pixels * np.array(prep.scale) + np.array(prep.offset), x, atol=1e-5)
    np.testing.assert_allclose(prep.denormalize(x), pixels, atol=1e-3)

    d = prep.to_dict()
    import json
    assert qd.Preprocessing.from_dict(json.loads(json.dumps(d))) == prep
    with pytest.raises(ValueError, match="std must be positive"):
        qd.Preprocessing("bad", mean=0.5, std=0.0)


# --------------------------------------------------------------------------
# tfds (mock data: nothing is downloaded)
# --------------------------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


def test_load_tfds_cifar10_mock_shapes_and_eval_determinism():
    with tfds.testing.mock_data(num_examples=20):
        ds, info = qd.load_tfds("cifar10", "test", batch_size=8, training=False)
        x, y = _batches(ds)
        x2, _ = _batches(ds)
        raw = np.stack([im for im, _ in tfds.builder("cifar10").as_dataset(
            split="test", as_supervised=True).as_numpy_iterator()])
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.float32
    assert y.dtype == np.int32 and y.min() >= 0 and y.max() < 10
    assert [b for b in ds.element_spec[0].shape] == [None, 32, 32, 3]
    assert info.class_names == CIFAR10_CLASSES and info.num_classes == 10
    assert info.num_examples == 20 and info.steps(8) == 3
    assert info.preprocessing == qd.CIFAR10_PREPROCESSING
    assert not info.augment
    np.testing.assert_array_equal(x, x2)  # evaluation is deterministic
    np.testing.assert_allclose(x, qd.CIFAR10_PREPROCESSING.normalize(raw), atol=1e-5)


def test_load_tfds_cifar10_mock_training_augments():
    with tfds.testing.mock_data(num_examples=16):
        raw = np.stack([im for im, _ in tfds.builder("cifar10").as_dataset(
            split="train", as_supervised=True).as_numpy_iterator()])
        ordered = dict(batch_size=16, training=True, shuffle=False, seed=3)
        xa, _ = _batches(qd.load_tfds("cifar10", "train", **ordered)[0])
        xb, _ = _batches(qd.load_tfds("cifar10", "train", **ordered)[0])
        ds, info = qd.load_tfds("cifar10", "train", batch_size=4, training=True, seed=3,
                                drop_remainder=True)
        epoch1, y1 = _batches(ds)
        epoch2, _ = _batches(ds)
    assert info.augment and info.training
    assert ds.element_spec[0].shape.as_list() == [4, 32, 32, 3]
    assert epoch1.shape == (16, 32, 32, 3) and set(y1) <= set(range(10))
    assert not np.allclose(epoch1, epoch2)  # new shuffle and augmentation each epoch
    np.testing.assert_array_equal(xa, xb)  # one seed, one result
    plain = qd.CIFAR10_PREPROCESSING.normalize(raw)
    assert not np.allclose(xa, plain)  # augmentation is applied in training ...
    padded = qd.CIFAR10_PREPROCESSING.normalize(np.pad(raw, [(0, 0), (4, 4), (4, 4), (0, 0)]))
    for aug, pad in zip(xa, padded):  # ... and is a padded crop, maybe mirrored
        assert _crop_matches(aug, pad)


def test_load_tfds_options_mock():
    with tfds.testing.mock_data(num_examples=4):
        ds, info = qd.load_tfds("cifar100", "train", batch_size=None, training=False,
                                normalization=None)
        x = np.stack([im.numpy() for im, _ in ds])
    assert x.shape == (4, 32, 32, 3) and x.min() >= 0.0 and x.max() <= 1.0
    assert info.num_classes == 100 and info.preprocessing.mean == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="style"):
        qd.load_tfds("mnist", "train", batch_size=2, training=False)


def test_load_tfds_imagenet2012_mock():
    with tfds.testing.mock_data(num_examples=4):
        for training in (True, False):
            ds, info = qd.load_tfds("imagenet2012", "validation", batch_size=2, training=training,
                                    image_size=64, seed=0)
            x, y = _batches(ds)
            assert x.shape == (4, 64, 64, 3) and y.dtype == np.int32 and y.max() < 1000
            assert info.num_classes == 1000 and info.augment == training
            assert info.preprocessing.mean == qd.IMAGENET_PREPROCESSING.mean
            assert info.preprocessing.resize_shorter == 73  # round(64 * 256 / 224)


def test_imagenet_eval_geometry():
    """Shorter side to 256·S/224, then the centre S×S: a column ramp keeps its centre value."""
    ramp = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3))  # 100 x 200
    out = _resize_shorter_centre_crop(tf.constant(ramp), 37, (32, 32)).numpy()
    assert out.shape == (32, 32, 3)
    resized = tf.image.resize(ramp.astype(np.float32), (37, 74), antialias=True).numpy()
    np.testing.assert_allclose(out, resized[2:34, 21:53], atol=1e-4)
    assert abs(out.mean() - 99.5) < 1.0


def test_load_tfds_not_prepared_says_where_and_how(tmp_path):
    with pytest.raises(qd.DataNotFoundError) as err:
        qd.load_tfds("cifar10", "train", data_dir=str(tmp_path), batch_size=8, training=True)
    message = str(err.value)
    assert str(tmp_path) in message and "TFDS_DATA_DIR" in message and "load_image_folder" in message
    with pytest.raises(qd.DataNotFoundError) as err:
        qd.load_tfds("imagenet2012", "validation", data_dir=str(tmp_path), batch_size=8, training=False)
    message = str(err.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert "manual_dir" in message and str(tmp_path) in message


def test_load_tfds_manual_dir_without_the_tars(tmp_path):
    """A manual_dir asks tfds to build imagenet2012 from it; an empty one fails with the hint."""
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(qd.DataNotFoundError) as err:
        qd.load_tfds("imagenet2012", "validation", data_dir=str(tmp_path / "tfds"),
                     manual_dir=str(manual), batch_size=8, training=False)
    message = str(err.value)
    assert "Preparing 'imagenet2012' failed" in message and "ILSVRC2012_img_val.tar" in message


# --------------------------------------------------------------------------
# the shared CIFAR-10 JPEG archive
# --------------------------------------------------------------------------

@needs_shared_data
def test_cifar10_archive_loads(cifar_cache):
    archive, cache = cifar_cache
    ds, info = qd.load_image_folder(archive, "train", style="cifar", batch_size=50,
                                    limit_per_class=20, cache_dir=cache)
    x, y = _batches(ds)
    assert info.class_names == CIFAR10_CLASSES
    assert info.num_examples == 200 and x.shape == (200, 32, 32, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), 20))  # eval: file order
    prep = info.preprocessing
    assert prep == qd.CIFAR10_PREPROCESSING
    low = (0 - max(prep.mean)) / min(prep.std)
    high = (1 - min(prep.mean)) / min(prep.std)
    assert low - 1e-4 <= x.min() and x.max() <= high + 1e-4
    assert abs(x.mean()) < 0.3 and 0.7 < x.std() < 1.3  # normalized real photos
    first = os.path.join(info.name, "airplane", "0000.jpg")
    pixels = tf.io.decode_jpeg(tf.io.read_file(first), channels=3).numpy()
    np.testing.assert_allclose(prep.denormalize(x[0]), pixels, atol=1e-3)

    # The archive is extracted once: a marker file, and the same folder again.
    root = qd.extract_archive(archive, cache_dir=cache)
    assert (root / ".qil_keras_extracted.json").is_file()
    assert os.path.dirname(info.name) == str(root)

    ds, info = qd.load_image_folder(archive, "test", style="cifar", training=True, batch_size=32,
                                    limit_per_class=5, cache_dir=cache, seed=0,
                                    class_names=info.class_names)
    x, y = _batches(ds)
    assert info.augment and x.shape == (50, 32, 32, 3) and sorted(y) == sorted(np.repeat(np.arange(10), 5))


@needs_shared_data
def test_data_file_uses_argument_or_env(monkeypatch):
    assert qd.data_file("cifar10-jpg.tar.gz", SHARED_DATA).is_file()
    monkeypatch.setenv("QIL_DATA_DIR", SHARED_DATA)
    assert qd.data_file("cifar10-jpg.tar.gz").is_file()
    monkeypatch.delenv("QIL_DATA_DIR")
    with pytest.raises(qd.DataNotFoundError, match="QIL_DATA_DIR"):
        qd.data_file("cifar10-jpg.tar.gz")


# --------------------------------------------------------------------------
# small hand-made folders of real photographs
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos():
    """Six 48x64 crops of each of scikit-learn's two sample photographs."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images  # china.jpg, flower.jpg: (427, 640, 3) uint8
    return {name: [img[r:r + 48, c:c + 64] for r, c in [(0, 0), (100, 200), (200, 400), (300, 100),
                                                          (379, 576), (150, 300)]]
            for name, img in zip(("china", "flower"), images)}


def _write_tree(root, photos, split="train"):
    """china/ as JPEG, flower/ as PNG; returns {path: pixels} for the PNGs (lossless)."""
    exact = {}
    for cls, crops in photos.items():
        folder = root / split / cls
        folder.mkdir(parents=True)
        for i, crop in enumerate(crops):
            if cls == "china":
                (folder / f"{i:02d}.jpg").write_bytes(tf.io.encode_jpeg(crop, quality=95).numpy())
            else:
                path = folder / f"{i:02d}.png"
                path.write_bytes(tf.io.encode_png(crop).numpy())
                exact[str(path)] = crop
    (root / split / "README.txt").write_text("not a class")
    return exact


def _tar(src, dest, prefix=""):
    with tarfile.open(dest, "w:gz") as tar:
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname=os.path.join(prefix, str(path.relative_to(src))), recursive=False)
    return dest


def test_image_folder_loads_png_and_jpeg(tmp_path, photos):
    exact = _write_tree(tmp_path / "data", photos)
    ds, info = qd.load_image_folder(tmp_path / "data", "train", batch_size=4, cache_dir=tmp_path / "c")
    x, y = _batches(ds)
    assert info.class_names == ("china", "flower") and info.num_examples == 12
    assert x.shape == (12, 48, 64, 3) and info.preprocessing.image_size == (48, 64)
    np.testing.assert_array_equal(y, [0] * 6 + [1] * 6)
    assert 0.0 <= x.min() and x.max() <= 1.0  # style none: pixels / 255
    np.testing.assert_allclose(x[6:] * 255.0, np.stack(list(exact.values())), atol=1e-3)
    assert np.abs(x[:6] * 255.0 - np.stack(photos["china"])).mean() < 4  # JPEG, quality 95

    ds, info = qd.load_image_folder(tmp_path / "data", "train", style="imagenet", image_size=32,
                                    batch_size=5, training=True, seed=1, limit_per_class=3,
                                    cache_dir=tmp_path / "c", cache=True)
    x, y = _batches(ds)
    assert x.shape == (6, 32, 32, 3) and info.preprocessing.resize_shorter == 37
    assert info.preprocessing.mean == qd.IMAGENET_PREPROCESSING.mean
    ds, _ = qd.load_image_folder(tmp_path / "data", "train", style="imagenet", image_size=32,
                                 batch_size=6, cache_dir=tmp_path / "c")
    assert next(iter(ds))[0].shape == (6, 32, 32, 3)


def test_tar_gz_loads_like_the_folder(tmp_path, photos):
    _write_tree(tmp_path / "data", photos)
    kwargs = dict(style="cifar", batch_size=5, cache_dir=tmp_path / "cache")
    x_dir, y_dir = _batches(qd.load_image_folder(tmp_path / "data", "train", **kwargs)[0])
    for name, prefix in (("plain.tar.gz", ""), ("wrapped.tgz", "mydata")):
        archive = _tar(tmp_path / "data", tmp_path / name, prefix)
        ds, info = qd.load_image_folder(archive, "train", **kwargs)
        x_tar, y_tar = _batches(ds)
        assert info.class_names == ("china", "flower")
        np.testing.assert_array_equal(x_tar, x_dir)
        np.testing.assert_array_equal(y_tar, y_dir)
        assert str(tmp_path / "cache") in info.name  # extracted into the cache folder given


def test_corrupt_images_are_named(tmp_path, photos):
    _write_tree(tmp_path / "data", photos)
    garbage = tmp_path / "data" / "train" / "flower" / "zz_garbage.jpg"
    garbage.write_bytes(os.urandom(700))
    with pytest.raises(ValueError, match="zz_garbage.jpg"):
        qd.load_image_folder(tmp_path / "data", "train", batch_size=4, cache_dir=tmp_path / "c")
    # Without the up-front pass, the pipeline still names a non-image file.
    ds, _ = qd.load_image_folder(tmp_path / "data", "train", batch_size=4,
                                 cache_dir=tmp_path / "c", validate=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="zz_garbage.jpg"):
        _batches(ds)

    garbage.unlink()
    good = (tmp_path / "data" / "train" / "china" / "00.jpg").read_bytes()
    truncated = tmp_path / "data" / "train" / "china" / "03_truncated.jpg"
    truncated.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match="03_truncated.jpg"):
        qd.load_image_folder(tmp_path / "data", "train", batch_size=4, cache_dir=tmp_path / "c")


def test_folder_errors_name_the_path(tmp_path, photos):
    _write_tree(tmp_path / "data", photos)
    empty = tmp_path / "data" / "train" / "empty_class"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty_class"):
        qd.load_image_folder(tmp_path / "data", "train", cache_dir=tmp_path / "c")
    empty.joinpath("notes.txt").unlink()
    empty.rmdir()

    with pytest.raises(qd.DataNotFoundError) as err:
        qd.load_image_folder(tmp_path / "data", "validation", cache_dir=tmp_path / "c")
    assert str(tmp_path / "data" / "validation") in str(err.value) and "train" in str(err.value)
    with pytest.raises(qd.DataNotFoundError, match="nowhere"):
        qd.load_image_folder(tmp_path / "nowhere", "train", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="missing"):
        qd.load_image_folder(tmp_path / "data", "train", class_names=("china", "flower", "tulip"),
                             cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="style"):
        qd.load_image_folder(tmp_path / "data", "train", style="vgg")


def test_unsafe_archive_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"\xff\xd8\xff"
        member = tarfile.TarInfo("../train/cls/escape.jpg")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match="evil.tar.gz"):
        qd.load_image_folder(archive, "train", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c" / "train").exists()


def test_skip_and_limit_per_class_split_a_folder(tmp_path, photos):
    """skip_per_class=4 keeps files 4.. of each class; with limit_per_class=4 the two parts are
    disjoint and cover the folder (a train/validation split of one training folder)."""
    exact = _write_tree(tmp_path / "data", photos)  # PNGs (flower/) are lossless
    first, info = qd.load_image_folder(tmp_path / "data", "train", batch_size=None,
                                       limit_per_class=4, cache_dir=tmp_path / "c")
    rest, info_rest = qd.load_image_folder(tmp_path / "data", "train", batch_size=None,
                                           skip_per_class=4, cache_dir=tmp_path / "c")
    assert info.num_examples == 8 and info_rest.num_examples == 4
    flower_rest = [x.numpy() * 255.0 for x, y in rest if int(y) == 1]
    pngs = list(exact.values())
    np.testing.assert_allclose(np.stack(flower_rest), np.stack(pngs[4:]), atol=1e-3)
    with pytest.raises(ValueError, match="no images after skipping the first 6"):
        qd.load_image_folder(tmp_path / "data", "train", skip_per_class=6,
                             cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="skip_per_class"):
        qd.load_image_folder(tmp_path / "data", "train", skip_per_class=-1,
                             cache_dir=tmp_path / "c")
