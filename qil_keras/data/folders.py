"""Image folders (``split/class/*.jpg``) and ``.tar.gz`` archives of them: extraction into a
cache (once, checked by a marker), listing, one-time validation of every image, and
``load_image_folder``."""

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from .._keras import tf
from .pipeline import AUTOTUNE, DataNotFoundError, _check_common, _decode, _finish
from .preprocessing import (_UNIT_PREPROCESSING, CIFAR10_PREPROCESSING, IMAGENET_PREPROCESSING,
                            DataInfo, _resolve_preprocessing)

#: File name endings ``load_image_folder`` reads (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_MARKER = ".qil_keras_extracted.json"


def _cache_root(cache_dir):
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QIL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/qil_keras").expanduser()


def _is_archive(path):
    name = path.name.lower()
    return path.is_file() and name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def _archive_stem(path):
    name = path.name
    for ending in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def _extract_tar(archive, dest):
    """Stream-extract a tar archive into ``dest``, refusing members that would land outside it.

    Regular files and folders are written directly, with no per-file chmod,
    utime or realpath calls (faster than ``TarFile.extractall`` for trees of
    many small images in a development run). Names that are absolute or contain
    ``..`` are refused; links go through tarfile's ``data`` filter, and once
    an archive has had a link every later member does too (a link could
    redirect a path).
    """
    dest_str = str(dest)
    made = set()
    careful = False
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name
            if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
                raise tarfile.OutsideDestinationError(member, os.path.join(dest_str, name))
            if careful or not (member.isfile() or member.isdir()):
                careful = True
                tar.extract(member, dest_str, filter="data")
                continue
            target = os.path.join(dest_str, name)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
                made.add(os.path.normpath(target))
                continue
            folder = os.path.normpath(os.path.dirname(target))
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def extract_archive(archive, cache_dir=None):
    """Extract a tar archive (``.tar``, ``.tar.gz``...) once, return the folder it went to.

    The folder is ``<cache>/extracted/<stem>-<key>``, where ``<cache>`` is
    ``cache_dir``, else ``$QIL_CACHE_DIR``, else ``~/.cache/qil_keras``, and
    ``<key>`` hashes the archive's path, size and modification time. A marker
    file written after a complete extraction makes later calls return at once;
    an interrupted extraction is redone. Members that would land outside the
    folder are refused (absolute paths, ``..``; links go through tarfile's
    ``data`` filter), and the archive is named in the error.
    """
    archive = Path(archive).expanduser().resolve()
    if not archive.is_file():
        raise DataNotFoundError(f"Archive {archive} does not exist.")
    stat = archive.stat()
    identity = {"archive": str(archive), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    parent = _cache_root(cache_dir) / "extracted"
    target = parent / f"{_archive_stem(archive)}-{key}"
    marker = target / _MARKER

    def done():
        try:
            return json.loads(marker.read_text()) == identity
        except (OSError, ValueError):
            return False

    if done():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{target.name}.*"):  # left by a killed extraction
        try:
            if time.time() - stale.stat().st_mtime > 86400:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        try:
            _extract_tar(archive, staging)
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            raise ValueError(f"Cannot extract archive {archive}: {type(error).__name__}: {error}") from error
        (staging / _MARKER).write_text(json.dumps(identity, sort_keys=True))
        if target.exists() and not done():
            shutil.rmtree(target)  # a stale or interrupted extraction
        try:
            os.replace(staging, target)
        except OSError:
            if not done():  # not another process that finished first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def data_file(name, data_dir=None):
    """Path of ``name`` inside ``data_dir``, else ``$QIL_DATA_DIR``; raises if absent.

    ``data_file("cifar10-jpg.tar.gz")`` is how examples find the shared
    CIFAR-10 archive without hard-coding where it lives.
    """
    base = data_dir if data_dir is not None else os.environ.get("QIL_DATA_DIR")
    if not base:
        raise DataNotFoundError(
            f"Where is {name!r}? Pass data_dir= or set the QIL_DATA_DIR environment variable to the "
            "folder that holds it."
        )
    path = Path(base).expanduser() / name
    if not path.exists():
        raise DataNotFoundError(f"{path} does not exist (looked in data_dir={str(base)!r}).")
    return path


def _resolve_root(root, split, cache_dir):
    """Folder that contains ``split/``: extracts archives, looks through one wrapper folder."""
    path = Path(root).expanduser()
    if not path.exists() and not path.is_absolute() and os.environ.get("QIL_DATA_DIR"):
        candidate = Path(os.environ["QIL_DATA_DIR"]).expanduser() / path
        if candidate.exists():
            path = candidate
    if not path.exists():
        raise DataNotFoundError(
            f"Image folder or archive {path} does not exist (relative paths are also looked up in "
            "$QIL_DATA_DIR)."
        )
    if path.is_file():
        if not _is_archive(path):
            raise ValueError(
                f"{path} is a file but not a tar archive (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)."
            )
        path = extract_archive(path, cache_dir)
    if not (path / split).is_dir():
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1 and (subdirs[0] / split).is_dir():
            path = subdirs[0]  # an archive that wraps the tree in one top folder
    split_dir = path / split
    if not split_dir.is_dir():
        available = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataNotFoundError(
            f"Split folder {split_dir} does not exist (from {root}); folders there: {available or 'none'}. "
            "Expected a split/class/*.jpg layout."
        )
    return split_dir


def _list_images(split_dir, class_names, limit_per_class, skip_per_class=0):
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = tuple(found)
        if not class_names:
            raise DataNotFoundError(f"{split_dir} has no class folders (expected {split_dir}/<class>/*.jpg).")
    else:
        class_names = tuple(class_names)
        missing = [c for c in class_names if c not in found]
        extra = [c for c in found if c not in class_names]
        if missing or extra:
            raise ValueError(
                f"Class folders in {split_dir} do not match class_names: missing {missing}, "
                f"unexpected {extra}."
            )
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        folder = split_dir / cls
        files = sorted(
            entry.name
            for entry in os.scandir(folder)
            if entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.name.startswith(".")
            and entry.is_file()
        )
        if not files:
            raise ValueError(
                f"Class folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)} files)."
            )
        files = files[skip_per_class:]
        if not files:
            raise ValueError(
                f"Class folder {folder} has no images after skipping the first {skip_per_class}."
            )
        if limit_per_class is not None:
            files = files[:limit_per_class]
        paths.extend(os.path.join(str(folder), f) for f in files)
        labels.extend([label] * len(files))
    return class_names, paths, np.asarray(labels, np.int32)


_VALIDATED = {}  # in-process memo: key -> sorted unique image shapes


def _validation_key(paths):
    digest = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _validate_images(paths, cache_dir):
    """Decode every file once; raise naming the files that fail.

    Returns the set of image shapes, ``None`` when there are more than 64.

    A success is remembered (in this process, and as a record in the cache
    folder keyed by the files' paths, sizes and mtimes), so the pass runs once.
    """
    key = _validation_key(paths)
    if key in _VALIDATED:
        return _VALIDATED[key]
    record = _cache_root(cache_dir) / "validated" / f"{key}.json"
    try:
        stored = json.loads(record.read_text())["shapes"]
        shapes = None if stored is None else {tuple(s) for s in stored}
        _VALIDATED[key] = shapes
        return shapes
    except (OSError, ValueError, KeyError, TypeError):
        pass

    def check(path):
        return path, tf.shape(_decode(tf.io.read_file(path)))

    ds = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(check, num_parallel_calls=AUTOTUNE, deterministic=False)
        .ignore_errors()
        .batch(4096)
    )
    ok = set()
    shapes = set()
    for batch_paths, batch_shapes in ds.as_numpy_iterator():
        ok.update(p.decode() for p in batch_paths)
        shapes.update(map(tuple, batch_shapes.tolist()))
    bad = [p for p in paths if p not in ok]
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(
            f"{len(bad)} image file(s) cannot be read or decoded as JPEG/PNG/GIF/BMP:\n  {shown}\n"
            "Remove or replace them."
        )
    # A few distinct sizes are worth remembering; thousands (ImageNet) are not.
    shapes = shapes if len(shapes) <= 64 else None
    _VALIDATED[key] = shapes
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({
            "count": len(paths),
            "shapes": None if shapes is None else sorted(list(s) for s in shapes),
        }))
        os.replace(tmp, record)
    except OSError:  # a read-only cache is not an error
        pass
    return shapes


def _checked_read(path):
    """Read a file, failing with its name when it is not a JPEG/PNG/GIF/BMP (by magic bytes)."""
    contents = tf.io.read_file(path)
    magic = tf.strings.substr(contents, 0, 4)
    known = tf.reduce_any(
        tf.stack([
            tf.strings.substr(contents, 0, 3) == b"\xff\xd8\xff",
            magic == b"\x89PNG",
            magic == b"GIF8",
            tf.strings.substr(contents, 0, 2) == b"BM",
        ])
    )
    check = tf.debugging.Assert(known, ["Not a JPEG/PNG/GIF/BMP image file:", path], name="image_file_check")
    with tf.control_dependencies([check]):
        return tf.identity(contents)


def load_image_folder(
    root,
    split,
    *,
    batch_size=32,
    training=False,
    style="none",
    augment=None,
    image_size=None,
    normalization="auto",
    class_names=None,
    shuffle=None,
    shuffle_buffer=None,
    limit_per_class=None,
    skip_per_class=0,
    num_parallel_calls=AUTOTUNE,
    cache=False,
    cache_dir=None,
    validate=True,
    drop_remainder=False,
    seed=None,
    dtype=tf.float32,
):
    """A batched, prefetched ``(images, labels)`` pipeline over ``root/split/<class>/*.jpg|png``.

    Args:
      root: the folder that holds the split folders, or a tar archive
        (``.tar.gz``...) of such a tree, extracted once with
        ``extract_archive`` (a single top-level folder inside the archive
        is looked through). A relative path that does not exist is also looked
        up in ``$QIL_DATA_DIR``.
      split: the split folder name (``"train"``, ``"test"``, ``"val"``...).
      batch_size: examples per batch (``None``: unbatched).
      training: training pipeline (shuffled, augmented by default) or not.
      style: ``"cifar"``, ``"imagenet"`` or ``"none"`` (see the module doc).
      augment: random augmentation; default ``training``.
      image_size: model input size (int or ``(h, w)``); default 32 (cifar),
        224 (imagenet), the images' own size (none; all images must then
        have one size to be batched).
      normalization: ``"auto"`` (CIFAR-10 constants for style cifar, ImageNet
        for imagenet, [0, 1] pixels for none), a preset name, ``(mean, std)``,
        a ``Preprocessing``, or ``None`` ([0, 1] pixels).
      class_names: the class folders, in label order; default: the sorted
        folder names of this split. Pass the training split's
        ``info.class_names`` when loading a test split to make sure labels agree.
      shuffle: shuffle (default ``training``); ``shuffle_buffer`` defaults to
        all files (or 50,000 with ``cache``).
      limit_per_class: use only the first N files (sorted by name) of each
        class, for quick runs.
      skip_per_class: leave out the first N files (sorted by name) of each
        class, before ``limit_per_class`` applies: ``limit_per_class=4500`` and
        ``skip_per_class=4500`` split CIFAR-10's training folder 45k / 5k.
      num_parallel_calls: parallelism of reading, decoding and augmenting.
      cache: cache the encoded file contents (``True``: in memory; a string: a
        cache file) so later epochs do not touch the disk.
      cache_dir: where archives are extracted and validation records are kept;
        default ``$QIL_CACHE_DIR``, else ``~/.cache/qil_keras``.
      validate: decode every file once up front (results remembered in
        ``cache_dir``) and raise an error that names each unreadable file.
        Every file is decoded once, so for ImageNet-size folders (1.3 M large
        JPEGs) consider ``validate=False``.
        With ``validate=False`` a file that is not an image by its first bytes
        still raises naming the file when it is reached, but a file that is
        cut short only raises TensorFlow's decode error.
      drop_remainder, seed, dtype: as in ``load_tfds``.

    Returns:
      ``(dataset, info)``; ``info.class_names[label]`` names each label.

    Raises:
      DataNotFoundError: ``root`` or the split folder is missing.
      ValueError: a class folder without images, or unreadable image files
        (named in the message).
    """
    _check_common(style, batch_size)
    if limit_per_class is not None and (
        not isinstance(limit_per_class, (int, np.integer)) or limit_per_class < 1
    ):
        raise ValueError(f"limit_per_class must be a positive int or None, got {limit_per_class!r}.")
    split_dir = _resolve_root(root, split, cache_dir)
    if not isinstance(skip_per_class, (int, np.integer)) or skip_per_class < 0:
        raise ValueError(f"skip_per_class must be an int >= 0, got {skip_per_class!r}.")
    class_names, paths, labels = _list_images(split_dir, class_names, limit_per_class,
                                              skip_per_class)
    shapes = _validate_images(paths, cache_dir) if validate else None

    default = {"cifar": CIFAR10_PREPROCESSING, "imagenet": IMAGENET_PREPROCESSING}.get(style)
    if default is None:  # style none: the images' own size when they all share one
        own = next(iter(shapes)) if shapes is not None and len(shapes) == 1 else None
        default = _UNIT_PREPROCESSING.replace(image_size=own[:2] if own else None)
        if image_size is None and validate and own is None and batch_size is not None:
            raise ValueError(
                f"Images under {split_dir} do not all have one size: pass image_size= (or "
                "style='cifar'/'imagenet') to batch them, or batch_size=None."
            )
    prep = _resolve_preprocessing(normalization, style, image_size, default)
    augment = training if augment is None else bool(augment)
    shuffle = training if shuffle is None else bool(shuffle)

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if cache:
        ds = ds.map(lambda p, y: (_checked_read(p), y), num_parallel_calls=num_parallel_calls)
        ds = ds.cache(cache if isinstance(cache, str) else "")
        buffer = shuffle_buffer or min(len(paths), 50_000)
        pre_map = None
    else:
        buffer = shuffle_buffer or len(paths)
        pre_map = lambda p, y: (_checked_read(p), y)  # noqa: E731 - read after shuffling file names
    info = DataInfo(str(split_dir), split, class_names, len(paths), prep, style, bool(training), augment)
    ds = _finish(
        ds, style=style, prep=prep, augment=augment, shuffle=shuffle,
        shuffle_buffer=buffer, batch_size=batch_size, drop_remainder=drop_remainder,
        num_parallel_calls=num_parallel_calls, seed=seed, dtype=dtype, pre_map=pre_map,
    )
    return ds, info
