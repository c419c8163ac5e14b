"""torchvision classification models, wrapped to return ``(logits, pooled features)``."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

HEAD_ATTRS = ("fc", "classifier", "head", "heads")


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None))
                return
    raise ValueError(f"cannot adapt {type(model).__name__} to {in_channels} input channels: no Conv2d found")


class TorchvisionClassifier(nn.Module):
    """A torchvision model split into backbone (up to the pooled features) and classifier head."""

    def __init__(self, name: str, num_classes: int, in_channels: int = 3, features: str = "pooled"):
        super().__init__()
        import torchvision

        if features != "pooled":
            raise ValueError(f"torchvision model {name!r} gives pooled features only; use features='pooled'")
        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        attr = next((a for a in HEAD_ATTRS if isinstance(getattr(model, a, None), nn.Module)), None)
        if attr is None:
            raise ValueError(f"torchvision model {name!r} has no classifier head among {HEAD_ATTRS}")
        self.head = getattr(model, attr)
        setattr(model, attr, nn.Identity())
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        self.backbone = model
        self.name, self.num_classes, self.in_channels, self.features = name, num_classes, in_channels, features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.backbone(x)
        return self.head(feats), feats.flatten(1)
