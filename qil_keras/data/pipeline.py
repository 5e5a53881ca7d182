"""The transforms both loaders share, run inside ``tf.data`` map functions: decoding, the
``"cifar"``, ``"imagenet"`` and ``"none"`` augmentations (stateless, seeded per example), and
the shuffle -> transform -> batch -> prefetch tail of every pipeline."""

import numpy as np

from .._keras import tf

AUTOTUNE = tf.data.AUTOTUNE

_STYLES = ("cifar", "imagenet", "none")


class DataNotFoundError(FileNotFoundError):
    """The data a loader was asked for is not on this machine (nothing is downloaded)."""




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
