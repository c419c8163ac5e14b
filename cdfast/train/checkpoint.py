"""Checkpoints: written atomically, the previous one kept, loaded without running any code.

``checkpoint.pt`` is the latest; ``checkpoint.prev.pt`` the one before it. A new
checkpoint is serialised and fsynced under a fresh temporary name first; only
then does the latest become the previous one and the new file the latest, so a
crash at any moment leaves at least one complete checkpoint. Loading uses
``torch.load(weights_only=True)``: a crafted file cannot run code, it is
refused as unreadable.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cdfast.safe_write import WriteError, atomic_write, describe, fsync_dir

log = logging.getLogger("cdfast")

FORMAT_VERSION = 1
CHECKPOINT, PREV_CHECKPOINT = "checkpoint.pt", "checkpoint.prev.pt"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, crafted, or not a cdfast checkpoint."""


def _serialise(state: dict[str, Any]) -> bytes:
    # In memory first: torch.save's own file writer turns a full disk into a cryptic
    # "unexpected pos" error; writing the bytes ourselves gives a plain OSError.
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    return buffer.getvalue()


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write one checkpoint file atomically (nothing else is touched)."""
    atomic_write(path, _serialise(state))


def _keep_as_previous(latest: Path, prev: Path) -> None:
    """Make ``prev`` a copy of ``latest`` while ``latest`` stays in place (a hard link; a rename where
    the file system has no hard links, leaving a moment where only ``prev`` exists)."""
    link = latest.with_name(f".{prev.name}.link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(latest, link, follow_symlinks=False)
    except OSError:
        os.replace(latest, prev)
        return
    os.replace(link, prev)


def save_checkpoint(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``folder/checkpoint.pt``, keeping the one it replaces as ``checkpoint.prev.pt``."""
    folder = Path(folder)
    latest, prev = folder / CHECKPOINT, folder / PREV_CHECKPOINT
    data = _serialise(state)
    staged = folder / f".{CHECKPOINT}.staged.tmp"
    staged.unlink(missing_ok=True)  # a leftover from a crash (atomic_write never writes through it anyway)
    try:
        atomic_write(staged, data)
    except WriteError as e:
        raise WriteError(e.errno, describe(OSError(e.errno, os.strerror(e.errno or 0)), latest)) from e
    try:
        if latest.exists():
            _keep_as_previous(latest, prev)
        os.replace(staged, latest)
    except OSError as e:
        raise WriteError(e.errno, f"could not put the new checkpoint in place in {folder}: {e.strerror or e}") from e
    fsync_dir(folder)
    return latest


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by cdfast, with a clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first[:200]}); it is corrupt, "
                              "truncated, or not a cdfast checkpoint (cdfast never runs code from a checkpoint)") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a cdfast checkpoint of format {FORMAT_VERSION}")
    missing = [k for k in ("config", "epoch", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not a cdfast training checkpoint")
    return state


class Loaded(NamedTuple):
    state: dict[str, Any]
    path: Path
    corrupt: list[Path]  # newer checkpoints that could not be read (to be moved aside)


def load_latest(folder: str | Path) -> Loaded | None:
    """The newest readable checkpoint of a run folder, or None if it has none at all.

    A corrupt ``checkpoint.pt`` falls back to ``checkpoint.prev.pt`` with a warning; if
    every checkpoint present is unreadable, the error says how to start the run again.
    """
    folder = Path(folder)
    errors: list[CheckpointError] = []
    corrupt: list[Path] = []
    for name in (CHECKPOINT, PREV_CHECKPOINT):
        path = folder / name
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(e)
            corrupt.append(path)
            continue
        if errors:
            from cdfast.train.trainer import position

            log.warning("cdfast: %s; resuming from the previous checkpoint %s (%s) instead",
                        errors[0], path, position(state["epoch"], state["step"], state.get("epoch_progress")))
        return Loaded(state, path, corrupt)
    if errors:
        names = " and ".join(p.name for p in corrupt)
        raise CheckpointError(f"{errors[0]}. No readable checkpoint is left in {folder}, so the run cannot "
                              f"continue: start it again in another --out folder (or, if it recorded at most one "
                              f"epoch, move {names} out of the folder and --resume {folder} starts it from step 0)")
    return None


def set_aside(path: Path, why: str = "corrupt") -> Path:
    """Rename a checkpoint out of the rotation (it must never become the 'previous' one), to
    ``<name>.<why>.pt`` (``.<why>-2.pt``, ... where that name is taken: nothing set aside earlier
    is overwritten)."""
    stem = path.name.removesuffix(".pt")
    target, k = path.with_name(f"{stem}.{why}.pt"), 1
    while target.exists() or target.is_symlink():
        k += 1
        target = path.with_name(f"{stem}.{why}-{k}.pt")
    os.replace(path, target)
    return target
