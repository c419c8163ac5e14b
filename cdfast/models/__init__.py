"""Model zoo: every model returns ``(logits, features)``; see :func:`build_model`."""

from __future__ import annotations

import re

import torch.nn as nn

from cdfast.models.adapters import FeatureAdapters, probe_feature_shapes
from cdfast.models.base import FEATURE_MODES, FeatureClassifier, split_output
from cdfast.models.feature_tap import FeatureTap
from cdfast.models.cifar_resnet import CifarResNet, cifar_resnet
from cdfast.models.mobilenetv2 import MobileNetV2
from cdfast.models.torchvision_models import TorchvisionClassifier, torchvision_names
from cdfast.models.wrn import WideResNet

__all__ = [
    "build_model", "check_model_name", "available_models", "FeatureAdapters", "FeatureClassifier",
    "CifarResNet", "WideResNet", "MobileNetV2", "TorchvisionClassifier", "FEATURE_MODES", "split_output",
    "probe_feature_shapes", "FeatureTap",
]

_CIFAR_RESNET = re.compile(r"^resnet(\d+)(x4)?$")
_WRN = re.compile(r"^wrn[-_](\d+)[-_](\d+)$")
CIFAR_RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


def available_models() -> dict[str, list[str]]:
    """Names :func:`build_model` accepts, by family."""
    return {
        "cifar": [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS] + ["resnet8x4", "resnet32x4", "wrn-D-K (e.g. wrn-16-2, wrn-40-2)", "mobilenetv2"],
        "torchvision": torchvision_names(),
    }


def _resolve(name: str):
    """(constructor, kwargs) for a model name, or a ValueError listing what exists."""
    key = name.strip().lower()
    forced = key.startswith("cifar:")  # cifar:resnet50: the CIFAR network even where torchvision has the name
    key = key.removeprefix("cifar:")
    if not key.startswith("tv:"):
        if m := _CIFAR_RESNET.match(key):
            depth, wide = int(m.group(1)), m.group(2) is not None
            # a 6n+2 depth, unless torchvision has the name: resnet50 and resnet152 are ImageNet's
            if (depth - 2) % 6 == 0 and depth >= 8 and (forced or wide or key not in torchvision_names()):
                return cifar_resnet, dict(depth=depth, wide=wide)
        if m := _WRN.match(key):
            return WideResNet, dict(depth=int(m.group(1)), width=int(m.group(2)))
        if key in ("mobilenetv2", "mobilenet_v2_cifar"):
            return MobileNetV2, {}
    tv_name = key.removeprefix("tv:")
    if tv_name in torchvision_names():
        return TorchvisionClassifier, dict(name=tv_name)
    families = available_models()
    raise ValueError(
        f"unknown model {name!r}. CIFAR-style models: {', '.join(families['cifar'])}; "
        f"or any torchvision classification model, e.g. resnet18, resnet50, mobilenet_v3_small "
        f"(run `cdfast models` for the full list)"
    )


def check_model_name(name: str) -> None:
    """Raise the error :func:`build_model` would raise for an unknown name, without building anything."""
    _resolve(name)


def build_model(name: str, num_classes: int, in_channels: int = 3, features: str = "pooled") -> nn.Module:
    """Build a model by name.

    CIFAR-style (small images, any size): ``resnet8 ... resnet110`` (6n+2, except the names
    torchvision has: ``resnet50`` and ``resnet152`` are the ImageNet ResNets; ``cifar:resnet50``
    forces the CIFAR one, as the name built before 2026-11-27),
    ``resnet8x4``, ``resnet32x4``, ``wrn-D-K``, ``mobilenetv2``.
    Any torchvision classification model by its name (``resnet18``, ``resnet50``,
    ``mobilenet_v3_small``, ...), or with a ``tv:`` prefix to force torchvision.
    """
    constructor, kwargs = _resolve(name)
    return constructor(**kwargs, num_classes=num_classes, in_channels=in_channels, features=features)
