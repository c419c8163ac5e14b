"""The perturbation pool: which network is perturbed this step, and with which op."""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor

from cdfast.perturb.ops import (
    BatchJitterBlur,
    BatchRotation,
    ClampedNoise,
    CutMix,
    ElasticWarp,
    GaussianNoise,
    HorizontalFlip,
    JitterBlur,
    Mixup,
    Perturbed,
    PerturbRNG,
    RandomAffine,
    RandomFlip,
    RandomResizedCrop,
    RandomRotation,
    VerticalFlip,
)

__all__ = ["PerturbationPool", "OPS", "DEFAULT_OPS", "PRESETS", "PerturbOp", "expand_presets", "pixel_levels"]

PerturbOp = Callable[[Tensor, Tensor, PerturbRNG], Perturbed]

OPS: dict[str, type] = {
    op.name: op for op in (RandomResizedCrop, GaussianNoise, Mixup, CutMix, RandomAffine, ElasticWarp,
                           ClampedNoise, JitterBlur, RandomFlip, RandomRotation, BatchJitterBlur, HorizontalFlip,
                           VerticalFlip, BatchRotation)
}
DEFAULT_OPS = ("crop", "noise", "mixup", "cutmix", "affine")
# Named pools: the paper's text (the default), and the authors' released code, which perturbs one
# batch in ten (--perturb-every 10) with one of six ops: mixup, noise of std 1 then a clamp,
# ColorJitter(0.25, 0.15, 0.15, 0.15) + GaussianBlur((7, 9)), hflip, vflip, RandomRotation(30), each
# torchvision transform applied to the whole batch tensor ("authors-code"). "authors" is cdfast's
# first, looser reading of that pool (per-image draws, stronger jitter, one flip op with per-image
# coins, a 5x5 blur), kept because the 2026-11-25..27 grid ran it.
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": DEFAULT_OPS,
    "authors": ("mixup", "noise-clamp", "jitter-blur", "flip", "rotate"),
    "authors-code": ("mixup", "noise-clamp", "jitter-blur-batch", "hflip", "vflip", "rotate-batch"),
}


def pixel_levels(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalized black and white pixel per channel, ``-mean / std`` and ``(1 - mean) / std``:
    the pool's ``fill`` and ``white`` for images normalized with ``(mean, std)``."""
    return tuple(-m / s for m, s in zip(mean, std)), tuple((1 - m) / s for m, s in zip(mean, std))


def group_pool(perturb_ops, seed: int, normalization, perturb: bool) -> "PerturbationPool":
    """The pool of a group (:class:`cdfast.CompetitiveDistillation`, :class:`cdfast.NetworkPerRank`):
    a ready pool as it is, else one built from op names with the levels of ``normalization``
    (``(mean, std)``); warns when perturbing with ops that need levels the pool lacks."""
    if isinstance(perturb_ops, PerturbationPool):
        if normalization is not None:
            raise ValueError("normalization= sets the levels of the pool cdfast builds; a ready PerturbationPool "
                             "takes them itself: PerturbationPool(ops, seed, *cdfast.perturb.pixel_levels(mean, std))")
        pool = perturb_ops
    else:
        fill, white = pixel_levels(*normalization) if normalization is not None else (None, None)
        pool = PerturbationPool(perturb_ops, seed=seed, fill=fill, white=white)
    unset = [_op_name(op) for op in pool.ops
             if (hasattr(op, "fill") and op.fill is None) or (hasattr(op, "white") and op.white is None)]
    if perturb and unset:
        warnings.warn(f"the perturbations {unset} fill, clamp or scale with the black and white pixel levels, and "
                      "this group has none: they use 0 (the mean colour) and no clamp. Pass normalization=(mean, "
                      "std) of your images to use the true black and white (cdfast train does)", stacklevel=3)
    return pool


def expand_presets(ops: Iterable) -> list:
    """Op names and callables, with preset names (``"paper"``, ``"authors"``) replaced by their ops."""
    out = []
    for op in ops:
        out.extend(PRESETS[op] if isinstance(op, str) and op in PRESETS else [op])
    return out


def _op_name(op: PerturbOp) -> str:
    return getattr(op, "name", getattr(op, "__name__", type(op).__name__))


class PerturbationPool:
    """A list of perturbation ops and the seeded randomness that drives them.

    ``ops`` holds op names from :data:`OPS` or your own callables
    ``op(x, y, rng) -> Perturbed``, and preset names (:data:`PRESETS`: ``"paper"``,
    ``"authors"``). ``fill`` / ``white``: the normalized black and white per channel
    (``-mean / std``, ``(1 - mean) / std``): the warping ops put black where the image
    moves away (None keeps 0, the mean colour), ``noise-clamp`` clamps to that range.
    Each step, :meth:`choose_network` picks the network to perturb and
    :meth:`choose_op` the op (host RNG: they select which code runs, and never
    wait on the device); :meth:`apply` runs the op, whose own random numbers are
    drawn on the device. :meth:`perturb` does both.
    """

    def __init__(self, ops: Iterable[Union[str, PerturbOp]] | None = None, seed: int = 0,
                 fill: Sequence[float] | None = None, white: Sequence[float] | None = None):
        ops = expand_presets(DEFAULT_OPS if ops is None else ops)
        if not ops:
            raise ValueError("the perturbation pool is empty; pass at least one op or disable perturbation")
        self.ops: list[PerturbOp] = [self._resolve(op) for op in ops]
        self.rng = PerturbRNG(seed)
        self.steps = 0  # steps seen by choose_network (the every-k-th schedule counts them)
        self.fill = None if fill is None else tuple(float(v) for v in fill)
        self.white = None if white is None else tuple(float(v) for v in white)
        for op in self.ops:  # the pixel range: warps fill with black, the noise clamps to [black, white]
            if hasattr(op, "fill") and op.fill is None:
                op.fill = self.fill
            if hasattr(op, "white") and op.white is None:
                op.white = self.white

    @staticmethod
    def _resolve(op: Union[str, PerturbOp]) -> PerturbOp:
        if isinstance(op, str):
            if op not in OPS:
                raise ValueError(f"unknown perturbation {op!r}; available: {', '.join(OPS)} "
                                 f"(or a preset: {', '.join(PRESETS)})")
            return OPS[op]()
        if not callable(op):
            raise TypeError(f"a perturbation op must be a name or a callable op(x, y, rng), got {op!r}")
        return op

    @property
    def names(self) -> list[str]:
        return [_op_name(op) for op in self.ops]

    def choose_network(self, n_networks: int, prob: float = 1.0, every: int = 1) -> int:
        """Index of the network to perturb this step, or -1 for none.

        A step is eligible every ``every`` steps (the authors' code: 10; the paper's text: 1),
        and an eligible step perturbs with probability ``prob``. Ineligible steps draw nothing.
        """
        due = self.steps % every == 0
        self.steps += 1
        if not due or (prob < 1.0 and self.rng.host.random() >= prob):
            return -1
        return self.rng.host.randrange(n_networks)

    def choose_op(self) -> int:
        """Index of the op to apply this step, drawn uniformly (host RNG: it selects code to run)."""
        return self.rng.host.randrange(len(self.ops))

    def apply(self, index: int, x: Tensor, y: Tensor) -> Perturbed:
        """Apply op ``index`` to the batch; its own random numbers are drawn on the batch's device."""
        op = self.ops[index]
        out = op(x, y, self.rng)
        if not isinstance(out, Perturbed):
            raise TypeError(f"perturbation {_op_name(op)!r} returned {type(out).__name__}, expected cdfast.perturb.Perturbed")
        if out.x.shape != x.shape:
            raise ValueError(f"perturbation {_op_name(op)!r} changed the batch shape {list(x.shape)} -> {list(out.x.shape)}")
        return out

    def perturb_group(self, x: Tensor, y: Tensor, n: int, r: int, op: int, ready: Perturbed | None = None):
        """Inputs and targets of a group of ``n`` networks: network ``r`` gets the batch perturbed by
        op ``op`` (``r = -1``: nobody), or the view ``ready`` made by the loader. Returns ``(inputs,
        targets, targets_b, lam)``: targets ``[B]`` shared, or ``[N, B]`` with ``targets_b`` and
        ``lam [N]`` when the op mixed labels. No sync."""
        inputs = [x] * n
        targets, targets_b, lam = y, None, None
        if r >= 0:
            out = self.apply(op, x, y) if ready is None else ready
            inputs[r] = out.x
            if out.mixes_labels:
                targets = torch.stack([out.y_a if i == r else y for i in range(n)])
                targets_b = torch.stack([out.y_b if i == r else y for i in range(n)])
                # fill_ from a 0-d device tensor (or a number) is a kernel: no copy to the host, no sync
                lam = torch.ones(n, device=x.device)
                lam[r:r + 1].fill_(out.lam)
        return inputs, targets, targets_b, lam

    def perturb(self, x: Tensor, y: Tensor) -> tuple[Perturbed, str]:
        """Apply one op drawn from the pool; returns the perturbed batch and the op's name."""
        index = self.choose_op()
        return self.apply(index, x, y), self.names[index]

    def state_dict(self) -> dict:
        return {**self.rng.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.rng.load_state_dict(state)
        self.steps = int(state.get("steps", 0))  # checkpoints before the schedule existed: every=1 ignores it
