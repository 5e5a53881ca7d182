"""How raw pixels become model inputs: ``Preprocessing`` (normalization and geometry), the
presets for CIFAR-10/100 and ImageNet, and ``DataInfo``, what a loader returns next to its
dataset. The constants are derived in ``qil_keras.data.datasets``' module docstring."""

import dataclasses

import numpy as np

from .._keras import tf


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
