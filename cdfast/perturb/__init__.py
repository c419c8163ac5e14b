"""Stochastic perturbations ("mutations") applied to one network's batch per step."""

from cdfast.perturb.ops import (
    CutMix,
    ElasticWarp,
    GaussianNoise,
    Mixup,
    Perturbed,
    PerturbRNG,
    RandomAffine,
    RandomResizedCrop,
)
from cdfast.perturb.pool import DEFAULT_OPS, OPS, PerturbationPool, PerturbOp

__all__ = [
    "PerturbationPool", "PerturbOp", "Perturbed", "PerturbRNG", "OPS", "DEFAULT_OPS",
    "RandomResizedCrop", "GaussianNoise", "Mixup", "CutMix", "RandomAffine", "ElasticWarp",
]
