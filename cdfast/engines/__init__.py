"""Engines decide how the N networks of a group are executed; the algorithm does not care.

- ``sequential``: one network after another (the reference; what public code does).
- ``streams``: each network on its own CUDA stream (forward and backward overlap).
- ``fused``: identical networks stacked and run as one with ``torch.func.vmap``.
- ``auto``: on a GPU, every engine that can run the group is timed on the first batch and
  the fastest is kept (:mod:`cdfast.engines.auto`); on the CPU ``sequential`` (fused is
  slower there, streams do not exist).
- ``graph`` (= ``sequential+graph``), ``fused+graph``: the whole training step (perturbation,
  forwards, election, losses, backward, optimizer steps) captured in CUDA graphs and
  replayed (:mod:`cdfast.engines.graph`); the part before ``+`` runs the forwards.

The contract is the :class:`Engine` protocol below. Every engine takes ``compile_options`` (None, or keyword arguments of
``torch.compile``): sequential and streams compile each network's forward,
fused compiles the vmapped forward of the whole group.
"""

from __future__ import annotations

import logging
from typing import Protocol, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from cdfast.engines.fused import FusedEngine, why_not_fusable
from cdfast.engines.sequential import SequentialEngine
from cdfast.engines.streams import StreamsEngine

log = logging.getLogger("cdfast")

class Engine(Protocol):
    """How the N networks of a group run their forwards (the backward follows autograd)."""

    name: str
    compile_options: dict | None  # None: eager; else keyword arguments of torch.compile

    def forward(self, networks: Sequence[nn.Module], inputs: Sequence[Tensor], frozen_bn=-1) -> list:
        """Each network's output on its own input; networks in ``frozen_bn`` (an index, -1 for none,
        or a collection) must not update their BatchNorm running statistics."""
        ...


ENGINES = {"sequential": SequentialEngine, "streams": StreamsEngine, "fused": FusedEngine}
GRAPHED = {"graph": "sequential", "sequential+graph": "sequential", "fused+graph": "fused"}
ENGINE_CHOICES = ("auto", *ENGINES, *GRAPHED)


def network_device(networks: Sequence[nn.Module]) -> torch.device:
    """Where the group's parameters live (the first network's), CPU for parameter-free networks."""
    param = next(networks[0].parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_engine_name(name: str) -> None:
    if name == "streams+graph":
        raise ValueError("engine 'streams+graph' is not offered: side streams inside a captured step are not "
                         "supported here, and the graph already removes the launch gaps streams hide; use "
                         "'graph' or 'fused+graph'")
    if name not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_CHOICES)}")


def split_engine_name(name: str) -> tuple[str, bool]:
    """``(engine that runs the forwards, whether the step is captured in CUDA graphs)``."""
    check_engine_name(name)
    return (GRAPHED[name], True) if name in GRAPHED else (name, False)


def get_engine(name: str, networks: Sequence[nn.Module], compile_options: dict | None = None) -> Engine:
    """The engine ``name`` for this group; falls back (with a message) where it cannot run.

    ``compile_options``: None for eager execution, else keyword arguments of ``torch.compile``.
    """
    check_engine_name(name)
    reason = why_not_fusable(networks)
    on_gpu = network_device(networks).type == "cuda"
    if name == "auto":
        name = ("fused" if reason is None else "streams") if on_gpu else "sequential"
        log.info("cdfast: engine auto -> %s", name)
    elif name == "fused" and reason is not None:
        fallback = "streams" if on_gpu else "sequential"
        log.warning("cdfast: the fused engine needs identical networks (%s); using the %s engine", reason, fallback)
        name = fallback
    elif name == "streams" and not on_gpu:
        log.warning("cdfast: the streams engine needs CUDA; using the sequential engine on %s",
                    network_device(networks))
        name = "sequential"
    return ENGINES[name](compile_options)


__all__ = ["Engine", "get_engine", "check_engine_name", "split_engine_name", "network_device", "ENGINES", "ENGINE_CHOICES",
           "SequentialEngine", "StreamsEngine", "FusedEngine", "why_not_fusable"]
