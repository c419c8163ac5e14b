"""The options the group shares: their valid values, and the one check of each.

The training config (YAML and ``cdfast train`` flags, :class:`cdfast.train.TrainConfig`),
:class:`cdfast.CompetitiveDistillation` and the functional API all check the shared
options here (numbers through :func:`check_option`, named choices through
:func:`check_choice`, who-teaches-whom through :func:`check_teachers`), so a value is
refused the same way, with the same message, wherever it comes in.

Who learns from whom is said in two words everywhere (class, config, CLI, functional):
``mode`` (``competitive``: an elected teacher; ``dml``: every network learns from every
other; ``independent``: labels only) and, in competitive mode, ``teachers`` (``best``:
the elected network teaches all; ``all-better``: each learns from every network that did
better). The perturbation is one word too: one network's batch is *perturbed*
(``perturb``, ``perturb_*``, ``perturbed_bn``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["RANGES", "CHOICES", "MODES", "TEACHER_RULES", "ELECTIONS", "PERTURBED_BN", "check_number",
           "check_option", "check_choice", "check_flag", "check_teachers", "describe_range", "perturbs"]

MODES = ("competitive", "dml", "independent")
TEACHER_RULES = ("best", "all-better")  # who teaches in competitive mode
ELECTIONS = ("ce", "clean-equivalent")
PERTURBED_BN = ("frozen", "updated", "clean")  # the perturbed network's BatchNorm running statistics


def perturbs(perturb: bool | None, mode: str) -> bool:
    """Whether a group with these settings perturbs one network's batch (None: on in competitive mode)."""
    return perturb if perturb is not None else mode == "competitive"

# name -> the values it may take
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "teachers": TEACHER_RULES,
    "election": ELECTIONS,
    "perturbed_bn": PERTURBED_BN,
}

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


def check_choice(name: str, value: Any, choices=None) -> Any:
    """``value`` if it is one of ``choices`` (default: :data:`CHOICES` of ``name``); else a clear error."""
    choices = CHOICES[name] if choices is None else choices
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not 0/1, not a string); else a clear error."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {type(value).__name__} {value!r}")
    return value


def check_teachers(mode: str, teachers: str) -> None:
    """Check who learns from whom: a known ``mode`` and, with it, a ``teachers`` rule it accepts."""
    check_choice("mode", mode)
    check_choice("teachers", teachers)
    if mode != "competitive" and teachers != "best":
        raise ValueError(f"teachers={teachers!r} only applies to mode='competitive' (got mode={mode!r}); "
                         "dml already learns from every other network")
