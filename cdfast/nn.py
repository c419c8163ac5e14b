"""The Competitive Distillation loss as an ``nn.Module``, for frameworks that compose modules."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from cdfast import functional as CF
from cdfast.distributed import global_mean, resolve_process_group
from cdfast.options import check_flag, check_option, check_teachers

__all__ = ["CompetitiveLoss", "CompetitiveLossOutput"]


class CompetitiveLossOutput(NamedTuple):
    loss: Tensor         # scalar: the sum of every network's loss (backward gives each exactly its own gradient)
    per_network: Tensor  # [N]: ce + distill
    ce: Tensor           # [N] cross-entropy on the (possibly mixed) targets
    distill: Tensor      # [N] distillation terms (0 for the teacher)
    teacher: Tensor      # 0-d int64 device tensor: the elected network


class CompetitiveLoss(nn.Module):
    """Cross-entropy of every network, the election, and the student losses, in one module.

    ``forward(logits, targets, feats=None, *, targets_b=None, lam=None)``: ``logits`` stacked
    ``[N, B, K]`` or a list of the N networks' ``[B, K]``; ``feats`` likewise (``[N, B, ...]``)
    or None; ``targets [B]`` (or ``[N, B]``) class indices or ``[B, K]`` class probabilities;
    ``targets_b`` / ``lam [N]`` for mixed labels; ``label_smoothing`` / ``ignore_index`` as in
    ``F.cross_entropy``.
    ``mode`` / ``teachers`` / weights as :class:`cdfast.CompetitiveDistillation` takes them;
    ``process_group``: None (the default) elects from this process's batch; under data
    parallelism pass ``"auto"`` (or a group) to elect from the global batch, as
    :class:`cdfast.CompetitiveDistillation` does by default (see :func:`cdfast.competitive_ce`).
    No parameters; nothing is read on the host.
    """

    def __init__(self, *, mode: str = "competitive", teachers: str = "best", temperature: float = 1.0,
                 alpha: float = 1.0, beta: float = 1.0, feature_loss: bool = True, label_smoothing: float = 0.0,
                 ignore_index: int | None = None, process_group=None):
        super().__init__()
        check_teachers(mode, teachers)
        self.mode, self.teachers = mode, teachers
        self.temperature, self.alpha = check_option("temperature", temperature), check_option("alpha", alpha)
        self.beta = check_option("beta", beta)
        self.feature_loss = check_flag("feature_loss", feature_loss) and self.beta != 0.0 and mode != "independent"
        self.process_group = process_group
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index  # checked by competitive_ce

    def forward(self, logits: Tensor | Sequence[Tensor], targets: Tensor, feats: Tensor | Sequence[Tensor] | None = None,
                *, targets_b: Tensor | None = None, lam: Tensor | None = None) -> CompetitiveLossOutput:
        logits = CF._stack(logits)
        ce, teacher = CF.competitive_ce(logits, targets, targets_b, lam, label_smoothing=self.label_smoothing,
                                        ignore_index=self.ignore_index, process_group=self.process_group)
        if self.feature_loss and feats is None:
            raise ValueError("feature_loss is on but no feats were given; pass every network's features "
                             "(cdfast.models.FeatureTap takes them from logits-only models) or feature_loss=False")
        feats = CF._stack(feats, "feats") if self.feature_loss else None
        kw = dict(temperature=self.temperature, alpha=self.alpha, beta=self.beta)
        if self.mode == "independent":
            distill = torch.zeros_like(ce)
        elif self.mode == "competitive" and self.teachers == "best":
            distill = CF.group_student_loss(logits, feats, teacher, **kw)
        else:
            group = resolve_process_group(self.process_group)
            score = global_mean(ce, logits.shape[-2], group) if group is not None else ce.detach()
            weights = CF.distillation_weights(score, self.mode, self.teachers, teacher=teacher)
            pair = CF.pairwise_feature_l2(feats, teachers=(weights != 0).any(0)) if feats is not None else None
            distill = CF.weighted_student_loss(logits, pair, weights, **kw)
        per_network = ce + distill
        return CompetitiveLossOutput(per_network.sum(), per_network, ce, distill, teacher)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, teachers={self.teachers!r}, temperature={self.temperature}, alpha={self.alpha}, "
                f"beta={self.beta}, feature_loss={self.feature_loss}")
