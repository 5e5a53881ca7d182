"""tf.data input pipelines for CIFAR-10/100 and ImageNet, from tfds or image folders.

Two loaders, one set of transforms:

* ``load_tfds`` reads ``cifar10``, ``cifar100`` or ``imagenet2012`` with
  tensorflow-datasets. It never downloads or builds anything unless asked
  (``prepare=True``, or a ``manual_dir``); when the data is not there it raises
  ``DataNotFoundError``, which says where tfds looked and how to provide it.
* ``load_image_folder`` reads a ``split/class/*.jpg|png`` tree, or a
  ``.tar.gz`` of one (extracted once into a cache directory).

Both return ``(dataset, info)``: ``dataset`` yields ``(images, labels)``
batches, float32 ``(B, H, W, 3)`` normalized images and int32 labels; ``info``
is a ``DataInfo`` with the class names, the number of examples and the
``Preprocessing`` (mean, std, image size) that an exporter stores next to
the model so that the same normalization is applied at inference.

Transforms (``style``):

* ``"cifar"``: training: zero-pad 4 pixels and random-crop back to 32×32,
  random horizontal flip; evaluation: the image as is.
* ``"imagenet"``: training: random-resized crop (area 8–100 % of the image,
  aspect ratio 3/4–4/3) resized to 224×224, random horizontal flip;
  evaluation: resize the shorter side to 256, centre-crop 224×224.
  (With another ``image_size`` S the evaluation resize is ``round(S·256/224)``.)
* ``"none"``: the image as is (resized to ``image_size`` when one is given);
  training: random horizontal flip only.

Normalization, on pixels scaled to [0, 1]: ``x = (pixel/255 - mean) / std``
per channel (RGB), with these constants:

* CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616),
  the statistics of the 50,000 training images. (The shared JPEG copy
  measures mean (0.4868, 0.4822, 0.4414), std (0.2451, 0.2425, 0.2605); the
  standard constants are kept so results compare with published ones.)
* CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762),
  the statistics of the 50,000 training images.
* ImageNet: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), the
  constants torchvision and most published ImageNet models use.

Random augmentation is stateless and seeded per example
(``tf.data.Dataset.random``), so a given ``seed`` reproduces a run exactly,
epoch after epoch, whatever the parallelism; evaluation pipelines are
deterministic.
"""

import dataclasses
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

__all__ = [
    "Preprocessing",
    "DataInfo",
    "DataNotFoundError",
    "CIFAR10_PREPROCESSING",
    "CIFAR100_PREPROCESSING",
    "IMAGENET_PREPROCESSING",
    "IMAGE_EXTENSIONS",
    "CIFAR10_CLASS_NAMES",
    "CIFAR100_CLASS_NAMES",
    "load_tfds",
    "load_image_folder",
    "extract_archive",
    "data_file",
]

AUTOTUNE = tf.data.AUTOTUNE

#: File name endings ``load_image_folder`` reads (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_STYLES = ("cifar", "imagenet", "none")

_MARKER = ".qil_keras_extracted.json"


class DataNotFoundError(FileNotFoundError):
    """The data a loader was asked for is not on this machine (nothing is downloaded)."""


# ---------------------------------------------------------------------------
# Normalization constants


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels become model inputs: ``x = (pixel/255 - mean) / std``.

    ``mean`` and ``std`` are per channel (R, G, B) on pixels scaled to [0, 1];
    ``image_size`` is the ``(height, width)`` the model sees (``None``: images
    keep their own, varying size); ``resize_shorter`` is the shorter-side
    resize before the centre crop at evaluation (ImageNet
    style), ``None`` when images are used at their size. ``scale`` and
    ``offset`` give the same map as ``x = pixel * scale + offset`` on 0–255
    pixels, the form an integer exporter folds into the input quantization.
    """

    name: str
    mean: tuple
    std: tuple
    image_size: tuple = (32, 32)
    resize_shorter: int = None

    def __post_init__(self):
        mean = tuple(float(m) for m in np.broadcast_to(np.asarray(self.mean, dtype=np.float64), (3,)))
        std = tuple(float(s) for s in np.broadcast_to(np.asarray(self.std, dtype=np.float64), (3,)))
        if min(std) <= 0:
            raise ValueError(f"Preprocessing std must be positive, got {std}.")
        size = self.image_size
        if size is not None:
            size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(
                    f"image_size must be an int, (height, width) or None, got {self.image_size!r}."
                )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "image_size", size)
        if self.resize_shorter is not None:
            object.__setattr__(self, "resize_shorter", int(self.resize_shorter))

    @property
    def scale(self):
        """Per-channel ``1 / (255 * std)``: ``x = pixel * scale + offset``."""
        return tuple(1.0 / (255.0 * s) for s in self.std)

    @property
    def offset(self):
        """Per-channel ``-mean / std``: ``x = pixel * scale + offset``."""
        return tuple(-m / s for m, s in zip(self.mean, self.std))

    def normalize(self, images):
        """Normalize 0–255 RGB pixels (uint8 or float, NumPy or tf, last axis = channels)."""
        if isinstance(images, np.ndarray):
            scaled = images.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
            return scaled.astype(np.float32)
        images = tf.cast(images, tf.float32)
        return images * tf.constant(self.scale, tf.float32) + tf.constant(self.offset, tf.float32)

    def denormalize(self, x):
        """Inverse of ``normalize``: model inputs back to float 0–255 pixels."""
        if isinstance(x, np.ndarray):
            pixels = (x.astype(np.float32) - np.float32(self.offset)) / np.float32(self.scale)
            return pixels.astype(np.float32)
        x = tf.cast(x, tf.float32)
        return (x - tf.constant(self.offset, tf.float32)) / tf.constant(self.scale, tf.float32)

    def replace(self, **changes):
        """A copy with some fields changed (``image_size=...`` etc.)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """JSON-serializable form (lists, not tuples), for model metadata."""
        return {
            "name": self.name,
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": None if self.image_size is None else list(self.image_size),
            "resize_shorter": self.resize_shorter,
            "scale": list(self.scale),
            "offset": list(self.offset),
        }

    @classmethod
    def from_dict(cls, d):
        """Inverse of ``to_dict`` (derived ``scale``/``offset`` are ignored)."""
        return cls(
            name=d.get("name", ""),
            mean=d["mean"],
            std=d["std"],
            image_size=d["image_size"],
            resize_shorter=d.get("resize_shorter"),
        )


#: CIFAR-10 training-set statistics (50,000 images).
CIFAR10_PREPROCESSING = Preprocessing(
    "cifar10", mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), image_size=(32, 32)
)
#: CIFAR-100 training-set statistics (50,000 images).
CIFAR100_PREPROCESSING = Preprocessing(
    "cifar100", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), image_size=(32, 32)
)
#: The usual ImageNet constants (torchvision, most published models).
IMAGENET_PREPROCESSING = Preprocessing(
    "imagenet", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), image_size=(224, 224),
    resize_shorter=256,
)
_UNIT_PREPROCESSING = Preprocessing("unit", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), image_size=None)

_PRESETS = {
    "cifar10": CIFAR10_PREPROCESSING,
    "cifar100": CIFAR100_PREPROCESSING,
    "imagenet": IMAGENET_PREPROCESSING,
    "imagenet2012": IMAGENET_PREPROCESSING,
}

CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASS_NAMES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split())
# tfds reads these from the downloaded files; before that (mock data) it has "0", "1", ...
_KNOWN_CLASS_NAMES = {"cifar10": CIFAR10_CLASS_NAMES, "cifar100": CIFAR100_CLASS_NAMES}

# tfds name -> (style, default normalization)
_TFDS_DATASETS = {
    "cifar10": ("cifar", CIFAR10_PREPROCESSING),
    "cifar100": ("cifar", CIFAR100_PREPROCESSING),
    "imagenet2012": ("imagenet", IMAGENET_PREPROCESSING),
}


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a loader returns next to the dataset.

    ``name`` is the tfds name, or the split folder an image-folder pipeline
    reads; ``class_names[label]`` names a label; ``num_examples`` counts examples
    before batching (``None`` when unknown); ``preprocessing`` is the
    normalization and geometry the pipeline applies; ``style`` and ``augment``
    say which transform ran.
    """

    name: str
    split: str
    class_names: tuple
    num_examples: int
    preprocessing: Preprocessing
    style: str
    training: bool
    augment: bool

    @property
    def num_classes(self):
        return len(self.class_names)

    def steps(self, batch_size, drop_remainder=False):
        """Batches per epoch for ``batch_size``."""
        if self.num_examples is None:
            return None
        return self.num_examples // batch_size if drop_remainder else -(-self.num_examples // batch_size)


def _resolve_preprocessing(normalization, style, image_size, default):
    """Build the Preprocessing from a preset name, (mean, std), None or a Preprocessing."""
    if isinstance(normalization, Preprocessing):
        prep = normalization
    elif isinstance(normalization, str) and normalization == "auto":
        prep = default
    elif normalization is None or normalization is False:
        prep = _UNIT_PREPROCESSING.replace(image_size=default.image_size,
                                           resize_shorter=default.resize_shorter)
    elif isinstance(normalization, str):
        if normalization not in _PRESETS:
            raise ValueError(
                f"Unknown normalization {normalization!r}: use one of {sorted(_PRESETS)}, "
                "None (pixels scaled to [0, 1]), a (mean, std) pair or a Preprocessing."
            )
        prep = _PRESETS[normalization].replace(
            image_size=default.image_size, resize_shorter=default.resize_shorter
        )
    else:
        try:
            mean, std = normalization
        except (TypeError, ValueError):
            raise ValueError(
                f"normalization must be 'auto', a preset name, None, (mean, std) or a Preprocessing; "
                f"got {normalization!r}."
            ) from None
        prep = Preprocessing("custom", mean=mean, std=std, image_size=default.image_size,
                             resize_shorter=default.resize_shorter)
    if image_size is not None:
        if np.isscalar(image_size):
            size = (int(image_size), int(image_size))
        else:
            size = tuple(int(s) for s in image_size)
        resize_shorter = prep.resize_shorter
        if style == "imagenet":
            resize_shorter = int(round(min(size) * 256 / 224))
        prep = prep.replace(image_size=size, resize_shorter=resize_shorter)
    if style == "imagenet" and prep.resize_shorter is None:
        prep = prep.replace(resize_shorter=int(round(min(prep.image_size) * 256 / 224)))
    if style != "imagenet" and prep.resize_shorter is not None:
        prep = prep.replace(resize_shorter=None)
    return prep


# ---------------------------------------------------------------------------
# Transforms (all run inside tf.data map functions)


def _decode(contents):
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, 3)."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _resize_if_needed(image, size):
    """float32 image resized to ``size`` (antialiased bilinear) unless it already has it."""
    size = tf.constant(size, tf.int32)
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    return tf.cond(same, lambda: image, lambda: tf.image.resize(image, size, antialias=True))


def _random_crop_window(shape, seed, scale, ratio):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _random_resized_crop(image, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random-resized crop of encoded bytes (JPEGs decode only the crop) or a uint8 image."""
    if image.dtype == tf.string:
        contents = image

        def jpeg():
            begin, crop = _random_crop_window(tf.image.extract_jpeg_shape(contents), seed, scale, ratio)
            window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
            return tf.image.decode_and_crop_jpeg(contents, window, channels=3)

        def other():
            decoded = _decode(contents)
            begin, crop = _random_crop_window(tf.shape(decoded), seed, scale, ratio)
            return tf.slice(decoded, begin, crop)

        cropped = tf.cond(tf.io.is_jpeg(contents), jpeg, other)
    else:
        begin, crop = _random_crop_window(tf.shape(image), seed, scale, ratio)
        cropped = tf.slice(image, begin, crop)
    cropped.set_shape([None, None, 3])
    return tf.image.resize(tf.cast(cropped, tf.float32), size, antialias=True)


def _resize_shorter_centre_crop(image, shorter, size):
    """Resize so the shorter side is ``shorter``, then centre-crop ``size`` (float32 out)."""
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    factor = tf.cast(shorter, tf.float32) / tf.minimum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * factor), tf.int32), size[0])
    new_w = tf.maximum(tf.cast(tf.round(w * factor), tf.int32), size[1])
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]), antialias=True)
    top = (new_h - size[0]) // 2
    left = (new_w - size[1]) // 2
    return tf.slice(resized, tf.stack([top, left, 0]), [size[0], size[1], 3])


def _make_transform(style, prep, augment, dtype=tf.float32):
    """The map function: (image uint8 | encoded bytes, label[, seed]) -> (x, int32 label)."""
    size = prep.image_size

    def transform(image, label, seed=None):
        if augment:
            seeds = tf.random.experimental.stateless_split(seed, 2)
        if style == "imagenet" and augment:
            x = _random_resized_crop(image, seeds[0], size)
        else:
            if image.dtype == tf.string:
                image = _decode(image)
            elif image.shape[-1] == 1:
                image = tf.image.grayscale_to_rgb(image)
            if style == "imagenet":
                x = _resize_shorter_centre_crop(image, prep.resize_shorter, size)
            else:
                x = tf.cast(image, tf.float32)
                if size is not None:
                    x = _resize_if_needed(x, size)
                if style == "cifar" and augment:
                    x = tf.pad(x, [[4, 4], [4, 4], [0, 0]])
                    x = tf.image.stateless_random_crop(x, [size[0], size[1], 3], seed=seeds[0])
        if augment:
            x = tf.image.stateless_random_flip_left_right(x, seed=seeds[1])
        if size is not None:
            x = tf.ensure_shape(x, [size[0], size[1], 3])
        x = prep.normalize(x)
        return tf.cast(x, dtype), tf.cast(label, tf.int32)

    return transform


def _finish(ds, *, style, prep, augment, shuffle, shuffle_buffer, batch_size,
            drop_remainder, num_parallel_calls, seed, dtype, pre_map=None):
    """shuffle -> per-example seeds -> transform -> batch -> prefetch."""
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if pre_map is not None:
        ds = ds.map(pre_map, num_parallel_calls=num_parallel_calls)
    transform = _make_transform(style, prep, augment, dtype)
    if augment:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda example, s: transform(example[0], example[1], s), num_parallel_calls=num_parallel_calls
        )
    else:
        ds = ds.map(transform, num_parallel_calls=num_parallel_calls)
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=num_parallel_calls)
    return ds.prefetch(AUTOTUNE)


def _check_common(style, batch_size):
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}.")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None (no batching), got {batch_size!r}.")


# ---------------------------------------------------------------------------
# tensorflow-datasets


def _tfds_hint(name, looked_in):
    lines = [
        f"tensorflow-datasets has no prepared copy of {name!r} in {looked_in}, and qil_keras "
        "never downloads data unless asked. To provide it:",
        f"  * point data_dir= (or the TFDS_DATA_DIR environment variable) at a folder that holds "
        f"a prepared {name}/<version>/ tree (built on a machine with network by "
        f"`tfds.builder({name!r}, data_dir=...).download_and_prepare()`);",
    ]
    if name.startswith("imagenet"):
        lines.append(
            "  * or put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in a folder and call "
            "load_tfds(..., manual_dir=that_folder) (tfds builds the dataset from them, once);"
        )
    else:
        lines.append("  * or call load_tfds(..., prepare=True) on a machine with network access;")
    lines.append(
        "  * or use qil_keras.datasets.load_image_folder(root, split) on a split/class/*.jpg tree or "
        "a .tar.gz of one (for CIFAR-10, the cifar10-jpg.tar.gz archive)."
    )
    return "\n".join(lines)


def load_tfds(
    name,
    split,
    *,
    batch_size,
    training,
    data_dir=None,
    manual_dir=None,
    prepare=None,
    image_size=None,
    style=None,
    augment=None,
    normalization="auto",
    shuffle=None,
    shuffle_buffer=10_000,
    cache=False,
    drop_remainder=False,
    num_parallel_calls=AUTOTUNE,
    seed=None,
    dtype=tf.float32,
):
    """A batched, prefetched ``(images, labels)`` pipeline for a tfds dataset, and its ``DataInfo``.

    Args:
      name: ``"cifar10"``, ``"cifar100"`` or ``"imagenet2012"`` (other tfds
        image-classification datasets work with an explicit ``style``).
      split: a tfds split string (``"train"``, ``"test"``, ``"validation"``,
        ``"train[:10%]"``...).
      batch_size: examples per batch (``None``: unbatched).
      training: ``True`` for a training pipeline (shuffled and augmented by
        default), ``False`` for a deterministic evaluation pipeline.
      data_dir: where tfds looks for prepared data (default: ``TFDS_DATA_DIR``,
        else ``~/tensorflow_datasets``).
      manual_dir: folder with manually downloaded files, used with ``prepare``
        (imagenet2012: ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``).
      prepare: call ``download_and_prepare`` when the data is not prepared.
        Default: only when ``manual_dir`` is given (tfds then builds the
        dataset from the files there); otherwise nothing is ever downloaded
        or built implicitly.
      image_size: model input size (int or ``(h, w)``); default 32 for CIFAR,
        224 for ImageNet.
      style: ``"cifar"``, ``"imagenet"`` or ``"none"``; inferred from ``name``.
      augment: random augmentation (see the module doc); default ``training``.
      normalization: ``"auto"`` (the dataset's constants), a preset name
        (``"cifar10"``, ``"cifar100"``, ``"imagenet"``), ``(mean, std)``, a
        ``Preprocessing``, or ``None`` (pixels scaled to [0, 1]).
      shuffle: shuffle examples (and files); default ``training``.
      shuffle_buffer: shuffle buffer size, in examples.
      cache: cache the records before shuffling/augmentation: ``True`` in memory,
        a string for a cache file.
      drop_remainder: drop the last partial batch.
      num_parallel_calls: parallelism of the map and batch steps.
      seed: seed for shuffling and augmentation (``None``: different every run).
      dtype: dtype of the images.

    Returns:
      ``(dataset, info)``.

    Raises:
      DataNotFoundError: the data is not prepared (the message says where tfds
        looked and how to provide it).
    """
    import tensorflow_datasets as tfds  # slow import: only when used

    if style is None:
        if name not in _TFDS_DATASETS:
            raise ValueError(
                f"No default transform for tfds dataset {name!r}: pass style='cifar', 'imagenet' or "
                f"'none' (known: {sorted(_TFDS_DATASETS)})."
            )
        style = _TFDS_DATASETS[name][0]
    _check_common(style, batch_size)
    default = _TFDS_DATASETS.get(name, (None, IMAGENET_PREPROCESSING if style == "imagenet"
                                        else _UNIT_PREPROCESSING))[1]
    prep = _resolve_preprocessing(normalization, style, image_size, default)
    augment = training if augment is None else bool(augment)
    shuffle = training if shuffle is None else bool(shuffle)

    builder = tfds.builder(name, data_dir=data_dir)
    looked_in = f"{builder.data_dir} (data_dir root {builder.data_dir_root})"
    if prepare is None:
        prepare = manual_dir is not None
    if prepare and not builder.is_prepared():
        config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
        try:
            builder.download_and_prepare(download_config=config)
        except Exception as error:  # network failures, missing manual files...
            raise DataNotFoundError(
                f"Preparing {name!r} failed ({type(error).__name__}: {error}).\n"
                + _tfds_hint(name, looked_in)
            ) from error

    # imagenet2012 is stored as JPEG bytes: skip tfds's decoding so that the
    # training crop decodes only the crop window.
    features = builder.info.features
    keys = builder.info.supervised_keys
    image_key, label_key = (keys[0], keys[1]) if keys and len(keys) >= 2 else ("image", "label")
    if not isinstance(image_key, str) or not isinstance(label_key, str):
        raise ValueError(f"{name!r} has supervised keys {keys!r}; load_tfds needs (image, label).")
    skip = (style == "imagenet" and image_key in features
            and isinstance(features[image_key], tfds.features.Image))
    decoders = {image_key: tfds.decode.SkipDecoding()} if skip else None
    read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
    try:
        ds = builder.as_dataset(
            split=split, as_supervised=True, shuffle_files=shuffle, decoders=decoders, read_config=read_config
        )
    except (AssertionError, KeyError, ValueError, FileNotFoundError, tf.errors.NotFoundError) as error:
        if builder.is_prepared():
            raise
        raise DataNotFoundError(_tfds_hint(name, looked_in)) from error

    cardinality = int(ds.cardinality())
    num_examples = cardinality if cardinality >= 0 else None
    try:
        class_names = tuple(features[label_key].names)
    except (KeyError, AttributeError, TypeError):
        class_names = ()
    known = _KNOWN_CLASS_NAMES.get(name)
    if known and class_names == tuple(str(i) for i in range(len(known))):
        class_names = known
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    info = DataInfo(name, split, class_names, num_examples, prep, style, bool(training), augment)
    ds = _finish(
        ds, style=style, prep=prep, augment=augment, shuffle=shuffle,
        shuffle_buffer=shuffle_buffer, batch_size=batch_size, drop_remainder=drop_remainder,
        num_parallel_calls=num_parallel_calls, seed=seed, dtype=dtype,
    )
    return ds, info


# ---------------------------------------------------------------------------
# Image folders and archives


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
    utime or realpath calls (about half the time of ``TarFile.extractall``
    for trees of many small images). Names that are absolute or contain
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
        About 3 s for the 60,000 CIFAR-10 JPEGs on 2 cores once the files are
        in the page cache; for ImageNet-size folders (full decode of 1.3 M
        large JPEGs) consider ``validate=False``.
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
