"""Fused Triton kernels of the group student loss (softmax + KL + feature L2, all students at once).

For stacked logits ``[N, B, K]``, features ``[N, B, D]`` and the teacher index as a
device tensor, network i's loss is

    alpha * T^2 * mean_b KL(softmax(z_t/T) || softmax(z_i/T)) + beta * mean((F_i - F_t)^2),  0 for i == t.

One program per (network, sample): the teacher index is loaded inside the
kernel, so there is no host sync and no Python branch on who teaches. Forward:
two passes over K (online max/sum, then the KL sum) and one over D, then a
deterministic sum over the batch. Backward: gradients to the students only
(the teacher's outputs are constants), ``alpha*T/B * (p_i - p_t)`` and
``2*beta/(B*D) * (F_i - F_t)``. Accumulation is fp32 for fp32/fp16/bf16 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _feature_diff(fs_row, ft_row, offs, mask):
    """F_i - F_t for one block of a sample's features, in fp32."""
    return tl.load(fs_row + offs, mask=mask, other=0.0).to(tl.float32) - \
        tl.load(ft_row + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _scaled_logits(row, offs, mask, inv_t, other: tl.constexpr):
    """z/T for one block of a row, in fp32; masked lanes hold ``other``."""
    return tl.load(row + offs, mask=mask, other=other).to(tl.float32) * inv_t


@triton.jit
def _forward_kernel(logits_ptr, feats_ptr, teacher_ptr, rows_ptr, lse_ptr,
                    B, K, D, inv_t, kl_scale, fl_scale,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_FEATS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t = tl.load(teacher_ptr).to(tl.int64)
    s_row = logits_ptr + (i * B + b) * K
    t_row = logits_ptr + (t * B + b) * K

    # pass 1: log-sum-exp of z/T for the student row and the teacher row (online max and sum)
    m_s = tl.full([], float("-inf"), tl.float32)
    m_t = tl.full([], float("-inf"), tl.float32)
    d_s = tl.zeros([], tl.float32)
    d_t = tl.zeros([], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        zs = _scaled_logits(s_row, offs, mask, inv_t, float("-inf"))
        zt = _scaled_logits(t_row, offs, mask, inv_t, float("-inf"))
        new_s = tl.maximum(m_s, tl.max(zs, axis=0))
        new_t = tl.maximum(m_t, tl.max(zt, axis=0))
        d_s = d_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(zs - new_s), axis=0)
        d_t = d_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(zt - new_t), axis=0)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)

    # pass 2: KL(p_t || p_s) = sum_k p_t (z_t - z_s)/T - lse_t + lse_s
    acc = tl.zeros([], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        zs = _scaled_logits(s_row, offs, mask, inv_t, 0.0)
        zt = _scaled_logits(t_row, offs, mask, inv_t, 0.0)
        pt = tl.where(mask, tl.exp(zt - lse_t), 0.0)
        acc += tl.sum(pt * (zt - zs), axis=0)
    loss = (acc - lse_t + lse_s) * kl_scale

    if HAS_FEATS:
        fs_row = feats_ptr + (i * B + b) * D
        ft_row = feats_ptr + (t * B + b) * D
        sq = tl.zeros([], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < D
            diff = _feature_diff(fs_row, ft_row, offs, mask)
            sq += tl.sum(diff * diff, axis=0)
        loss += sq * fl_scale

    tl.store(rows_ptr + i * B + b, tl.where(i == t, 0.0, loss))
    tl.store(lse_ptr + i * B + b, lse_s)


@triton.jit
def _backward_kernel(grad_ptr, logits_ptr, feats_ptr, teacher_ptr, lse_ptr, grad_logits_ptr, grad_feats_ptr,
                     B, K, D, inv_t, kl_grad_scale, fl_grad_scale,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_FEATS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    t = tl.load(teacher_ptr).to(tl.int64)
    g = tl.where(i == t, 0.0, tl.load(grad_ptr + i).to(tl.float32))  # the teacher gets nothing
    lse_s = tl.load(lse_ptr + i * B + b)
    lse_t = tl.load(lse_ptr + t * B + b)
    s_row = logits_ptr + (i * B + b) * K
    t_row = logits_ptr + (t * B + b) * K
    out_row = grad_logits_ptr + (i * B + b) * K
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        zs = _scaled_logits(s_row, offs, mask, inv_t, 0.0)
        zt = _scaled_logits(t_row, offs, mask, inv_t, 0.0)
        value = g * kl_grad_scale * (tl.exp(zs - lse_s) - tl.exp(zt - lse_t))
        tl.store(out_row + offs, value.to(grad_logits_ptr.dtype.element_ty), mask=mask)
    if HAS_FEATS:
        fs_row = feats_ptr + (i * B + b) * D
        ft_row = feats_ptr + (t * B + b) * D
        out_f = grad_feats_ptr + (i * B + b) * D
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            mask = offs < D
            diff = _feature_diff(fs_row, ft_row, offs, mask)
            tl.store(out_f + offs, (g * fl_grad_scale * diff).to(grad_feats_ptr.dtype.element_ty), mask=mask)


def _blocks(k: int, d: int) -> tuple[int, int]:
    return min(triton.next_power_of_2(max(k, 1)), 4096), min(triton.next_power_of_2(max(d, 1)), 4096)


def student_loss_forward(logits: torch.Tensor, feats: torch.Tensor, teacher: torch.Tensor,
                         temperature: float, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. logits ``[N, B, K]``, feats ``[N, B, D]`` (D may be 0), teacher 0-d int64.

    Returns ``(loss [N] float32, lse [N, B] float32)``; lse (of z/T) is kept for the backward.
    """
    n, b, k = logits.shape
    d = feats.shape[-1]
    logits, feats = logits.contiguous(), feats.contiguous()
    rows = torch.empty(n, b, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n, b, device=logits.device, dtype=torch.float32)
    block_k, block_d = _blocks(k, d)
    has_feats = d > 0 and beta != 0.0
    _forward_kernel[(n, b)](
        logits, feats, teacher, rows, lse, b, k, d, 1.0 / temperature,
        alpha * temperature * temperature / b, (beta / (b * d)) if has_feats else 0.0,
        BLOCK_K=block_k, BLOCK_D=block_d, HAS_FEATS=has_feats)
    return rows.sum(1), lse


def student_loss_backward(grad: torch.Tensor, logits: torch.Tensor, feats: torch.Tensor, teacher: torch.Tensor,
                          lse: torch.Tensor, temperature: float, alpha: float, beta: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward: gradients w.r.t. logits and feats (zero rows for the teacher)."""
    n, b, k = logits.shape
    d = feats.shape[-1]
    logits, feats = logits.contiguous(), feats.contiguous()
    grad_logits = torch.empty_like(logits)
    grad_feats = torch.zeros_like(feats) if d == 0 or beta == 0.0 else torch.empty_like(feats)
    block_k, block_d = _blocks(k, d)
    has_feats = d > 0 and beta != 0.0
    _backward_kernel[(n, b)](
        grad.contiguous().float(), logits, feats, teacher, lse, grad_logits, grad_feats, b, k, d, 1.0 / temperature,
        alpha * temperature / b, (2.0 * beta / (b * d)) if has_feats else 0.0,
        BLOCK_K=block_k, BLOCK_D=block_d, HAS_FEATS=has_feats)
    return grad_logits, grad_feats
