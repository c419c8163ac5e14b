"""Triton kernels of cdfast, installed as ``cdfast.kernels``.

Empty for now: the fused student loss (softmax + KL + feature L2 for the whole
group) lands here, behind :func:`cdfast.functional.group_student_loss`.
Importing cdfast never requires Triton.
"""

try:  # Triton is optional: CPU-only installs work without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
