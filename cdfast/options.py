"""The valid range of every numeric option, and the one check that enforces it.

The training config (YAML and ``cdfast train`` flags, :class:`cdfast.train.TrainConfig`),
:class:`cdfast.CompetitiveDistillation` and the functional API all check the shared
hyper-parameters through :func:`check_option`, so a value is refused the same way,
with the same message, wherever it comes in.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["RANGES", "check_number", "check_option", "describe_range"]

# name -> bounds (ge/gt/le/lt); every option is also required to be finite.
RANGES: dict[str, dict[str, float]] = {
    "alpha": {"ge": 0.0},
    "beta": {"ge": 0.0},
    "temperature": {"gt": 0.0},
    "perturb_prob": {"ge": 0.0, "le": 1.0},
    "perturb_every": {"ge": 1},
}


def describe_range(*, ge=None, gt=None, le=None, lt=None) -> str:
    parts = [f"{op} {v if isinstance(v, int) else f'{v:g}'}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
             if v is not None]
    return " and ".join(parts)


def check_number(name: str, value: Any, *, integer: bool = False, ge=None, gt=None, le=None, lt=None):
    """``value`` if it is a finite number (an integer if asked) within the bounds; else a clear error.

    Booleans and strings are refused (``"0.1"`` is not a number, ``True`` is not 1): a YAML file
    or a caller that passes them almost certainly meant something else.
    """
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    bounds = dict(ge=ge, gt=gt, le=le, lt=lt)
    ok = ((ge is None or value >= ge) and (gt is None or value > gt)
          and (le is None or value <= le) and (lt is None or value < lt))
    if not ok:
        raise ValueError(f"{name} must be {describe_range(**bounds)}, got {value}")
    return value


def check_option(name: str, value: Any) -> float:
    """Check one of the shared hyper-parameters of :data:`RANGES`; returns it as a float."""
    return float(check_number(name, value, **RANGES[name]))
