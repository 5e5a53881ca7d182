"""Tests of the model builders in ``qil_keras.models``.

Parameter counts are checked against published figures (torchvision) or
against a derivation by hand written next to the assertion. Each large model
is built once per module; only one forward pass at 224x224 (batch 1) is run.
"""

import functools
import importlib.util
import pathlib

import numpy as np
import pytest

import qil_keras
from qil_keras import models
from qil_keras._keras import keras

L = keras.layers
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def trainable(model):
    return _count(model.trainable_weights)


def non_trainable(model):
    return _count(model.non_trainable_weights)


def bn_channels(model):
    return sum(layer.gamma.shape[0] for layer in model.layers
               if isinstance(layer, L.BatchNormalization))


@functools.lru_cache(maxsize=None)
def built(builder_name):
    """Each default model built once for the whole module."""
    return getattr(models, builder_name)()


ALL_BUILDERS = ("small_cnn", "small_mobilenet", "resnet20", "resnet18", "resnet34", "alexnet")


# --------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------

def test_resnet18_parameter_count_matches_torchvision():
    # torchvision's resnet18 has 11,689,512 parameters: conv kernels (no conv
    # biases), BatchNorm weight+bias (= Keras gamma+beta, trainable) and the fc
    # layer. BatchNorm's running mean/var are buffers there, not parameters;
    # in Keras they are the non-trainable weights. So: trainable == 11,689,512,
    # non-trainable == 2 x (BatchNorm channels) = 2 x 4,800.
    model = built("resnet18")
    assert trainable(model) == 11_689_512
    assert non_trainable(model) == 2 * bn_channels(model) == 9_600
    assert model.count_params() == 11_689_512 + 9_600


def test_resnet34_parameter_count_matches_torchvision():
    # Same derivation as ResNet-18: torchvision's resnet34 has 21,797,672
    # parameters = Keras trainable weights; BatchNorm statistics 2 x 8,512.
    model = built("resnet34")
    assert trainable(model) == 21_797_672
    assert non_trainable(model) == 2 * bn_channels(model) == 17_024


def test_small_mobilenet_parameter_count():
    # 1 input channel, 10 classes. Kernels: stem 3·3·1·16 = 144; depthwise 3·3·16, 3·3·16,
    # 3·3·32 = 144 + 144 + 288; pointwise 16·16, 16·32, 32·32 = 256 + 512 + 1,024; head
    # 32·10 + 10 = 330. BatchNorm γ, β over 16+16+16+16+32+32+32 = 160 channels: 320
    # trainable, and 320 moving statistics. 144 + 576 + 1,792 + 330 + 320 = 3,162.
    model = built("small_mobilenet")
    assert trainable(model) == 3_162
    assert non_trainable(model) == 2 * bn_channels(model) == 320


def test_alexnet_parameter_count():
    # torchvision alexnet (biases everywhere, no BatchNorm): 61,100,840.
    # Ours, 224x224 input, padding 2/2/1/1/1 as torchvision, so the flatten is
    # 6x6x256 = 9216 as there:
    #   conv1 11*11*3*64     =     23,232    bn1  2*64   trainable
    #   conv2 5*5*64*192     =    307,200    bn2  2*192
    #   conv3 3*3*192*384    =    663,552    bn3  2*384
    #   conv4 3*3*384*256    =    884,736    bn4  2*256
    #   conv5 3*3*256*256    =    589,824    bn5  2*256
    #   fc6   9216*4096      = 37,748,736    bn6  2*4096
    #   fc7   4096*4096      = 16,777,216    bn7  2*4096
    #   fc8   4096*1000+1000 =  4,097,000
    # Layers followed by BatchNorm drop their bias: 64+192+384+256+256+4096+4096
    # = 9,344 biases fewer than torchvision, and BatchNorm adds gamma+beta
    # (2 x 9,344 = 18,688 trainable) and moving mean+variance (18,688
    # non-trainable). Trainable = 61,100,840 - 9,344 + 18,688 = 61,110,184.
    model = built("alexnet")
    assert trainable(model) == 61_100_840 - 9_344 + 18_688 == 61_110_184
    assert non_trainable(model) == 2 * bn_channels(model) == 18_688
    assert model.get_layer("flatten").output_shape == (None, 6 * 6 * 256)


def test_resnet20_parameter_count():
    # CIFAR ResNet-20 with option-B (1x1 conv + BN) downsampling shortcuts.
    # Trainable (kernels; BN gamma+beta = 2 x channels):
    #   stem     3*3*3*16 + 2*16                                   =     464
    #   stage 1  3 blocks x (2 x 3*3*16*16 + 2 x 2*16)             =  14,016
    #   stage 2  first: 3*3*16*32 + 3*3*32*32 + 1*1*16*32 + 3*2*32 =  14,528
    #            2 more x (2 x 3*3*32*32 + 2 x 2*32)               =  37,120
    #   stage 3  first: 3*3*32*64 + 3*3*64*64 + 1*1*32*64 + 3*2*64 =  57,728
    #            2 more x (2 x 3*3*64*64 + 2 x 2*64)               = 147,968
    #   fc       64*10 + 10                                        =     650
    #   total                                                      = 272,474
    # (option A, without the two projections and their BN: 269,722, the usual
    # "0.27 M"). BatchNorm channels 16 + 6*16 + 7*32 + 7*64 = 784, so
    # 1,568 non-trainable moving statistics.
    model = built("resnet20")
    assert trainable(model) == 272_474
    assert 260_000 <= trainable(model) <= 280_000
    assert bn_channels(model) == 784
    assert non_trainable(model) == 1_568


def test_small_cnn_is_the_quickstart_network():
    # conv 3*3*1*16 + bn 32 + conv 3*3*16*32 + bn 64 + conv 3*3*32*32 + bn 64
    # + dense 32*10+10 = 144 + 32 + 4,608 + 64 + 9,216 + 64 + 330 = 14,458.
    model = built("small_cnn")
    assert trainable(model) == 14_458
    assert non_trainable(model) == 160

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    reference = quickstart.build_cnn()

    def architecture(m):
        out = []
        for layer in m.layers:
            config = {k: v for k, v in layer.get_config().items() if k != "name"}
            out.append((type(layer).__name__, config))
        return out

    assert architecture(model) == architecture(reference)
    assert [l.input_shape for l in model.layers] == [l.input_shape for l in reference.layers]


# --------------------------------------------------------------------------
# shapes and forward pass
# --------------------------------------------------------------------------

@pytest.mark.parametrize("builder,input_shape,num_classes", [
    ("small_cnn", (28, 28, 1), 10),
    ("resnet20", (32, 32, 3), 10),
    ("resnet18", (224, 224, 3), 1000),
    ("resnet34", (224, 224, 3), 1000),
    ("alexnet", (224, 224, 3), 1000),
])
def test_default_shapes_and_names(builder, input_shape, num_classes):
    model = built(builder)
    assert model.name == builder
    assert model.built
    assert model.input_shape == (None, *input_shape)
    assert model.output_shape == (None, num_classes)


def test_resnet_stage_shapes_at_224():
    model = built("resnet18")
    assert model.get_layer("relu").output_shape == (None, 112, 112, 64)
    assert model.get_layer("maxpool").output_shape == (None, 56, 56, 64)
    for stage, (size, filters) in enumerate(((56, 64), (28, 128), (14, 256), (7, 512)), 1):
        assert model.get_layer(f"layer{stage}_1_out").output_shape == (None, size, size, filters)


def test_one_forward_pass_at_224():
    model = built("resnet18")
    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    y = model(x, training=False).numpy()
    assert y.shape == (1, 1000)
    assert np.all(np.isfinite(y))


def test_options_change_classes_input_and_name():
    model = models.resnet20(num_classes=100, input_shape=(16, 16, 1), name="tiny")
    assert model.name == "tiny"
    assert model.output_shape == (None, 100)
    assert model.get_layer("layer3_2_out").output_shape == (None, 4, 4, 64)
    y = model(np.zeros((2, 16, 16, 1), np.float32), training=False)
    assert y.shape == (2, 100)
    small = models.resnet18(num_classes=5, input_shape=(64, 64, 3))
    assert small.output_shape == (None, 5)
    assert small.get_layer("layer4_1_out").output_shape == (None, 2, 2, 512)
    assert models.alexnet(num_classes=10, input_shape=(63, 63, 3)).output_shape == (None, 10)


# --------------------------------------------------------------------------
# structure: BatchNorm folds, known layer roles
# --------------------------------------------------------------------------

@pytest.mark.parametrize("builder", ALL_BUILDERS)
def test_every_batchnorm_follows_a_bias_free_conv_or_dense(builder):
    model = built(builder)
    bns = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    assert bns
    for bn in bns:
        producer = bn.input.node.layer
        assert isinstance(producer, (L.Conv2D, L.DepthwiseConv2D, L.Dense)), (bn.name,
                                                                              producer.name)
        assert not producer.use_bias, producer.name
        # the producer feeds only this BatchNorm, so folding changes nothing else
        assert len(producer.outbound_nodes) == 1, producer.name
    for layer in model.layers:
        if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D)):
            assert not layer.use_bias, layer.name
            assert any(isinstance(n.layer, L.BatchNormalization) for n in layer.outbound_nodes)


@pytest.mark.parametrize("builder", ALL_BUILDERS)
def test_only_layers_quantize_knows(builder):
    for layer in built(builder).layers:
        if not isinstance(layer, L.InputLayer):
            assert type(layer) in qil_keras.LAYER_ROLES, (layer.name, type(layer).__name__)


def test_post_activation_block_layout():
    model = built("resnet18")
    add = model.get_layer("layer2_0_add")
    sources = {t.node.layer.name for t in add.input}
    assert sources == {"layer2_0_bn2", "layer2_0_downsample_bn"}
    assert model.get_layer("layer2_0_out").input.node.layer is add
    identity = model.get_layer("layer2_1_add")
    assert {t.node.layer.name for t in identity.input} == {"layer2_1_bn2", "layer2_0_out"}
    assert model.get_layer("layer2_0_downsample_conv").kernel_size == (1, 1)


@pytest.mark.parametrize("builder,momentum", [
    ("small_cnn", 0.9), ("resnet20", 0.9), ("resnet18", 0.99), ("alexnet", 0.99)])
def test_default_bn_momentum(builder, momentum):
    bns = [l for l in built(builder).layers if isinstance(l, L.BatchNormalization)]
    assert {l.momentum for l in bns} == {momentum}


def test_bn_momentum_and_weight_decay_options():
    model = models.resnet20(bn_momentum=0.8, weight_decay=1e-4)
    bns = [l for l in model.layers if isinstance(l, L.BatchNormalization)]
    assert {l.momentum for l in bns} == {0.8}
    kernels = [l for l in model.layers if isinstance(l, (L.Conv2D, L.Dense))]
    assert len(model.losses) == len(kernels) == 19 + 2 + 1  # 19 convs, 2 projections, fc
    expected = sum(1e-4 * np.sum(l.kernel.numpy() ** 2) for l in kernels)
    np.testing.assert_allclose(sum(float(v) for v in model.losses), expected, rtol=1e-5)
    assert not built("resnet20").losses
    for builder in ("small_cnn", "alexnet"):
        kwargs = {"input_shape": (63, 63, 3)} if builder == "alexnet" else {}
        m = getattr(models, builder)(weight_decay=1e-4, **kwargs)
        assert len(m.losses) == sum(isinstance(l, (L.Conv2D, L.Dense)) for l in m.layers)


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"num_classes": True}, "num_classes"),
    ({"input_shape": (32, 32)}, "rank 3"),
    ({"input_shape": (1, 32, 32, 3)}, "rank 3"),
    ({"input_shape": 32}, "input_shape"),
    ({"input_shape": (None, 32, 3)}, "positive integers"),
    ({"input_shape": (32, 32, 0)}, "positive integers"),
    ({"input_shape": (4, 4, 3)}, "too small"),
    ({"bn_momentum": 1.0}, "bn_momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"),
])
def test_resnet20_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.resnet20(**kwargs)


def test_too_small_inputs_for_imagenet_models():
    with pytest.raises(ValueError, match="at least 32x32"):
        models.resnet18(input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="at least 63x63"):
        models.alexnet(input_shape=(62, 224, 3))
    with pytest.raises(ValueError, match="dropout"):
        models.alexnet(input_shape=(63, 63, 3), dropout=1.0)
    with pytest.raises(ValueError, match="too small"):
        models.small_cnn(input_shape=(3, 3, 1))


# --------------------------------------------------------------------------
# quantize and serialization
# --------------------------------------------------------------------------

def test_resnet20_quantizes_to_2_bits_with_no_float_layers():
    model = qil_keras.quantize(built("resnet20"), 2, 2)
    report = model.qil_report
    assert not report.float_layers
    assert not [row for row in report.rows if row.action == "float"]
    quantized = {row.layer: row for row in report.rows if row.action == "quantized"}
    assert quantized["conv1"].w_bits == 8 and quantized["fc"].w_bits == 8
    assert quantized["layer2_0_conv1"].w_bits == 2
    assert quantized["layer2_0_downsample_conv"].w_bits == 2
    y = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert y.shape == (2, 10)


def test_small_cnn_quantizes_with_no_float_layers():
    model = qil_keras.quantize(built("small_cnn"), 4, 4)
    assert not model.qil_report.float_layers


def test_resnet20_keras_round_trip(tmp_path):
    model = models.resnet20(weight_decay=1e-4)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    model(x, training=True)  # move BatchNorm statistics away from their initial values
    expected = model(x, training=False).numpy()
    path = tmp_path / "resnet20.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.name == "resnet20"
    assert trainable(loaded) == 272_474
    assert len(loaded.losses) == len(model.losses)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_old_flat_module_paths_still_import():
    """Issue #18: the modules moved into subpackages; the flat paths of earlier versions are
    aliases of the same module objects, public and private names alike."""
    import importlib

    import qil_keras
    from qil_keras.data import embedded_mnist  # the old module qil_keras.data is now a package
    from qil_keras.export import export_tflite, run_tflite  # noqa: F401
    from qil_keras.lowering import lower  # noqa: F401

    for old, new in [("layers", "quantization.layers"), ("export", "integer.export"),
                     ("batchnorm", "training.batchnorm"), ("harness", "deployment.harness"),
                     ("datasets", "data.datasets"), ("ties", "integer.ties")]:
        assert importlib.import_module(f"qil_keras.{old}") is importlib.import_module(
            f"qil_keras.{new}")
        assert getattr(qil_keras, old) is importlib.import_module(f"qil_keras.{new}")
    assert embedded_mnist is qil_keras.data.mnist.embedded_mnist
    assert export_tflite is qil_keras.export_tflite
