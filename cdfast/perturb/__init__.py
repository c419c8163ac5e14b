"""Stochastic perturbations (the paper's "mutations") applied to one network's batch per step."""

from cdfast.perturb.ops import (
    ClampedNoise,
    CutMix,
    ElasticWarp,
    GaussianNoise,
    Mixup,
    Perturbed,
    PerturbRNG,
    JitterBlur,
    RandomAffine,
    RandomFlip,
    RandomResizedCrop,
    RandomRotation,
)
from cdfast.perturb.pool import DEFAULT_OPS, OPS, PRESETS, PerturbationPool, PerturbOp, expand_presets, pixel_levels

__all__ = [
    "PerturbationPool", "PerturbOp", "Perturbed", "PerturbRNG", "OPS", "DEFAULT_OPS", "PRESETS", "expand_presets",
    "pixel_levels",
    "RandomResizedCrop", "GaussianNoise", "Mixup", "CutMix", "RandomAffine", "ElasticWarp",
    "ClampedNoise", "JitterBlur", "RandomFlip", "RandomRotation",
]
