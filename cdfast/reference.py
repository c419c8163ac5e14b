"""Pure-PyTorch reference of every cdfast op.

This module is three things at once: the CPU path, the oracle that every fused
kernel and custom op is tested against, and the baseline of the benchmarks.
It does the math only; argument checking lives in :mod:`cdfast.functional`.

Shapes: ``N`` networks in a group, ``B`` samples in the batch, ``K`` classes,
``D`` feature elements per sample. All losses are accumulated in float32
for float32/float16/bfloat16 inputs (float64 stays float64) and come back in
that precision.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "competitive_ce",
    "elect_teacher",
    "student_loss",
    "group_student_loss",
    "group_student_loss_backward",
    "pairwise_kl",
    "pairwise_feature_l2",
    "weighted_student_loss",
    "distillation_weights",
]


def _acc(x: Tensor) -> Tensor:
    """The accumulation precision: float64 stays float64, everything else computes in float32."""
    return x if x.dtype == torch.float64 else x.float()


def elect_teacher(ce: Tensor) -> Tensor:
    """Index of the lowest cross-entropy along the last dim; ties go to the lowest index.

    ``torch.argmin`` returns the first minimal index, which is the tie rule the
    method asks for. A NaN or infinite CE is never elected (argmin alone would
    pick a NaN); if every CE is non-finite, index 0 comes back and the CE values
    themselves show the failure. The result stays on ``ce``'s device (no host sync).
    """
    return torch.argmin(torch.where(torch.isfinite(ce), ce, torch.inf), dim=-1)


def competitive_ce(
    logits: Tensor,
    targets: Tensor,
    targets_b: Tensor | None = None,
    lam: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of every network and the elected teacher.

    logits ``[*G, N, B, K]``; targets ``[*G, N, B]`` int64 class indices, or ``[*G, N, B, K]``
    class probabilities (soft targets, e.g. from torchvision's MixUp/CutMix).
    With mixed labels (mixup/cutmix perturbations), network ``i`` is scored by
    ``lam[i] * CE(z_i, targets[i]) + (1 - lam[i]) * CE(z_i, targets_b[i])``
    with ``lam`` of shape ``[*G, N]``. ``label_smoothing`` and ``ignore_index`` (class
    indices only) mean what they mean in ``torch.nn.functional.cross_entropy`` (a batch
    with every label ignored gives NaN, as there). Returns ``ce [*G, N]`` (float32; float64
    for float64 logits) and ``teacher [*G]`` (int64).
    """
    logp = torch.log_softmax(_acc(logits), dim=-1)
    ce = _cross_entropy(logp, targets, label_smoothing, ignore_index)
    if targets_b is not None:
        ce_b = _cross_entropy(logp, targets_b, label_smoothing, ignore_index)
        lam = lam.to(ce.dtype)
        ce = lam * ce + (1.0 - lam) * ce_b
    return ce, elect_teacher(ce)


def _cross_entropy(logp: Tensor, targets: Tensor, label_smoothing: float, ignore_index: int | None) -> Tensor:
    """Batch-mean CE of log-probabilities ``[..., B, K]`` against class indices or probabilities."""
    k = logp.shape[-1]
    if targets.is_floating_point():  # probabilities
        p = targets.to(logp.dtype)
        if label_smoothing:
            p = (1.0 - label_smoothing) * p + label_smoothing / k
        return -(p * logp).sum(-1).mean(-1)
    keep = targets != ignore_index if ignore_index is not None else None
    index = torch.where(keep, targets, 0) if keep is not None else targets
    nll = -logp.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    if keep is None:
        return nll.mean(-1)
    # an ignored row counts for nothing, even with -inf or NaN logits (0 * inf would be NaN)
    nll = torch.where(keep, nll, 0.0)
    return nll.sum(-1) / keep.to(nll.dtype).sum(-1)  # every label ignored: 0 / 0 = NaN, as F.cross_entropy


def _kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(p_t || p_s) summed over classes, averaged over the batch dim (-2)."""
    logp_s = torch.log_softmax(_acc(student_logits) / temperature, dim=-1)
    logp_t = torch.log_softmax(_acc(teacher_logits.detach()) / temperature, dim=-1)
    p_t = logp_t.exp()
    # classes the teacher rules out (p_t = 0, e.g. -inf logits) add 0, never 0 * inf = NaN
    return torch.where(p_t > 0, p_t * (logp_t - logp_s), 0.0).sum(-1).mean(-1)


def _feature_mse(student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
    """Mean squared difference over everything but the leading group dims."""
    diff = _acc(student_feats) - _acc(teacher_feats.detach())
    return diff.square().flatten(-2).mean(-1)


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
    """Distillation loss of one student towards one teacher (a float32 scalar; float64 for float64 inputs).

    ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + beta * mean((F_s - F_t)^2)``.
    The teacher's outputs are treated as constants.
    """
    loss = alpha * temperature**2 * _kl_to_teacher(student_logits, teacher_logits, temperature)
    if student_feats is not None and beta != 0.0:
        loss = loss + beta * _feature_mse(
            student_feats.flatten(1), teacher_feats.flatten(1)
        )
    return loss


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
    """Student loss of every network of a group towards the teacher, ``[N]`` float32 (float64 for float64 logits).

    logits ``[N, B, K]``, feats ``[N, B, ...]`` or None, teacher a 0-d int64
    device tensor. Entry ``teacher`` is exactly 0 and sends no gradient; the
    teacher's outputs are constants for the students. No host sync.
    ``target_logits`` / ``target_feats`` (shaped like logits / feats): per-student
    targets (the teacher's outputs on each student's own input) instead of the
    teacher's own rows.
    """
    n = logits.shape[0]
    t = teacher.reshape(1)
    goal = logits.index_select(0, t) if target_logits is None else target_logits
    loss = alpha * temperature**2 * _kl_to_teacher(logits, goal, temperature)
    if feats is not None and beta != 0.0:
        flat = feats.flatten(2)
        goal_f = flat.index_select(0, t) if target_feats is None else target_feats.flatten(2)
        loss = loss + beta * _feature_mse(flat, goal_f)
    is_student = torch.arange(n, device=logits.device) != teacher
    return torch.where(is_student, loss, torch.zeros((), device=loss.device))


def group_student_loss_backward(
    grad: Tensor,
    logits: Tensor,
    feats: Tensor | None,
    teacher: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    target_logits: Tensor | None = None,
    target_feats: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Closed-form gradients of :func:`group_student_loss` weighted by ``grad [N]``.

    ``d/dz_i = grad_i * alpha*T/B * (p_i - p_t)`` and
    ``d/dF_i = grad_i * 2*beta/(B*D) * (F_i - F_t)`` for students (with per-student
    targets, ``p_t`` and ``F_t`` are student i's target rows); the teacher's rows are 0
    (its outputs are constants). The twin of the fused backward kernel.
    """
    n, b = logits.shape[:2]
    g = torch.where(torch.arange(n, device=logits.device) != teacher, _acc(grad), 0.0)
    t = teacher.reshape(1)
    p = torch.softmax(_acc(logits) / temperature, dim=-1)
    p_goal = p.index_select(0, t) if target_logits is None else torch.softmax(_acc(target_logits) / temperature, -1)
    grad_logits = (g * alpha * temperature / b).view(n, 1, 1) * (p - p_goal)
    grad_feats = None
    if feats is not None:
        flat = _acc(feats.flatten(2))
        d = flat.shape[-1]
        goal_f = flat.index_select(0, t) if target_feats is None else _acc(target_feats.flatten(2))
        scale = (g * 2.0 * beta / (b * d)) if (d > 0 and beta != 0.0) else torch.zeros_like(g)
        grad_feats = (scale.view(n, 1, 1) * (flat - goal_f)).view(feats.shape).to(feats.dtype)
    return grad_logits.to(logits.dtype), grad_feats


def pairwise_kl(logits: Tensor, temperature: float = 1.0, targets: Tensor | None = None, *,
                teachers: Tensor | None = None) -> Tensor:
    """``M[i, j] = KL(q_j || p_i)`` for a group ``[N, B, K]``, with ``q_j`` constant. ``[N, N]``, float32
    (float64 for float64 logits) whatever autocast is on.

    ``q_j`` is network j's softmax on the same logits, or on ``targets [N, B, K]`` when given
    (e.g. every network's output on another input: the teachers' view of a perturbed student's batch).
    ``teachers``: bool ``[N]``, the columns to compute; the others are 0 and read nothing of
    network j, so a diverged teacher's NaN outputs reach no other network, in value or gradient.
    """
    with torch.autocast(logits.device.type, enabled=False):  # the einsum would run in bf16/fp16 under autocast
        logp = torch.log_softmax(_acc(logits) / temperature, dim=-1)
        logp = logp.clamp(min=torch.finfo(logp.dtype).min)  # -inf logits (masked classes): 0 * -inf would be NaN
        if targets is None:
            logq = logp.detach()
        else:
            logq = torch.log_softmax(_acc(targets.detach()) / temperature, dim=-1).to(logp.dtype)
            logq = logq.clamp(min=torch.finfo(logq.dtype).min)
        if teachers is not None:
            logq = torch.where(teachers.view(-1, 1, 1), logq, 0.0)
        q = logq.exp()
        if teachers is not None:
            q = torch.where(teachers.view(-1, 1, 1), q, 0.0)
        batch = logits.shape[1]
        neg_entropy = (q * logq).sum(-1).mean(-1)  # [N], indexed by j
        cross = torch.einsum("jbk,ibk->ij", q, logp) / batch
        return neg_entropy.unsqueeze(0) - cross


def pairwise_feature_l2(
    feats: Tensor | Sequence[Tensor],
    adapt: Callable[[int, int, Tensor], Tensor] | None = None,
    targets: Tensor | Sequence[Tensor] | None = None,
    *,
    teachers: Tensor | None = None,
) -> Tensor:
    """``L[i, j] = mean((A_ij(F_i) - G_j)^2)`` with G_j constant. ``[N, N]`` float32 (float64 for float64 features).

    ``feats`` is a stacked ``[N, B, ...]`` tensor or a list of per-network
    tensors (shapes may differ). ``adapt(i, j, F_i)`` maps student i's
    features to network j's shape; None means the shapes already agree.
    ``G_j`` is ``F_j``, or ``targets[j]`` when given (shaped like ``feats``).
    The diagonal is 0. ``teachers``: bool ``[N]``, the columns to compute (the others are 0
    and read nothing of network j, as in :func:`pairwise_kl`).
    """
    n = len(feats)
    goal = feats if targets is None else targets
    if adapt is None and isinstance(feats, Tensor):
        flat = _acc(feats.flatten(2))
        goal_flat = _acc(goal.flatten(2)).detach()
        if teachers is not None:
            goal_flat = torch.where(teachers.view(-1, 1, 1), goal_flat, 0.0)
        diff = flat.unsqueeze(1) - goal_flat.unsqueeze(0)  # [i, j, B, D]
        l2 = diff.square().flatten(2).mean(-1)
        return l2 if teachers is None else torch.where(teachers.unsqueeze(0), l2, 0.0)
    rows = []
    for i in range(n):
        row = []
        for j in range(n):
            if i == j:
                row.append(torch.zeros((), device=feats[i].device))
                continue
            student = adapt(i, j, feats[i]) if adapt is not None else feats[i]
            target = goal[j] if teachers is None else torch.where(teachers[j], goal[j].detach(), 0.0)
            mse = _feature_mse(student.flatten(1), target.flatten(1))
            row.append(mse if teachers is None else torch.where(teachers[j], mse, 0.0))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def weighted_student_loss(
    logits: Tensor,
    feature_l2: Tensor | None,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> Tensor:
    """Student loss of every network when it may learn from several teachers. ``[N]``.

    ``loss_i = sum_j weights[i, j] * (alpha * T^2 * KL(p_j || p_i) + beta * L[i, j])``
    where ``feature_l2`` is the ``[N, N]`` matrix of :func:`pairwise_feature_l2`
    (or None for no feature term) and ``weights`` comes from
    :func:`distillation_weights`. A row of zero weights gives exactly 0, and a network
    no one learns from (a zero column: e.g. a non-finite CE) reaches no other network's
    loss or gradient, if ``feature_l2`` was computed with ``teachers=`` the used columns
    (``(weights != 0).any(0)``), as :class:`cdfast.CompetitiveDistillation` does.
    """
    used = weights != 0
    pair = alpha * temperature**2 * pairwise_kl(logits, temperature, teachers=used.any(0))
    if feature_l2 is not None and beta != 0.0:
        pair = pair + beta * feature_l2
    return torch.where(used, weights.to(pair.dtype) * pair, 0.0).sum(1)


def distillation_weights(ce: Tensor, mode: str = "competitive", teachers: str = "best", *,
                         teacher: Tensor | None = None) -> Tensor:
    """Who learns from whom: ``W[i, j]`` is the weight of teacher j in student i's loss.

    In the words of :class:`cdfast.CompetitiveDistillation`: ``mode="competitive"`` with
    ``teachers="best"`` (everybody learns from the argmin, which learns from nobody) or
    ``teachers="all-better"`` (each network learns from every better one, averaged; ties
    ordered by index like the election; a non-finite CE never teaches); ``mode="dml"``
    (deep mutual learning: from every other network, averaged); ``mode="independent"``
    (nobody: all zeros). Computed on the device from ``ce [N]``; for ``"best"``, a
    ``teacher`` already elected (by :func:`competitive_ce`) is used instead of a second argmin.
    """
    n = ce.shape[-1]
    idx = torch.arange(n, device=ce.device)
    if mode == "independent":
        return torch.zeros(n, n, device=ce.device)
    if mode == "dml":
        return (1.0 - torch.eye(n, device=ce.device)) / (n - 1)
    if mode != "competitive":
        raise ValueError(f"unknown mode {mode!r}; use 'competitive', 'dml' or 'independent'")
    if teachers == "best":
        teacher = elect_teacher(ce) if teacher is None else teacher
        w = (idx.unsqueeze(0) == teacher) & (idx.unsqueeze(1) != teacher)
        return w.float()
    if teachers == "all-better":
        lower = ce.unsqueeze(0) < ce.unsqueeze(1)  # [i, j]: ce_j < ce_i
        tie_first = (ce.unsqueeze(0) == ce.unsqueeze(1)) & (idx.unsqueeze(0) < idx.unsqueeze(1))
        better = ((lower | tie_first) & torch.isfinite(ce).unsqueeze(0)).float()  # a non-finite CE never teaches
        return better / better.sum(1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"unknown teachers rule {teachers!r}; use 'best' or 'all-better'")
