"""Triton kernels of cdfast, imported as ``cdfast.kernels`` (``cdfast/kernels`` links here).

``student_loss``: the fused group student loss (softmax + KL + feature L2 for
all students, teacher index read on the device), forward and backward; served
through the ``cdfast::group_student_loss`` op (``cdfast/ops/student_loss.py``).
Importing cdfast never requires Triton: without it, ``HAS_TRITON`` is False and
cdfast uses its PyTorch reference. Set ``TRITON_INTERPRET=1`` before importing
to run the kernels on CPU tensors (the tests do so on machines without a GPU).
"""

try:  # Triton is optional: CPU-only installs work without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
