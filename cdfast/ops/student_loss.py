"""The torch.library op ``cdfast::group_student_loss``: fused Triton kernels on CUDA, the reference elsewhere.

``group_student_loss(logits [N, B, K], feats [N, B, D], teacher, T, alpha, beta,
target_logits=None, target_feats=None) -> (loss [N] float32, lse [N, B] float32)``;
D may be 0 (no feature term); the optional targets (shaped like logits / feats) are
per-student targets instead of the teacher's rows. It
is a ``torch.library.triton_op`` (when Triton is installed): eager calls launch
the kernels directly, and ``torch.compile`` traces into the op's body, so
inductor sees the Triton kernels themselves rather than an opaque call. Its
autograd sends gradients to the students only; there is no host sync, so it
can be captured in a CUDA graph. The kernels live in ``kernels/`` (``cdfast.kernels``).
:func:`dispatch` is what :func:`cdfast.functional.group_student_loss` calls: the op under
``torch.compile``, the same kernels from a plain autograd Function in eager mode (less host time).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

from cdfast import reference
from cdfast.kernels import HAS_TRITON

log = logging.getLogger("cdfast")

if HAS_TRITON:
    from torch.library import wrap_triton

    from cdfast.kernels.student_loss import student_loss_backward, student_loss_forward


def fused_available(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernels serve tensors on ``device`` (CUDA with Triton installed) of ``dtype``.

    float64 is not served: the kernels accumulate in float32, and whoever trains in float64 wants
    float64 all the way (the reference gives it).
    """
    return HAS_TRITON and device.type == "cuda" and dtype != torch.float64


def _on_device(device: torch.device):
    """Make ``device`` current for the Triton launches (they go to the current device) only when it is
    not already: entering ``torch.cuda.device`` costs two driver calls per launch otherwise."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _feats_or_none(feats: Tensor) -> Tensor | None:
    return feats if feats.shape[-1] > 0 else None


def _forward_reference(logits, feats, teacher, temperature, alpha, beta, target_logits=None, target_feats=None):
    loss = reference.group_student_loss(logits, _feats_or_none(feats), teacher, temperature=temperature,
                                        alpha=alpha, beta=beta, target_logits=target_logits,
                                        target_feats=target_feats)
    return loss, torch.logsumexp(logits.float() / temperature, dim=-1)


def _backward_reference(grad, logits, feats, teacher, lse, temperature, alpha, beta, target_logits=None,
                        target_feats=None):
    grad_logits, grad_feats = reference.group_student_loss_backward(
        grad, logits, feats, teacher, temperature=temperature, alpha=alpha, beta=beta,
        target_logits=target_logits, target_feats=target_feats)
    return grad_logits.contiguous(), grad_feats.contiguous()


def _define(name: str):
    """``torch.library.triton_op`` where Triton is installed (torch.compile then traces into the Triton
    kernels and schedules them with the rest of the graph), an opaque ``custom_op`` otherwise."""
    if HAS_TRITON:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


@_define("cdfast::group_student_loss")
def group_student_loss(logits: Tensor, feats: Tensor, teacher: Tensor, temperature: float, alpha: float,
                       beta: float, target_logits: Tensor | None = None,
                       target_feats: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if not fused_available(logits.device):  # a static branch: the device is known when this is traced
        return _forward_reference(logits, feats, teacher, temperature, alpha, beta, target_logits, target_feats)
    with _on_device(logits.device):  # Triton launches on the current device: make it the tensors'
        return student_loss_forward(logits, feats, teacher, temperature, alpha, beta, launch=wrap_triton,
                                    target_logits=target_logits, target_feats=target_feats)


@_define("cdfast::group_student_loss_backward")
def group_student_loss_backward(grad: Tensor, logits: Tensor, feats: Tensor, teacher: Tensor, lse: Tensor,
                                temperature: float, alpha: float, beta: float, target_logits: Tensor | None = None,
                                target_feats: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if not fused_available(logits.device):
        return _backward_reference(grad, logits, feats, teacher, lse, temperature, alpha, beta, target_logits,
                                   target_feats)
    with _on_device(logits.device):
        return student_loss_backward(grad, logits, feats, teacher, lse, temperature, alpha, beta, launch=wrap_triton,
                                     target_logits=target_logits, target_feats=target_feats)


if not HAS_TRITON:  # a triton_op's fake is its own traced body; a custom_op needs one

    @group_student_loss.register_fake
    def _group_student_loss_fake(logits, feats, teacher, temperature, alpha, beta, target_logits=None,
                                 target_feats=None):
        n, b = logits.shape[:2]
        return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, b, dtype=torch.float32)

    @group_student_loss_backward.register_fake
    def _group_student_loss_backward_fake(grad, logits, feats, teacher, lse, temperature, alpha, beta,
                                          target_logits=None, target_feats=None):
        # contiguous, like every real kernel's output (not empty_like, which copies the inputs' strides)
        return logits.new_empty(logits.shape), feats.new_empty(feats.shape)


def _setup_context(ctx, inputs, output):
    logits, feats, teacher, temperature, alpha, beta, target_logits, target_feats = inputs
    ctx.save_for_backward(logits, feats, teacher, output[1], target_logits, target_feats)
    ctx.hyper = (temperature, alpha, beta)


def _backward(ctx, grad_loss, grad_lse):
    logits, feats, teacher, lse, target_logits, target_feats = ctx.saved_tensors
    grad_logits, grad_feats = group_student_loss_backward(grad_loss, logits, feats, teacher, lse, *ctx.hyper,
                                                          target_logits, target_feats)
    # lse is an auxiliary output, the targets are constants: no gradient
    return grad_logits, grad_feats, None, None, None, None, None, None


group_student_loss.register_autograd(_backward, setup_context=_setup_context)


class _EagerStudentLoss(torch.autograd.Function):
    """The same kernels as the op, launched straight from a plain autograd Function.

    Eager calls of a ``triton_op`` cross the dispatcher, a Python autograd wrapper and
    ``wrap_triton`` for each of the forward and the backward: about 200 µs of host time per
    fwd+bwd on a 2-core CPU, against about 30 µs for the launches themselves, and the loss is
    launch-bound at training sizes. The op stays what ``torch.compile`` sees (:func:`dispatch`)."""

    @staticmethod
    def forward(ctx, logits, feats, teacher, temperature, alpha, beta, target_logits, target_feats):
        with _on_device(logits.device):
            loss, lse = student_loss_forward(logits, feats, teacher, temperature, alpha, beta,
                                             target_logits=target_logits, target_feats=target_feats)
        ctx.save_for_backward(logits, feats, teacher, lse, target_logits, target_feats)
        ctx.hyper = (temperature, alpha, beta)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, feats, teacher, lse, target_logits, target_feats = ctx.saved_tensors
        with _on_device(logits.device):
            grad_logits, grad_feats = student_loss_backward(grad_loss, logits, feats, teacher, lse, *ctx.hyper,
                                                            target_logits=target_logits, target_feats=target_feats)
        return grad_logits, grad_feats, None, None, None, None, None, None


def dispatch(logits: Tensor, feats: Tensor | None, teacher: Tensor, temperature: float, alpha: float, beta: float,
             target_logits: Tensor | None = None, target_feats: Tensor | None = None) -> Tensor:
    """The group student loss ``[N]`` of checked inputs: the fused op where the Triton kernels serve
    the device and dtype, the reference (float64 stays float64) elsewhere."""
    if fused_available(logits.device, logits.dtype):
        use_feats = feats is not None and beta != 0.0
        flat = feats.flatten(2) if use_feats else logits.new_zeros(*logits.shape[:2], 0)
        flat_target = target_feats.flatten(2) if (use_feats and target_feats is not None) else None
        args = (logits, flat, teacher, float(temperature), float(alpha), float(beta), target_logits, flat_target)
        if torch.compiler.is_compiling():  # the op: inductor traces into its Triton kernels
            return torch.ops.cdfast.group_student_loss(*args)[0]
        return _EagerStudentLoss.apply(*args)
    return reference.group_student_loss(logits, feats, teacher, temperature=temperature, alpha=alpha, beta=beta,
                                        target_logits=target_logits, target_feats=target_feats)
