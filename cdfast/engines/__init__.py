"""Engines decide how the N networks of a group are executed; the algorithm does not care.

Only ``sequential`` exists today (one network after another, the reference).
The CUDA-stream, CUDA-graph and fused (vmap) engines plug in here with the
same ``forward(networks, inputs)`` contract.
"""

from __future__ import annotations

from cdfast.engines.sequential import SequentialEngine

ENGINES = {"sequential": SequentialEngine}


def get_engine(name: str):
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}")
    return ENGINES[name]()


__all__ = ["get_engine", "ENGINES", "SequentialEngine"]
