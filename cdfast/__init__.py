"""cdfast: fast, trustworthy Competitive Distillation for PyTorch.

Public API:

- :class:`CompetitiveDistillation`: a group of N >= 2 networks and its training step.
- The functional losses for your own loop: :func:`competitive_ce`, :func:`elect_teacher`,
  :func:`student_loss`, :func:`group_student_loss`, :func:`weighted_student_loss`,
  :func:`distillation_weights` (pure-PyTorch twins in :mod:`cdfast.reference`).
- :class:`CompetitiveLoss` (:mod:`cdfast.nn`): the whole loss as an ``nn.Module``.
- :mod:`cdfast.perturb`, :mod:`cdfast.models` (``FeatureTap`` for logits-only models),
  :mod:`cdfast.data`, :mod:`cdfast.train`, :mod:`cdfast.distributed`, :mod:`cdfast.placement`.
"""

from cdfast.algorithm import CompetitiveDistillation, GroupLosses, StepResult
from cdfast.functional import (
    competitive_ce,
    distillation_weights,
    elect_teacher,
    group_student_loss,
    pairwise_feature_l2,
    student_loss,
    weighted_student_loss,
)
from cdfast.nn import CompetitiveLoss, CompetitiveLossOutput
from cdfast.perturb import PerturbationPool

__version__ = "0.1.0"

__all__ = [
    "CompetitiveDistillation", "GroupLosses", "StepResult", "PerturbationPool", "CompetitiveLoss",
    "CompetitiveLossOutput",
    "competitive_ce", "elect_teacher", "student_loss", "group_student_loss",
    "weighted_student_loss", "pairwise_feature_l2", "distillation_weights",
]
