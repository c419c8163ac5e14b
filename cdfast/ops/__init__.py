"""The compiled ops, one file each: registration (schema or triton_op), fake, autograd, and the
dispatch between the compiled kernel and the PyTorch reference (:mod:`cdfast.reference`).

- :mod:`cdfast.ops.competitive_ce`: ``cdfast::competitive_ce`` (C++/CUDA in csrc/), CE of every
  network and the election in one op.
- :mod:`cdfast.ops.student_loss`: ``cdfast::group_student_loss`` (Triton in kernels/), the students'
  KL + feature L2 towards the teacher.

:mod:`cdfast.functional` checks arguments and calls the dispatchers; it does not know which
kernels exist.
"""

from cdfast.ops import competitive_ce, student_loss

__all__ = ["competitive_ce", "student_loss"]
