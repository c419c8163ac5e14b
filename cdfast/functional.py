"""The functional API: the competitive-distillation losses for your own training loop.

Every function checks its arguments (clear errors, no host sync on GPU
tensors; ``pairwise_kl`` and ``pairwise_feature_l2`` are the reference's own
functions, unchecked) and then dispatches to the fastest implementation available for the
tensors' device: :func:`competitive_ce` runs the compiled op
``torch.ops.cdfast.competitive_ce`` (C++ on CPU, CUDA on GPU) when
``cdfast._C`` is built; :func:`group_student_loss` runs the fused Triton
kernels (``torch.ops.cdfast.group_student_loss``) on CUDA tensors; everything
else, and every CPU path without the compiled library, is the pure-PyTorch
code of :mod:`cdfast.reference`.

Typical use inside an existing loop::

    logits, feats = zip(*(net(x) for net in nets))
    ce, teacher = cdfast.competitive_ce(torch.stack(logits), y)
    distill = cdfast.group_student_loss(torch.stack(logits), torch.stack(feats), teacher)
    (ce + distill).sum().backward()   # each network gets exactly its own gradient
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from cdfast import reference
from cdfast.ops import competitive_ce as ce_op
from cdfast.ops import student_loss as student_loss_op
from cdfast.distributed import global_mean, resolve_process_group
from cdfast.options import check_number, check_option, check_teachers

__all__ = [
    "competitive_ce",
    "elect_teacher",
    "student_loss",
    "group_student_loss",
    "weighted_student_loss",
    "pairwise_feature_l2",
    "pairwise_kl",
    "distillation_weights",
]


def _stack(logits: Tensor | Sequence[Tensor], name: str = "logits") -> Tensor:
    """A stacked ``[N, ...]`` tensor from a tensor or a list of the N networks' tensors."""
    if isinstance(logits, Tensor):
        return logits
    if isinstance(logits, (list, tuple)) and name == "feats" and any(z is None for z in logits):
        missing = [i for i, z in enumerate(logits) if z is None]
        raise ValueError(f"feats of networks {missing} are None (logits-only networks); pass every network's "
                         "features (cdfast.models.FeatureTap takes them from a layer) or turn the feature loss off")
    if not isinstance(logits, (list, tuple)) or not all(isinstance(z, Tensor) for z in logits):
        raise TypeError(f"{name} must be a tensor stacked per network or a list of the networks' tensors, "
                        f"got {type(logits).__name__}")
    if not logits:
        raise ValueError(f"{name} is an empty list; pass the outputs of N >= 2 networks")
    shapes = [tuple(z.shape) for z in logits]
    if len(set(shapes)) != 1:
        if name == "feats":
            raise ValueError(
                f"the networks' features have different shapes {shapes}; map them to one shape first "
                "(cdfast.CompetitiveDistillation builds adapters for this: cdfast.models.FeatureAdapters), "
                "or turn the feature loss off"
            )
        raise ValueError(
            f"the networks' {name} have different shapes {shapes}; every network of a group "
            "must see the same batch and predict the same number of classes"
        )
    devices = {z.device for z in logits}
    if len(devices) != 1:
        raise ValueError(f"the networks' {name} lie on different devices {sorted(map(str, devices))}; "
                         "move them to one device before stacking")
    return torch.stack(list(logits))


def _check_tensor(t, name: str, device: torch.device, hint: str = "") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}; move it with .to({str(device)!r})")


def _check_group_logits(logits: Tensor, name: str = "logits") -> None:
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 3:
        raise ValueError(
            f"{name} must be stacked per network as [N, B, K] (optionally with leading group "
            f"dims), got shape {list(logits.shape)}; stack the N networks' [B, K] outputs with torch.stack"
        )
    if logits.shape[-3] < 2:
        raise ValueError(f"a group needs N >= 2 networks, got N = {logits.shape[-3]} in {name} {list(logits.shape)}")
    if logits.shape[-2] == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} {list(logits.shape)} hold an empty batch or no classes; skip empty batches")


def _check_labels(labels: Tensor, num_classes: int, name: str, values: bool = True,
                  ignore_index: int | None = None) -> None:
    if labels.is_floating_point():  # class probabilities: the shape was checked with the logits
        return
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must hold int64 class indices (or float class probabilities [.., B, K]), got "
                        f"{labels.dtype}; use {name}.long()")
    if not values:
        return
    # A range check needs the values; on an accelerator that would be a host
    # sync inside the step, so it is only done for CPU tensors (data loaders
    # check their labels once at load time), and not while torch.compile traces
    # (the compiled op checks its labels itself).
    if labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling():
        if ignore_index is not None:  # the ignored labels are neither in nor out of range
            labels = labels[labels != ignore_index]
            if labels.numel() == 0:
                return
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} hold class indices in [{lo}, {hi}] but the networks predict "
                f"{num_classes} classes; labels must lie in [0, {num_classes})"
            )


def _group_targets(targets: Tensor, shape: torch.Size, name: str) -> Tensor:
    """Accept one label vector shared by the group ([B]) or one per network ([N, B]); class probabilities
    likewise with the class dim ([B, K] or [N, B, K])."""
    if targets.is_floating_point():
        if tuple(targets.shape) == tuple(shape):
            return targets
        if tuple(targets.shape) == tuple(shape[-2:]):
            return targets.expand(shape)
        raise ValueError(f"{name} holds class probabilities of shape {list(targets.shape)} but the logits "
                         f"{list(shape)} need {list(shape)} or {list(shape[-2:])} (shared by the group)")
    want = shape[:-1]
    if tuple(targets.shape) == tuple(want):
        return targets
    if tuple(targets.shape) == (shape[-2],):
        return targets.expand(want)
    raise ValueError(
        f"{name} has shape {list(targets.shape)} but the logits {list(shape)} need "
        f"{list(want)} (one label per network and sample) or [{shape[-2]}] (shared labels)"
    )


def competitive_ce(
    logits: Tensor | Sequence[Tensor],
    targets: Tensor,
    targets_b: Tensor | None = None,
    lam: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """Per-network mean cross-entropy and the elected teacher, on the device.

    Args:
        logits: ``[N, B, K]`` stacked logits (or a list of N ``[B, K]`` tensors);
            leading group dims ``[G, N, B, K]`` score several groups at once.
        targets: int64 labels ``[N, B]``, or ``[B]`` shared by every network; or class
            probabilities ``[N, B, K]`` / ``[B, K]`` (soft targets: torchvision's v2 MixUp and
            CutMix, timm's mixup).
        label_smoothing, ignore_index: as in ``torch.nn.functional.cross_entropy``, except that
            nothing is ignored by default (``ignore_index=None``; F.cross_entropy's default is
            -100). Every form runs the compiled op where it has a kernel for the device, except
            where the targets or ``lam`` need a gradient (the op differentiates the logits only).
        targets_b, lam: for mixed labels (mixup/cutmix): second label set like
            ``targets`` and the weight of ``targets``: per network ``lam [*G, N]``, or one for
            every network (a float or a 0-d tensor).
        process_group: under data parallelism (each rank scores its shard of the batch),
            a ``torch.distributed`` process group (or ``"auto"``: the default one when
            initialised): the CEs are all-reduced, weighted by the shards' sizes, and the
            teacher is elected from the global batch, the same on every rank. ``ce`` stays
            this rank's mean (its gradient, averaged across ranks, is the global one). The
            default, None, elects from this process's batch alone (per shard under torchrun;
            :class:`cdfast.CompetitiveDistillation` defaults to ``"auto"``).
    Returns:
        ``(ce [*G, N], teacher [*G] int64)`` (0-d for one group; ce float32, float64 for
        float64 logits); ties elect the lowest index.
        A network whose CE is NaN or infinite is never elected; if every CE is
        non-finite, network 0 is returned and ``ce`` shows the failure (check it
        where you read your metrics: testing it here would sync the device).
    """
    logits = _stack(logits)
    _check_group_logits(logits)
    _check_tensor(targets, "targets", logits.device, "; convert labels with torch.as_tensor(labels)")
    k = logits.shape[-1]
    label_smoothing = float(check_number("label_smoothing", label_smoothing, ge=0.0, le=1.0))
    if ignore_index is not None:
        check_number("ignore_index", ignore_index, integer=True)
    hard = not targets.is_floating_point()  # class indices (else class probabilities)
    checked_by_op = hard and ce_op.uses_op(logits, targets, targets_b, lam)  # it checks label values itself
    if not hard:  # probabilities in the accumulation dtype before they are expanded (no copy per network)
        targets = targets.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    targets = _group_targets(targets, logits.shape, "targets")
    _check_labels(targets, k, "targets", values=not checked_by_op, ignore_index=ignore_index)
    if (targets_b is None) != (lam is None):
        raise ValueError("mixed labels need both targets_b and lam (or neither)")
    if targets_b is not None:
        _check_tensor(targets_b, "targets_b", logits.device)
        if isinstance(lam, (int, float)) and not isinstance(lam, bool):  # a fill: no host-to-device copy
            lam = torch.full((), float(lam), dtype=torch.float32, device=logits.device)
        _check_tensor(lam, "lam", logits.device)
        if targets_b.is_floating_point():
            targets_b = targets_b.to(targets.dtype if not hard else torch.float32)
        targets_b = _group_targets(targets_b, logits.shape, "targets_b")
        if targets_b.is_floating_point() != targets.is_floating_point():
            raise TypeError("targets and targets_b must both be class indices or both class probabilities")
        _check_labels(targets_b, k, "targets_b", values=not checked_by_op, ignore_index=ignore_index)
        if lam.dim() == 0:  # one mixing weight for the whole group (the usual mixup lam)
            lam = lam.expand(logits.shape[:-2])
        if tuple(lam.shape) != tuple(logits.shape[:-2]):
            raise ValueError(f"lam must be one weight for the group or one per network, shape "
                             f"{list(logits.shape[:-2])}, got {list(lam.shape)}")
    # ignore_index applies to class indices only (as in F.cross_entropy)
    ignore = int(ignore_index) if hard and ignore_index is not None else None
    ce, teacher = ce_op.competitive_ce(logits, targets, targets_b, lam, label_smoothing, ignore)
    group = resolve_process_group(process_group)
    if group is not None:
        if ignore_index is not None:
            raise ValueError("ignore_index with a process_group is not available yet: the shards' CEs average "
                             "different numbers of labels, so their mean is not the global batch's")
        teacher = reference.elect_teacher(global_mean(ce, logits.shape[-2], group))
    return ce, teacher


def elect_teacher(ce_losses: Tensor | Sequence[Tensor]) -> Tensor:
    """Index of the network with the lowest loss (ties: lowest index), as an int64 device tensor.

    NaN or infinite losses are never elected (see :func:`competitive_ce`).
    """
    ce = _stack(ce_losses, "ce_losses")
    if ce.dim() == 0 or ce.shape[-1] < 2:
        raise ValueError(f"elect_teacher needs the losses of N >= 2 networks, got shape {list(ce.shape)}")
    return reference.elect_teacher(ce)


def student_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_feats: Tensor | None = None,
    teacher_feats: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """``alpha*T^2*KL(p_t||p_s) + beta*mean((F_s-F_t)^2)`` for one student; teacher outputs are constants."""
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor [B, K], got {type(student_logits).__name__}")
    for name, t in (("teacher_logits", teacher_logits), ("student_feats", student_feats),
                    ("teacher_feats", teacher_feats)):
        if t is not None:
            _check_tensor(t, name, student_logits.device)
    temperature, alpha, beta = _check_weights(temperature, alpha, beta)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {list(student_logits.shape)} and teacher logits "
            f"{list(teacher_logits.shape)} must have the same shape [B, K]"
        )
    if (student_feats is None) != (teacher_feats is None):
        raise ValueError("pass both student_feats and teacher_feats, or neither")
    if student_feats is not None and student_feats.shape != teacher_feats.shape:
        raise ValueError(
            f"student features {list(student_feats.shape)} and teacher features "
            f"{list(teacher_feats.shape)} differ in shape; map the student's features with an "
            "adapter first (cdfast.models.FeatureAdapters)"
        )
    return reference.student_loss(
        student_logits, teacher_logits, student_feats, teacher_feats,
        temperature=temperature, alpha=alpha, beta=beta,
    )


def group_student_loss(
    logits: Tensor,
    feats: Tensor | None,
    teacher: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    target_logits: Tensor | None = None,
    target_feats: Tensor | None = None,
) -> Tensor:
    """Student loss of every network towards the teacher ``[N]``; exactly 0 at the teacher.

    ``target_logits [N, B, K]`` / ``target_feats`` (like ``feats``): per-student targets,
    e.g. the teacher's outputs on each student's own input (matched inputs); by default
    every student's target is the teacher's own rows.
    ``logits [N, B, K]`` (or a list of N ``[B, K]``), ``feats [N, B, ...]`` (or a list)
    or None. ``teacher`` is the int64 device tensor from :func:`competitive_ce` (nothing
    here reads it on the host, so the step stays free of syncs) or a plain int. One group per call
    (for ``[G, N, B, K]`` logits, call it per group with its teacher).
    """
    logits = _stack(logits)
    _check_group_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"group_student_loss takes one group, logits [N, B, K]; got {list(logits.shape)}. For "
                         "several groups, call it once per group with that group's teacher")
    temperature, alpha, beta = _check_weights(temperature, alpha, beta)
    if feats is not None:
        feats = _stack(feats, "feats")
        _check_tensor(feats, "feats", logits.device)
    if isinstance(teacher, int) and not isinstance(teacher, bool):  # a plain index (copied to the device)
        if not 0 <= teacher < logits.shape[0]:
            raise ValueError(f"teacher {teacher} is not a network of this group of {logits.shape[0]}")
        teacher = torch.full((), teacher, dtype=torch.int64, device=logits.device)  # a fill: no host-to-device copy
    if not isinstance(teacher, Tensor):
        raise TypeError(f"teacher must be a network's index: an int, or a 0-d int64 tensor on the logits' device "
                        f"(from competitive_ce), got {type(teacher).__name__} {teacher!r}")
    _check_tensor(teacher, "teacher", logits.device)
    if feats is not None and tuple(feats.shape[:2]) != tuple(logits.shape[:2]):
        raise ValueError(
            f"feats {list(feats.shape)} must be stacked like the logits {list(logits.shape)}: [N, B, ...]"
        )
    if teacher.dim() != 0 or teacher.dtype != torch.int64:
        raise ValueError(f"teacher must be a 0-d int64 tensor (from competitive_ce), got {teacher.dtype} {list(teacher.shape)}")
    for name, target, like in (("target_logits", target_logits, logits), ("target_feats", target_feats, feats)):
        if target is not None:
            _check_tensor(target, name, logits.device)
            if like is None or tuple(target.shape) != tuple(like.shape):
                raise ValueError(f"{name} must be shaped like the {'logits' if name == 'target_logits' else 'feats'} "
                                 f"{None if like is None else list(like.shape)}, got {list(target.shape)}")
    if target_feats is not None and target_logits is None:
        raise ValueError("target_feats needs target_logits too (per-student targets come as a pair)")
    return student_loss_op.dispatch(logits, feats, teacher, temperature, alpha, beta, target_logits, target_feats)


def weighted_student_loss(
    logits: Tensor,
    feature_l2: Tensor | None,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """Student loss when a network may learn from several others (all-better, DML). ``[N]``."""
    logits = _stack(logits)
    _check_group_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"weighted_student_loss takes one group, logits [N, B, K]; got {list(logits.shape)}")
    temperature, alpha, beta = _check_weights(temperature, alpha, beta)
    _check_tensor(weights, "weights", logits.device)
    if feature_l2 is not None:
        _check_tensor(feature_l2, "feature_l2", logits.device)
    n = logits.shape[0]
    if tuple(weights.shape) != (n, n):
        raise ValueError(f"weights must be [N, N] = [{n}, {n}], got {list(weights.shape)}")
    if feature_l2 is not None and tuple(feature_l2.shape) != (n, n):
        raise ValueError(f"feature_l2 must be the [N, N] = [{n}, {n}] matrix of pairwise_feature_l2, got "
                         f"{list(feature_l2.shape)}")
    return reference.weighted_student_loss(
        logits, feature_l2, weights, temperature=temperature, alpha=alpha, beta=beta
    )


def distillation_weights(ce: Tensor, mode: str = "competitive", teachers: str = "best", *,
                         teacher: Tensor | None = None) -> Tensor:
    """``W[i, j]``: weight of network j as a teacher of network i; see :func:`cdfast.reference.distillation_weights`.

    ``mode`` and ``teachers`` are the words :class:`cdfast.CompetitiveDistillation` takes
    (:mod:`cdfast.options`). ``teacher``: for ``teachers="best"``, the index
    :func:`competitive_ce` already elected (no second argmin).
    """
    if mode in _FORMER_RULES:
        raise ValueError(f"distillation_weights takes mode= and teachers= like CompetitiveDistillation: {mode!r} is "
                         f"now {_FORMER_RULES[mode]}")
    check_teachers(mode, teachers)
    _check_tensor(ce, "ce", getattr(ce, "device", None))
    if ce.dim() != 1:
        raise ValueError(f"ce must be [N], one cross-entropy per network; got {list(ce.shape)}")
    return reference.distillation_weights(ce, mode, teachers, teacher=teacher)


# The single-word rules of cdfast 0.1's distillation_weights, and what they are called now.
_FORMER_RULES = {"best": "mode='competitive', teachers='best'", "all-better": "mode='competitive', teachers='all-better'",
                 "all": "mode='dml'", "none": "mode='independent'"}


pairwise_feature_l2 = reference.pairwise_feature_l2
pairwise_kl = reference.pairwise_kl


def _check_weights(temperature, alpha, beta) -> tuple[float, float, float]:
    return check_option("temperature", temperature), check_option("alpha", alpha), check_option("beta", beta)
