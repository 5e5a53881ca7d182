"""Float model builders for the QIL experiments (tf-keras functional models).

Every builder returns a built functional ``keras.Model`` that
``qil_keras.quantize`` can rewrite as is: only layer classes listed in
``qil_keras.LAYER_ROLES`` are used, every ``BatchNormalization`` directly
follows a bias-free ``Conv2D``, ``DepthwiseConv2D`` or ``Dense`` (so it folds into that layer at
integer export), and every ReLU is a separate ``ReLU`` layer.

===================  ============================================  ===============
builder              network                                       reference
===================  ============================================  ===============
``small_cnn``        Conv-BN-ReLU x3, GAP, Dense (MNIST)           quickstart
``small_mobilenet``  depthwise-separable blocks, residual adds     BatchNorm tests
``resnet20``         CIFAR ResNet-20, option-B shortcuts           He 2016 §4.2
``resnet18/34``      ImageNet ResNet, basic blocks, post-act.      He 2016
``alexnet``          single-tower AlexNet with BatchNorm, no LRN   Krizhevsky 2012
===================  ============================================  ===============

Common options: ``bn_momentum``, ``weight_decay`` (L2 on every conv and dense
kernel, added to ``model.losses``: the loss gains ``weight_decay * sum(w**2)``,
i.e. PyTorch's SGD ``weight_decay=2 * weight_decay``) and ``name``.
"""

import numbers

from ._keras import keras

__all__ = ["small_cnn", "small_mobilenet", "resnet20", "resnet18", "resnet34", "alexnet"]

L = keras.layers

# BatchNorm epsilon of the ResNet/AlexNet builders: PyTorch's default, so that
# torchvision weights port unchanged (Keras' default is 1e-3).
BN_EPSILON = 1e-5


# --------------------------------------------------------------------------
# validation and small helpers
# --------------------------------------------------------------------------

def _check_options(builder, num_classes, input_shape, bn_momentum, weight_decay, min_size):
    """Validate the common builder arguments; return ``input_shape`` as a tuple."""
    if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
            or num_classes < 2):
        raise ValueError(f"{builder}: num_classes must be an integer >= 2, got {num_classes!r}.")
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(
            f"{builder}: input_shape must be (height, width, channels), got {input_shape!r}."
        ) from None
    if len(shape) != 3:
        raise ValueError(
            f"{builder}: input_shape must have rank 3, (height, width, channels) without "
            f"the batch dimension, got {input_shape!r} (rank {len(shape)}).")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(
                f"{builder}: input_shape must hold positive integers (fixed sizes; the "
                f"integer export needs static shapes), got {input_shape!r}.")
    shape = tuple(int(d) for d in shape)
    height, width, _ = shape
    if height < min_size or width < min_size:
        raise ValueError(
            f"{builder}: input {height}x{width} is too small; this network needs at least "
            f"{min_size}x{min_size} pixels.")
    if not isinstance(bn_momentum, numbers.Real) or not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"{builder}: bn_momentum must be in [0, 1), got {bn_momentum!r}.")
    if not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"{builder}: weight_decay must be >= 0, got {weight_decay!r}.")
    return shape


def _regularizer(weight_decay):
    return keras.regularizers.L2(float(weight_decay)) if weight_decay > 0 else None


class _Builder:
    """Layer factories sharing ``bn_momentum``, ``weight_decay`` and BN epsilon."""

    def __init__(self, bn_momentum, weight_decay, bn_epsilon=BN_EPSILON,
                 kernel_initializer="he_normal"):
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = bn_epsilon
        self.weight_decay = float(weight_decay)
        self.kernel_initializer = kernel_initializer

    def conv(self, x, filters, kernel_size, strides=1, padding="same", name=None):
        """Bias-free convolution (a BatchNorm always follows)."""
        return L.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                        kernel_initializer=self.kernel_initializer,
                        kernel_regularizer=_regularizer(self.weight_decay), name=name)(x)

    def dense(self, x, units, use_bias=True, kernel_initializer=None, name=None):
        return L.Dense(units, use_bias=use_bias,
                       kernel_initializer=kernel_initializer or self.kernel_initializer,
                       kernel_regularizer=_regularizer(self.weight_decay), name=name)(x)

    def bn(self, x, name=None):
        return L.BatchNormalization(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                                    name=name)(x)

    def head(self, x, num_classes, name="fc"):
        """The classifier: a Dense layer with bias producing logits (no softmax)."""
        return self.dense(x, num_classes, kernel_initializer="glorot_uniform", name=name)


# --------------------------------------------------------------------------
# small CNN (the quickstart network)
# --------------------------------------------------------------------------

def small_cnn(num_classes=10, input_shape=(28, 28, 1), *, bn_momentum=0.9, weight_decay=0.0,
              name="small_cnn"):
    """The MNIST network of ``examples/quickstart.py``: Conv-BN-ReLU x3, GAP, Dense.

    Two Conv(3x3, 16 / 32, bias-free)-BN-ReLU-MaxPool(2) stages, a third
    Conv(3x3, 32)-BN-ReLU, global average pooling and a Dense layer producing
    logits (no softmax). BatchNorm momentum 0.9 suits short runs; epsilon and
    initializers are the Keras defaults, as in the quickstart. Every BatchNorm
    follows a conv and folds into it at export. 14,458 trainable parameters
    (plus 160 BatchNorm statistics) for 10 classes.
    Inputs need at least 4x4 pixels.
    """
    shape = _check_options("small_cnn", num_classes, input_shape, bn_momentum, weight_decay,
                           min_size=4)
    b = _Builder(bn_momentum, weight_decay, bn_epsilon=1e-3, kernel_initializer="glorot_uniform")
    inputs = keras.Input(shape, name="image")
    x = inputs
    for i, filters in enumerate((16, 32, 32), start=1):
        x = b.conv(x, filters, 3, name=f"conv{i}")
        x = b.bn(x, name=f"bn{i}")
        x = L.ReLU(name=f"relu{i}")(x)
        if i < 3:
            x = L.MaxPooling2D(name=f"pool{i}")(x)
    x = L.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = b.head(x, num_classes, name="logits")
    return keras.Model(inputs, outputs, name=name)


def small_mobilenet(num_classes=10, input_shape=(28, 28, 1), *, bn_momentum=0.9,
                    weight_decay=0.0, name="small_mobilenet"):
    """A small MobileNet-style network: depthwise-separable blocks with a residual add.

    Conv(3x3, 16, stride 2)-BN-ReLU, then three blocks of DepthwiseConv(3x3)-BN-ReLU,
    Conv(1x1)-BN with 16, 32 and 32 filters (the second with stride 2); a block whose input
    has its output's shape adds it (a residual sum, signed: an 8-bit tensor once quantized),
    the other ends in a ReLU. Global average pooling and a Dense layer producing logits. Convolutions are bias-free (every
    BatchNorm folds into one). 3,162 trainable parameters (plus 320 BatchNorm statistics) for 10 classes and one input channel.
    Inputs need at least 4x4 pixels.
    """
    shape = _check_options("small_mobilenet", num_classes, input_shape, bn_momentum,
                           weight_decay, min_size=4)
    b = _Builder(bn_momentum, weight_decay)
    inputs = keras.Input(shape, name="image")
    x = L.ReLU(name="relu0")(b.bn(b.conv(inputs, 16, 3, strides=2, name="conv0"), name="bn0"))
    for i, (filters, strides) in enumerate(((16, 1), (32, 2), (32, 1)), start=1):
        y = L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                              depthwise_initializer=b.kernel_initializer,
                              depthwise_regularizer=_regularizer(b.weight_decay),
                              name=f"block{i}_dw")(x)
        y = L.ReLU(name=f"block{i}_dw_relu")(b.bn(y, name=f"block{i}_dw_bn"))
        y = b.bn(b.conv(y, filters, 1, name=f"block{i}_pw"), name=f"block{i}_pw_bn")
        if strides == 1 and x.shape[-1] == filters:
            x = L.Add(name=f"block{i}_add")([x, y])
        else:
            x = L.ReLU(name=f"block{i}_relu")(y)
    x = L.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = b.head(x, num_classes, name="logits")
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------

def _basic_block(b, x, filters, strides, prefix, explicit_padding):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, + shortcut, ReLU.

    The shortcut is the identity, or a 1x1 conv (stride ``strides``) + BN
    when the shape changes. With ``explicit_padding`` a strided 3x3 conv is
    ``ZeroPadding2D(1)`` + ``padding="valid"`` (PyTorch's symmetric padding,
    so torchvision weights give the same outputs); otherwise ``"same"``.
    """
    in_filters = x.shape[-1]
    shortcut = x
    if strides != 1 or in_filters != filters:
        shortcut = b.conv(x, filters, 1, strides=strides, name=f"{prefix}_downsample_conv")
        shortcut = b.bn(shortcut, name=f"{prefix}_downsample_bn")
    if strides != 1 and explicit_padding:
        y = L.ZeroPadding2D(1, name=f"{prefix}_pad1")(x)
        y = b.conv(y, filters, 3, strides=strides, padding="valid", name=f"{prefix}_conv1")
    else:
        y = b.conv(x, filters, 3, strides=strides, name=f"{prefix}_conv1")
    y = b.bn(y, name=f"{prefix}_bn1")
    y = L.ReLU(name=f"{prefix}_relu1")(y)
    y = b.conv(y, filters, 3, name=f"{prefix}_conv2")
    y = b.bn(y, name=f"{prefix}_bn2")
    y = L.Add(name=f"{prefix}_add")([y, shortcut])
    return L.ReLU(name=f"{prefix}_out")(y)


def _imagenet_resnet(builder, blocks, num_classes, input_shape, bn_momentum, weight_decay, name):
    shape = _check_options(builder, num_classes, input_shape, bn_momentum, weight_decay,
                           min_size=32)
    b = _Builder(bn_momentum, weight_decay)
    inputs = keras.Input(shape, name="image")
    # Stem: 7x7/2 conv (pad 3), BN, ReLU, 3x3/2 max pool (pad 1), padded like
    # torchvision. Zero padding before the max pool equals -inf padding
    # because the pool's input is a ReLU output (>= 0).
    x = L.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = b.conv(x, 64, 7, strides=2, padding="valid", name="conv1")
    x = b.bn(x, name="bn1")
    x = L.ReLU(name="relu")(x)
    x = L.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = L.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, (n_blocks, filters) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for block in range(n_blocks):
            strides = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(b, x, filters, strides, f"layer{stage}_{block}",
                             explicit_padding=True)
    x = L.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = b.head(x, num_classes, name="fc")
    return keras.Model(inputs, outputs, name=name)


_IMAGENET_RESNET_DOC = """ImageNet ResNet-{depth} (He et al., "Deep Residual Learning for Image
    Recognition", CVPR 2016, Table 1), the torchvision layout.

    7x7/2 stem conv (64) + BN + ReLU + 3x3/2 max pool; basic blocks {blocks}
    with 64/128/256/512 filters (stages 2-4 start with stride 2); projection
    shortcuts (1x1 conv + BN, option B) where the shape changes; global
    average pooling; Dense head producing logits (no softmax).
    Post-activation blocks (conv -> BN -> ReLU; conv-BN-ReLU-conv-BN, Add, ReLU)
    with bias-free convs, so every BatchNorm directly follows a conv and folds
    into it at integer export. Padding is explicit and symmetric as in PyTorch
    (``ZeroPadding2D`` before the 7x7 and strided 3x3 convs and the max pool), so layer
    names and weights map one to one onto torchvision's ``resnet{depth}``
    (``layer1_0_conv1`` is ``layer1.0.conv1``). BatchNorm epsilon 1e-5.

    {params:,} trainable parameters for 1000 classes (torchvision's count; the
    BatchNorm moving statistics add as many non-trainable ones as BatchNorm
    has gamma and beta). Inputs need at least 32x32 pixels.

    Args:
        num_classes: number of logits (>= 2).
        input_shape: ``(height, width, channels)``.
        bn_momentum: BatchNorm moving-average momentum (Keras convention).
        weight_decay: L2 factor on every conv and dense kernel (0: none).
        name: model name.
    """


def resnet18(num_classes=1000, input_shape=(224, 224, 3), *, bn_momentum=0.99,
             weight_decay=0.0, name="resnet18"):
    return _imagenet_resnet("resnet18", (2, 2, 2, 2), num_classes, input_shape, bn_momentum,
                            weight_decay, name)


def resnet34(num_classes=1000, input_shape=(224, 224, 3), *, bn_momentum=0.99,
             weight_decay=0.0, name="resnet34"):
    return _imagenet_resnet("resnet34", (3, 4, 6, 3), num_classes, input_shape, bn_momentum,
                            weight_decay, name)


resnet18.__doc__ = _IMAGENET_RESNET_DOC.format(depth=18, blocks="[2, 2, 2, 2]",
                                               params=11_689_512)
resnet34.__doc__ = _IMAGENET_RESNET_DOC.format(depth=34, blocks="[3, 4, 6, 3]",
                                               params=21_797_672)


def resnet20(num_classes=10, input_shape=(32, 32, 3), *, bn_momentum=0.9, weight_decay=0.0,
             name="resnet20"):
    """CIFAR ResNet-20 (He et al., "Deep Residual Learning for Image Recognition",
    CVPR 2016, §4.2, n = 3).

    3x3 stem conv (16) + BN + ReLU; three stages of three basic blocks with
    16/32/64 filters (stages 2 and 3 start with stride 2); global average
    pooling; Dense head producing logits. Post-activation blocks with bias-free
    convs: every BatchNorm directly follows a conv and folds into it at export.

    Downsampling shortcuts are option B (1x1 conv + BN) rather than the
    paper's option A (strided identity zero-padded in channels): option A's
    channel padding has no clean int8 mapping, a 1x1 conv does. The two
    projections add 2,752 trainable parameters to option A's 269,722: 272,474
    trainable (0.27 M, as in the paper's Table 6) plus 1,568 non-trainable
    BatchNorm statistics, for 10 classes.
    Convolutions use ``padding="same"``. Inputs need at least 8x8 pixels (the
    last stage then sees 2x2).

    Args:
        num_classes: number of logits (>= 2).
        input_shape: ``(height, width, channels)``.
        bn_momentum: BatchNorm moving-average momentum (Keras convention).
        weight_decay: L2 factor on every conv and dense kernel (0: none).
        name: model name.
    """
    shape = _check_options("resnet20", num_classes, input_shape, bn_momentum, weight_decay,
                           min_size=8)
    b = _Builder(bn_momentum, weight_decay)
    inputs = keras.Input(shape, name="image")
    x = b.conv(inputs, 16, 3, name="conv1")
    x = b.bn(x, name="bn1")
    x = L.ReLU(name="relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(3):
            strides = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(b, x, filters, strides, f"layer{stage}_{block}",
                             explicit_padding=False)
    x = L.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = b.head(x, num_classes, name="fc")
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------
# AlexNet
# --------------------------------------------------------------------------

# (filters, kernel, stride, padding, max pool after) of the five convolutions.
_ALEXNET_CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
                  (256, 3, 1, 1, False), (256, 3, 1, 1, True))


def _alexnet_feature_size(size):
    """Spatial size after AlexNet's features for an input of ``size`` (<= 0: too small)."""
    for _, kernel, stride, pad, pool in _ALEXNET_CONVS:
        size = (size + 2 * pad - kernel) // stride + 1
        if size < 1:
            return 0
        if pool:
            size = (size - 3) // 2 + 1
            if size < 1:
                return 0
    return size


def _alexnet_min_size():
    size = 1
    while _alexnet_feature_size(size) < 1:
        size += 1
    return size


def alexnet(num_classes=1000, input_shape=(224, 224, 3), *, bn_momentum=0.99, weight_decay=0.0,
            dropout=0.5, name="alexnet"):
    """AlexNet (Krizhevsky et al., "ImageNet Classification with Deep Convolutional
    Neural Networks", NIPS 2012), single-tower torchvision layout, with BatchNorm.

    Conv 64 11x11/4 (pad 2), max pool 3/2, conv 192 5x5 (pad 2), max pool,
    conv 384 3x3, conv 256 3x3, conv 256 3x3 (pad 1), max pool, flatten
    (6x6x256 = 9216 at 224x224), dropout, fc 4096, dropout, fc 4096, fc
    ``num_classes`` (logits). Each conv and the two hidden fc layers are
    bias-free and followed by BatchNorm + ReLU: BatchNorm replaces the paper's
    local response normalization, which has no int8 TFLite kernel, and folds
    into the preceding layer at export. Padding is explicit and symmetric as in
    PyTorch (``ZeroPadding2D`` + ``padding="valid"``).

    At 224x224 and 1000 classes: 61,110,184 trainable parameters (torchvision's
    61,100,840, less the 9,344 biases BatchNorm makes redundant, plus 2 x 9,344
    BatchNorm gamma and beta) and 18,688 non-trainable BatchNorm statistics.
    There is no adaptive pooling: another input size changes the flatten size
    and the first fc layer. Inputs need at least 63x63 pixels.

    Args:
        num_classes: number of logits (>= 2).
        input_shape: ``(height, width, channels)``.
        bn_momentum: BatchNorm moving-average momentum (Keras convention).
        weight_decay: L2 factor on every conv and dense kernel (0: none).
        dropout: dropout rate before each hidden fc layer (0 disables).
        name: model name.
    """
    shape = _check_options("alexnet", num_classes, input_shape, bn_momentum, weight_decay,
                           min_size=_alexnet_min_size())
    if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"alexnet: dropout must be in [0, 1), got {dropout!r}.")
    b = _Builder(bn_momentum, weight_decay)
    inputs = keras.Input(shape, name="image")
    x = inputs
    n_pool = 0
    for i, (filters, kernel, stride, pad, pool) in enumerate(_ALEXNET_CONVS, start=1):
        x = L.ZeroPadding2D(pad, name=f"conv{i}_pad")(x)
        x = b.conv(x, filters, kernel, strides=stride, padding="valid", name=f"conv{i}")
        x = b.bn(x, name=f"bn{i}")
        x = L.ReLU(name=f"relu{i}")(x)
        if pool:
            n_pool += 1
            x = L.MaxPooling2D(3, strides=2, name=f"pool{n_pool}")(x)
    x = L.Flatten(name="flatten")(x)
    for i in (6, 7):
        if dropout:
            x = L.Dropout(dropout, name=f"dropout{i}")(x)
        x = b.dense(x, 4096, use_bias=False, name=f"fc{i}")
        x = b.bn(x, name=f"bn{i}")
        x = L.ReLU(name=f"relu{i}")(x)
    outputs = b.head(x, num_classes, name="fc8")
    return keras.Model(inputs, outputs, name=name)
