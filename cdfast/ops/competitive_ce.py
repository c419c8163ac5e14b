"""The op ``cdfast::competitive_ce``: loading ``cdfast._C``, its fake (meta) implementation, and
the dispatch between the compiled kernel and the PyTorch reference.

The schemas, kernels and the autograd of ``cdfast::competitive_ce`` live in csrc/
(torch.library namespace ``cdfast``; the autograd is C++, so a call never enters
Python to build its graph node). When the compiled library is missing (a
CDFAST_BUILD_EXT=0 install, or a build for another torch), cdfast still imports,
logs one line, and :func:`competitive_ce` uses the PyTorch reference instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from torch import Tensor

from cdfast import reference

log = logging.getLogger("cdfast")

HAS_EXTENSION = False
WITH_CUDA = False

REBUILD = ("rebuild them under this torch: `pip install --no-build-isolation -e .` in a checkout, or "
           "`pip install --no-build-isolation --force-reinstall --no-deps --no-cache-dir --no-binary cdfast cdfast`")


def why_not_load(origin: str | None, torch_version: str) -> str | None:
    """Why ``cdfast._C`` (found at ``origin``, None: not found) must not be loaded under ``torch_version``, or None."""
    if origin is None:
        return ("cdfast's compiled ops are not built (an install with CDFAST_BUILD_EXT=0, or a source tree "
                f"without a build); using the PyTorch reference. To build them, {REBUILD.split(': ', 1)[1]}")
    stamp = os.path.join(os.path.dirname(origin), "_C.torch_version")
    built_for = open(stamp).read().strip() if os.path.isfile(stamp) else None
    if built_for is not None and built_for != torch_version:
        return (f"cdfast's compiled ops were built against torch {built_for}, and this is torch {torch_version}: "
                f"not loading them (a library built for another torch can crash); using the PyTorch reference. "
                f"To use them, {REBUILD}")
    return None


if os.environ.get("CDFAST_DISABLE_OPS", "").strip().lower() in ("1", "true", "yes", "on"):
    log.info("cdfast: CDFAST_DISABLE_OPS is set; using the PyTorch reference ops")
else:
    _spec = importlib.util.find_spec("cdfast._C")
    _why = why_not_load(_spec.origin if _spec is not None else None, torch.__version__)
    if _why is not None:
        log.warning("cdfast: %s", _why)
    else:
        try:
            from cdfast import _C  # noqa: F401  (loading the library registers torch.ops.cdfast.*)

            HAS_EXTENSION = True
            WITH_CUDA = bool(_C.WITH_CUDA)
        except ImportError as e:  # e.g. undefined symbols: built against another torch without a version stamp
            log.warning("cdfast: the compiled ops failed to load (%s); using the PyTorch reference. The usual cause "
                        "is a build for another torch: %s", e, REBUILD)


def op_available(device: torch.device) -> bool:
    """Whether ``torch.ops.cdfast.competitive_ce`` has a kernel for tensors on ``device``."""
    if not HAS_EXTENSION:
        return False
    return device.type == "cpu" or (device.type == "cuda" and WITH_CUDA)


def uses_op(logits: Tensor, targets: Tensor, targets_b: Tensor | None, lam: Tensor | None) -> bool:
    """Whether :func:`competitive_ce` runs the compiled op for these inputs (which then checks label
    values itself: the CPU kernel with an error, the CUDA one with a device assert). The op
    differentiates the logits only: targets or weights that need a gradient take the reference."""
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (targets, targets_b, lam))
    return op_available(logits.device) and not needs_grad


def competitive_ce(logits: Tensor, targets: Tensor, targets_b: Tensor | None, lam: Tensor | None,
                   label_smoothing: float = 0.0, ignore_index: int | None = None) -> tuple[Tensor, Tensor]:
    """``(ce, teacher)`` of checked inputs (class indices ``[*G, N, B]`` or ``[B]``, class probabilities
    ``[*G, N, B, K]`` or ``[B, K]``): the compiled op where it has a kernel for the device (one fused
    launch, no host sync), the reference elsewhere."""
    if uses_op(logits, targets, targets_b, lam):
        shape = logits.shape if targets.is_floating_point() else logits.shape[:-1]
        ce, teacher, _ = torch.ops.cdfast.competitive_ce(logits, targets.expand(shape), targets_b, lam,
                                                         label_smoothing, ignore_index)
        return ce, teacher
    return reference.competitive_ce(logits, targets, targets_b, lam, label_smoothing=label_smoothing,
                                    ignore_index=ignore_index)


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


if HAS_EXTENSION:

    @torch.library.register_fake("cdfast::competitive_ce")
    def _competitive_ce_fake(logits, targets, targets_b, lam, label_smoothing=0.0, ignore_index=None):
        torch._check(logits.dim() >= 3, lambda: f"logits must be [*G, N, B, K], got {logits.dim()} dims")
        want = logits.shape if targets.is_floating_point() else logits.shape[:-1]  # probabilities / indices
        torch._check(tuple(targets.shape) == tuple(want),
                     lambda: f"targets {list(targets.shape)} must have shape {list(want)}")
        acc = _acc_dtype(logits)
        return (logits.new_empty(logits.shape[:-2], dtype=acc),
                logits.new_empty(logits.shape[:-3], dtype=torch.int64),
                logits.new_empty(logits.shape[:-1], dtype=acc))

    @torch.library.register_fake("cdfast::competitive_ce_backward")
    def _competitive_ce_backward_fake(grad_ce, grad_lse, logits, targets, targets_b, lam, lse, label_smoothing=0.0,
                                      ignore_index=None):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)
