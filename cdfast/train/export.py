"""One member of a trained group, out of its run: a plain state_dict or a ``torch.export`` program.

``cdfast export RUN --member i`` writes what a user deploys: network i's weights with plain
keys (no ``networks.i.`` group prefix, no ``model.`` of a FeatureTap wrapper), loadable into
``cdfast.models.build_model(name, ...)``; or, with ``--program``, a ``torch.export`` program
that needs no cdfast at all to run and returns logits (``torch.export.load(path).module()(x)``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cdfast.safe_write import atomic_write

__all__ = ["member_state_dict", "export_member"]


def _latest_state(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    from cdfast.train import run_folder
    from cdfast.train.checkpoint import load_latest

    folder = run_folder.resolve_resume(run_dir)
    loaded = load_latest(folder)
    if loaded is None:
        raise FileNotFoundError(f"{folder} holds no readable checkpoint to export from")
    return folder, loaded.state


def member_state_dict(run_dir: str | Path, member: int) -> dict[str, torch.Tensor]:
    """Network ``member``'s weights from the run's latest checkpoint, with plain keys."""
    _, state = _latest_state(run_dir)
    return _plain_weights(state, member)


def _plain_weights(state: dict[str, Any], member: int) -> dict[str, torch.Tensor]:
    models = state["config"]["models"]
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < len(models):
        raise ValueError(f"member must be a network of the group: 0..{len(models) - 1} ({', '.join(models)}), "
                         f"got {member!r}")
    prefix = f"networks.{member}."
    weights = {k[len(prefix):]: v for k, v in state["group"].items() if k.startswith(prefix)}
    if weights and all(k.startswith("model.") for k in weights):  # a FeatureTap wrapper
        weights = {k[len("model."):]: v for k, v in weights.items()}
    return weights


def _model_io(state: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
    """(classes, input shape) of the run's networks: recorded in checkpoints, else from the data set."""
    io = state.get("model_io")
    if io:
        return int(io["num_classes"]), tuple(io["input_shape"])
    from cdfast.data import IN_MEMORY

    cfg = state["config"]
    if cfg["data"] in IN_MEMORY:
        spec = IN_MEMORY[cfg["data"]]
        side = 28 if cfg["data"] == "fashion-mnist" else 32
        return spec.classes, (spec.channels, side, side)
    raise ValueError("this checkpoint predates the recorded input shape; resume it for one epoch with a current "
                     "cdfast, or export the state_dict (without --program)")


class _Logits(nn.Module):
    """A member as deployed: images in, logits out (the features are for training only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def export_member(run_dir: str | Path, member: int, out: str | Path | None = None, *, program: bool = False,
                  force: bool = False) -> Path:
    """Write network ``member`` of the run: its plain state_dict (``.pt``) or a ``torch.export`` program (``.pt2``).

    ``out`` defaults to ``RUN/member-<i>.pt`` (``.pt2``); an existing file is kept unless ``force``.
    """
    from cdfast.models import build_model

    folder, state = _latest_state(run_dir)
    weights = _plain_weights(state, member)
    out = Path(out) if out is not None else folder / f"member-{member}.{'pt2' if program else 'pt'}"
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass another --out, or --force to replace it")
    if not program:
        buf = io.BytesIO()
        torch.save(weights, buf)
        atomic_write(out, buf.getvalue())
        return out
    cfg = state["config"]
    classes, shape = _model_io(state)
    model = build_model(cfg["models"][member], classes, shape[0], cfg.get("features", "pooled"))
    model.load_state_dict(weights)
    # any batch size: the batch dimension stays symbolic
    exported = torch.export.export(_Logits(model).eval(), (torch.randn(2, *shape),),
                                   dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))

    buf = io.BytesIO()
    torch.export.save(exported, buf)
    atomic_write(out, buf.getvalue())
    return out
