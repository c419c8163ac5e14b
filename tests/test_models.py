"""The model zoo: every model returns (logits, features) for 1- and 3-channel images."""

import pytest
import torch

from cdfast.models import TorchvisionClassifier, FeatureAdapters, build_model

CIFAR_NAMES = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet8x4", "wrn-16-2", "mobilenetv2"]


@pytest.mark.parametrize("name", CIFAR_NAMES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_cifar_models(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=shape[0])
    logits, feats = model(torch.randn(2, *shape))
    assert logits.shape == (2, 7)
    assert feats.dim() == 2 and feats.shape[0] == 2
    model_map = build_model(name, num_classes=7, in_channels=shape[0], features="map")
    _, fmap = model_map(torch.randn(2, *shape))
    assert fmap.dim() == 4 and fmap.shape[1] == feats.shape[1]


def test_deep_resnets_have_the_right_depth():
    for depth in (44, 56, 110):
        model = build_model(f"resnet{depth}", 10)
        convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
        assert convs + 1 == depth  # 3x3 convs + the classifier
    assert sum(p.numel() for p in build_model("resnet32x4", 100).parameters()) > 7e6


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "tv:resnet18"])
def test_torchvision_models(name):
    model = build_model(name, num_classes=5, in_channels=1)
    logits, feats = model(torch.randn(2, 1, 32, 32))
    assert logits.shape == (2, 5) and feats.dim() == 2


def test_imagenet_resnet_names_are_torchvisions_even_where_the_depth_is_6n_plus_2():
    # resnet50 (6*8+2) and resnet152 (6*25+2) once built 16/32/64-channel CIFAR networks
    from cdfast.models import _resolve

    for name in ("resnet50", "resnet152", "resnet18", "resnet101"):
        assert _resolve(name)[0] is TorchvisionClassifier, name
    for name in ("resnet8", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "resnet1202"):
        assert _resolve(name)[0] is not TorchvisionClassifier, name
    assert sum(p.numel() for p in build_model("resnet50", 1000).parameters()) > 25e6
    assert _resolve("cifar:resnet50") == (_resolve("resnet56")[0], dict(depth=50, wide=False))


def test_unknown_and_bad_models():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9000x", 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet9", 10)  # not 6n+2, and not a torchvision name
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model("wrn-15-2", 10)
    with pytest.raises(ValueError, match="features"):
        build_model("resnet8", 10, features="logits")
    with pytest.raises(ValueError, match="pooled features only"):
        build_model("resnet18", 10, features="map")


def test_adapter_shapes():
    adapters = FeatureAdapters([(64,), (256,), (32, 7, 7), (64, 14, 14)])
    assert "0_0" not in adapters.pairs
    assert adapters.adapt(0, 1, torch.randn(3, 64)).shape == (3, 256)
    assert adapters.adapt(2, 3, torch.randn(3, 32, 7, 7)).shape == (3, 64, 14, 14)
    assert adapters.adapt(3, 2, torch.randn(3, 64, 14, 14)).shape == (3, 32, 7, 7)
    assert adapters.adapt(0, 2, torch.randn(3, 64)).shape == (3, 32, 7, 7)
    assert len(adapters.parameters_of(0)) > 0
    assert FeatureAdapters([(64,), (64,)]).needed is False
