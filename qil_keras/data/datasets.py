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
  the statistics of the 50,000 training images. (A JPEG copy's statistics
  differ slightly; the standard constants are kept so results compare with
  published ones.)
* CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762),
  the statistics of the 50,000 training images.
* ImageNet: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), the
  constants torchvision and most published ImageNet models use.

Random augmentation is stateless and seeded per example
(``tf.data.Dataset.random``), so a given ``seed`` reproduces a run exactly,
epoch after epoch, whatever the parallelism; evaluation pipelines are
deterministic.

The parts live in ``preprocessing`` (``Preprocessing``, presets, ``DataInfo``),
``pipeline`` (the transforms and the shuffle/batch tail both loaders share) and
``folders`` (``load_image_folder``, archives); this module has ``load_tfds`` and
gathers the public names.
"""

from .._keras import tf
from .folders import IMAGE_EXTENSIONS, data_file, extract_archive, load_image_folder
from .pipeline import AUTOTUNE, DataNotFoundError, _check_common, _finish
from .preprocessing import (_UNIT_PREPROCESSING, CIFAR10_CLASS_NAMES, CIFAR10_PREPROCESSING,
                            CIFAR100_CLASS_NAMES, CIFAR100_PREPROCESSING, IMAGENET_PREPROCESSING,
                            DataInfo, Preprocessing, _resolve_preprocessing)

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

# tfds reads these from the downloaded files; before that (mock data) it has "0", "1", ...
_KNOWN_CLASS_NAMES = {"cifar10": CIFAR10_CLASS_NAMES, "cifar100": CIFAR100_CLASS_NAMES}

# tfds name -> (style, default normalization)
_TFDS_DATASETS = {
    "cifar10": ("cifar", CIFAR10_PREPROCESSING),
    "cifar100": ("cifar", CIFAR100_PREPROCESSING),
    "imagenet2012": ("imagenet", IMAGENET_PREPROCESSING),
}


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
