"""Features from classifiers that return only logits (torchvision, timm), for the feature loss."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

__all__ = ["FeatureTap"]


class FeatureTap(nn.Module):
    """Wraps a logits-only classifier so that it returns ``(logits, features)``.

    ``layer``: the name of a submodule (as in ``model.named_modules()``, e.g. ``"avgpool"`` for
    torchvision's ResNets) whose output is the feature, taken by a forward hook during the
    model's own forward (maps are flattened to ``[B, D]`` unless ``flatten=False``). ``None``:
    the model's ``forward_features`` / ``forward_head(..., pre_logits=True)`` / ``get_classifier()``
    (timm's API), so the feature is the pooled pre-logits vector. The wrapped model is
    ``.model``: its state_dict keys gain the prefix ``model.`` (``cdfast export`` strips it).
    """

    def __init__(self, model: nn.Module, layer: str | None = None, flatten: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureTap wraps an nn.Module, got {type(model).__name__}")
        self.model, self.layer, self.flatten = model, layer, flatten
        self.num_classes = getattr(model, "num_classes", None)
        if layer is None:
            missing = [a for a in ("forward_features", "forward_head", "get_classifier") if not hasattr(model, a)]
            if missing:
                raise ValueError(f"{type(model).__name__} has no {', '.join(missing)} (timm's API); name the layer "
                                 f"whose output is the feature: FeatureTap(model, layer=...), e.g. one of "
                                 f"{_last_layers(model)}")
            return
        modules = dict(model.named_modules())
        if layer not in modules or layer == "":
            raise ValueError(f"{type(model).__name__} has no layer {layer!r}; its last layers: {_last_layers(model)}")
        # The hook records only during this wrapper's own forward (armed), into one slot cleared
        # afterwards: a forward of the bare model, or of a copy of it, keeps nothing alive.
        self._armed, self._kept = False, None
        self._handle = modules[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if self._armed:
            self._kept = output

    def remove(self) -> nn.Module:
        """Take the hook off the model and return the model as it was."""
        if self.layer is not None:
            self._handle.remove()
        return self.model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.layer is None:
            pre = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            return self.model.get_classifier()(pre), pre
        self._armed, self._kept = True, None
        try:
            logits = self.model(x)
            feats = self._kept
        finally:
            self._armed, self._kept = False, None
        if feats is None:
            raise RuntimeError(f"layer {self.layer!r} of {type(self.model).__name__} did not run in its forward; "
                               "tap a layer the forward goes through")
        if not isinstance(feats, Tensor):
            raise TypeError(f"layer {self.layer!r} returned {type(feats).__name__}, not a tensor; tap another layer")
        return logits, feats.flatten(1) if self.flatten and feats.dim() > 2 else feats


def _last_layers(model: nn.Module, k: int = 6) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    return names[-k:]
