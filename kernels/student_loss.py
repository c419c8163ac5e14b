"""Fused Triton kernels of the group student loss (softmax + KL + feature L2, all students at once).

For stacked logits ``[N, B, K]``, features ``[N, B, D]`` and the teacher index as a
device tensor, network i's loss is

    alpha * T^2 * mean_b KL(softmax(z_t/T) || softmax(z_i/T)) + beta * mean((F_i - F_t)^2),  0 for i == t.

The grid is one-dimensional over the N*B rows (no 65,535 cap on B), ``ROWS`` rows
per program (several for small K, so a program has enough work). The teacher index
is loaded inside the kernel, so there is no host sync and no Python branch on who
teaches; an index outside [0, N) gives NaN losses instead of reading out of bounds.
Forward: when a row fits one block (``SINGLE``), one pass over the logits held in
registers; otherwise an online max/sum pass and a KL pass. Then one pass over D and a
deterministic sum over the batch. Backward: gradients to the students only (the
teacher's outputs are constants), ``alpha*T/B * (p_i - p_t)`` and
``2*beta/(B*D) * (F_i - F_t)``. With per-student targets (``PER_STUDENT``: the
teacher's outputs on each student's own input, ``[N, B, K]`` and ``[N, B, D]``),
student i's target row is row i of the targets instead of the teacher's row. ``-inf`` logits (masked classes) are exact: no
``0 * inf`` or ``exp(-inf - -inf)`` anywhere. Accumulation is fp32 for
fp32/fp16/bf16 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # widest block over K or D; wider rows loop


@triton.jit
def _load_scaled(ptr, rows, offs, K, row_mask, inv_t):
    """z/T of a [ROWS, BLOCK] tile in fp32; masked lanes hold -inf."""
    mask = row_mask[:, None] & (offs[None, :] < K)
    z = tl.load(ptr + rows[:, None] * K + offs[None, :], mask=mask, other=float("-inf"))
    return z.to(tl.float32) * inv_t


@triton.jit
def _exp_shifted(z, m):
    """exp(z - m) per row, 0 where z is -inf (also when m is -inf)."""
    return tl.where(z == float("-inf"), 0.0, tl.exp(z - m[:, None]))


@triton.jit
def _kl_terms(zs, zt, lse_t):
    """p_t * (z_t - z_s) per element, 0 where p_t is 0 (never 0 * inf)."""
    pt = _exp_shifted(zt, lse_t)
    return tl.where(pt > 0.0, pt * (zt - zs), 0.0)


@triton.jit
def _teacher(teacher_ptr, N):
    """The teacher index and whether it is valid; an invalid one is replaced by 0 for addressing."""
    t = tl.load(teacher_ptr).to(tl.int64)
    ok = (t >= 0) & (t < N)
    return tl.where(ok, t, 0), ok


@triton.jit
def _forward_kernel(logits_ptr, feats_ptr, tgt_logits_ptr, tgt_feats_ptr, teacher_ptr, rows_ptr, lse_ptr,
                    N, B, K, D, inv_t, kl_scale, fl_scale,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    SINGLE: tl.constexpr, HAS_FEATS: tl.constexpr, PER_STUDENT: tl.constexpr):
    t, t_ok = _teacher(teacher_ptr, N)
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # rows of the flattened [N, B]
    row_mask = r < N * B
    i = r // B
    b = r - i * B
    if PER_STUDENT:
        tr = r  # row r of the targets: the teacher's view of student i's sample b
    else:
        tr = t * B + b  # the teacher's row for the same sample (the targets are the logits themselves)

    if SINGLE:  # the whole row in registers: one read of the logits
        offs = tl.arange(0, BLOCK_K)
        zs = _load_scaled(logits_ptr, r, offs, K, row_mask, inv_t)
        zt = _load_scaled(tgt_logits_ptr, tr, offs, K, row_mask, inv_t)
        m_s = tl.max(zs, axis=1)
        m_t = tl.max(zt, axis=1)
        lse_s = m_s + tl.log(tl.sum(_exp_shifted(zs, m_s), axis=1))
        lse_t = m_t + tl.log(tl.sum(_exp_shifted(zt, m_t), axis=1))
        acc = tl.sum(_kl_terms(zs, zt, lse_t), axis=1)
    else:
        # pass 1: log-sum-exp of z/T for the student and the teacher rows (online max and sum)
        m_s = tl.full([ROWS], float("-inf"), tl.float32)
        m_t = tl.full([ROWS], float("-inf"), tl.float32)
        d_s = tl.zeros([ROWS], tl.float32)
        d_t = tl.zeros([ROWS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            zs = _load_scaled(logits_ptr, r, offs, K, row_mask, inv_t)
            zt = _load_scaled(tgt_logits_ptr, tr, offs, K, row_mask, inv_t)
            new_s = tl.maximum(m_s, tl.max(zs, axis=1))
            new_t = tl.maximum(m_t, tl.max(zt, axis=1))
            d_s = tl.where(m_s == float("-inf"), d_s, d_s * tl.exp(m_s - new_s)) + tl.sum(_exp_shifted(zs, new_s), axis=1)
            d_t = tl.where(m_t == float("-inf"), d_t, d_t * tl.exp(m_t - new_t)) + tl.sum(_exp_shifted(zt, new_t), axis=1)
            m_s = new_s
            m_t = new_t
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)
        # pass 2: sum_k p_t (z_t - z_s)/T
        acc = tl.zeros([ROWS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            zs = _load_scaled(logits_ptr, r, offs, K, row_mask, inv_t)
            zt = _load_scaled(tgt_logits_ptr, tr, offs, K, row_mask, inv_t)
            acc += tl.sum(_kl_terms(zs, zt, lse_t), axis=1)
    # KL(p_t || p_s) = sum_k p_t (z_t - z_s)/T - lse_t + lse_s
    loss = (acc - lse_t + lse_s) * kl_scale

    if HAS_FEATS:
        sq = tl.zeros([ROWS], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = row_mask[:, None] & (offs_d[None, :] < D)
            fs = tl.load(feats_ptr + r[:, None] * D + offs_d[None, :], mask=mask_d, other=0.0).to(tl.float32)
            ft = tl.load(tgt_feats_ptr + tr[:, None] * D + offs_d[None, :], mask=mask_d, other=0.0).to(tl.float32)
            diff = fs - ft
            sq += tl.sum(diff * diff, axis=1)
        loss += sq * fl_scale

    loss = tl.where(i == t, 0.0, loss)
    loss = tl.where(t_ok, loss, float("nan"))
    tl.store(rows_ptr + r, loss, mask=row_mask)
    tl.store(lse_ptr + r, lse_s, mask=row_mask)


@triton.jit
def _backward_kernel(grad_ptr, grad_stride, logits_ptr, feats_ptr, tgt_logits_ptr, tgt_feats_ptr, teacher_ptr, lse_ptr,
                     tgt_lse_ptr, grad_logits_ptr, grad_feats_ptr, N, B, K, D, inv_t, kl_grad_scale, fl_grad_scale,
                     ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_FEATS: tl.constexpr,
                     PER_STUDENT: tl.constexpr):
    t, t_ok = _teacher(teacher_ptr, N)
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = r < N * B
    i = r // B
    b = r - i * B
    if PER_STUDENT:
        tr = r
    else:
        tr = t * B + b
    student = (i != t) & t_ok  # the teacher's rows get exactly 0 (no 0 * inf)
    g = tl.load(grad_ptr + i * grad_stride, mask=row_mask, other=0.0).to(tl.float32)
    lse_s = tl.load(lse_ptr + r, mask=row_mask, other=0.0)
    lse_t = tl.load(tgt_lse_ptr + tr, mask=row_mask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (offs[None, :] < K)
        zs = _load_scaled(logits_ptr, r, offs, K, row_mask, inv_t)
        zt = _load_scaled(tgt_logits_ptr, tr, offs, K, row_mask, inv_t)
        value = (g * kl_grad_scale)[:, None] * (_exp_shifted(zs, lse_s) - _exp_shifted(zt, lse_t))
        value = tl.where(student[:, None], value, 0.0)
        tl.store(grad_logits_ptr + r[:, None] * K + offs[None, :], value.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if HAS_FEATS:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = row_mask[:, None] & (offs_d[None, :] < D)
            fs = tl.load(feats_ptr + r[:, None] * D + offs_d[None, :], mask=mask_d, other=0.0).to(tl.float32)
            ft = tl.load(tgt_feats_ptr + tr[:, None] * D + offs_d[None, :], mask=mask_d, other=0.0).to(tl.float32)
            value_d = tl.where(student[:, None], (g * fl_grad_scale)[:, None] * (fs - ft), 0.0)
            tl.store(grad_feats_ptr + r[:, None] * D + offs_d[None, :], value_d.to(grad_feats_ptr.dtype.element_ty),
                     mask=mask_d)


def launch_config(k: int, d: int) -> dict:
    """Block sizes, rows per program and warps: a program touches about 4K elements per tile."""
    block_k = min(triton.next_power_of_2(max(k, 1)), MAX_BLOCK)
    block_d = min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK)
    rows = max(1, min(16, 2048 // max(block_k, block_d)))
    tile = rows * max(block_k, block_d)
    return dict(ROWS=rows, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=max(1, min(8, tile // 512)))


def _grid(n: int, b: int, rows: int) -> tuple[int]:
    return (triton.cdiv(n * b, rows),)


def _direct(kernel):
    return kernel


def _targets(logits, feats, teacher, target_logits, target_feats):
    """The target tensors the kernels read, and whether they are per student (else: the teacher's rows)."""
    if target_logits is None:
        return logits, feats, False
    if target_feats is None:  # per-student logits, the teacher's own features: its rows, once per student
        # (clamped: an out-of-range teacher gives NaN through the logits' bounds check, not a device assert)
        row = teacher.reshape(1).clamp(0, feats.shape[0] - 1)
        target_feats = feats.index_select(0, row).expand_as(feats)
    return target_logits.contiguous(), target_feats.contiguous(), True


def student_loss_forward(logits: torch.Tensor, feats: torch.Tensor, teacher: torch.Tensor,
                         temperature: float, alpha: float, beta: float, launch=_direct,
                         target_logits: torch.Tensor | None = None, target_feats: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. logits ``[N, B, K]``, feats ``[N, B, D]`` (D may be 0), teacher 0-d int64.

    Returns ``(loss [N] float32, lse [N, B] float32)``; lse (of z/T) is kept for the backward.
    ``launch``: how to call a kernel (``torch.library.wrap_triton`` inside a triton_op).
    ``target_logits`` / ``target_feats`` (shaped like logits / feats): per-student targets.
    """
    n, b, k = logits.shape
    d = feats.shape[-1]
    logits, feats = logits.contiguous(), feats.contiguous()
    tgt_logits, tgt_feats, per_student = _targets(logits, feats, teacher, target_logits, target_feats)
    rows = torch.empty(n, b, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, b, device=logits.device, dtype=torch.float32)
    if n * b == 0 or k == 0:
        return rows.sum(1), lse
    config = launch_config(k, d)
    has_feats = d > 0 and beta != 0.0
    launch(_forward_kernel)[_grid(n, b, config["ROWS"])](
        logits, feats, tgt_logits, tgt_feats, teacher, rows, lse, n, b, k, d, 1.0 / temperature,
        alpha * temperature * temperature / b, (beta / (b * d)) if has_feats else 0.0,
        SINGLE=k <= config["BLOCK_K"], HAS_FEATS=has_feats, PER_STUDENT=per_student, **config)
    return rows.sum(1), lse


def student_loss_backward(grad: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor, teacher: torch.Tensor,
                          lse: torch.Tensor, temperature: float, alpha: float, beta: float, launch=_direct,
                          target_logits: torch.Tensor | None = None, target_feats: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: gradients w.r.t. logits and feats (zero rows for the teacher), contiguous."""
    n, b, k = logits.shape
    d = feats.shape[-1]
    logits, feats = logits.contiguous(), feats.contiguous()
    tgt_logits, tgt_feats, per_student = _targets(logits, feats, teacher, target_logits, target_feats)
    # the targets' log-sum-exp: the students' own (kept by the forward) when the teacher's rows are the targets
    tgt_lse = torch.logsumexp(tgt_logits.float() / temperature, dim=-1) if per_student else lse.contiguous()
    grad_logits = torch.empty_like(logits)
    has_feats = d > 0 and beta != 0.0
    grad_feats = torch.empty_like(feats) if has_feats else torch.zeros_like(feats)
    if n * b == 0 or k == 0:
        return grad_logits, grad_feats
    config = launch_config(k, d)
    # the loss's gradient is read through its stride: loss.sum() hands back ones expanded over the
    # networks (stride 0), and copying them to a contiguous tensor would be one more launch
    grad = grad.float()
    launch(_backward_kernel)[_grid(n, b, config["ROWS"])](
        grad, grad.stride(0), logits, feats, tgt_logits, tgt_feats, teacher, lse.contiguous(), tgt_lse,
        grad_logits, grad_feats, n, b, k, d,
        1.0 / temperature, alpha * temperature / b, (2.0 * beta / (b * d)) if has_feats else 0.0,
        HAS_FEATS=has_feats, PER_STUDENT=per_student, **config)
    return grad_logits, grad_feats
