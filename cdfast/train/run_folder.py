"""The run folder: what a training run writes, and how a folder is claimed, continued or restarted.

A run folder holds::

    .cdfast-run         marker: this folder was created by cdfast (written first)
    config.yaml         the settings in effect (rewritten when a resume changes them)
    changes.jsonl       settings changed by --resume-with-changes, with the step they took effect
    steps.csv           one row per training step (teacher, perturbation, losses)
    epochs.jsonl        one record per finished epoch (accuracies, teacher shares, speed)
    checkpoint.pt       the latest checkpoint; checkpoint.prev.pt the one before it
    summary.txt         the final table; accuracy.png, teacher_timeline.png, tensorboard/

A grid folder (``cdfast experiment``) holds ``grid.yaml`` (the grid it runs), ``results.jsonl``
(one record per finished run) and a run folder per ``<group>/<method>/seed-<k>``.

cdfast writes only into folders that are new, empty, or carry its marker, so it
never overwrites or appends to files it did not write. Records written after the
checkpoint a run continues from are cut back to it, so a resumed run's records
read exactly as an uninterrupted run's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cdfast.safe_write import atomic_write, remove_stale_temp
from cdfast.train.checkpoint import CHECKPOINT, PREV_CHECKPOINT

MARKER = ".cdfast-run"
CONFIG_FILE, CHANGES_FILE, SUMMARY_FILE = "config.yaml", "changes.jsonl", "summary.txt"
STEPS_FILE, EPOCHS_FILE, TENSORBOARD_DIR = "steps.csv", "epochs.jsonl", "tensorboard"
GRID_FILE, RESULTS_FILE = "grid.yaml", "results.jsonl"  # of a grid folder

__all__ = ["MARKER", "CONFIG_FILE", "CHANGES_FILE", "SUMMARY_FILE", "STEPS_FILE", "EPOCHS_FILE", "TENSORBOARD_DIR",
           "GRID_FILE", "RESULTS_FILE",
           "RunFolderError", "is_run_folder", "has_checkpoint", "claim_new", "check_restartable", "resolve_resume",
           "run_state",
           "lock_folder", "unlock_folder", "mark", "read_epochs", "truncate_records", "reset_records",
           "write_changes", "remove_stale_temp"]


class RunFolderError(ValueError):
    """A folder cannot be used as asked (foreign files, not a run folder, ...)."""


def is_run_folder(path: Path) -> bool:
    """Written by cdfast: its marker, or (folders from before the marker) a config and a checkpoint."""
    path = Path(path)
    return (path / MARKER).is_file() or ((path / CONFIG_FILE).is_file() and has_checkpoint(path))


def has_checkpoint(path: Path) -> bool:
    return (Path(path) / CHECKPOINT).is_file() or (Path(path) / PREV_CHECKPOINT).is_file()


def mark(path: Path) -> None:
    """Write the marker (once) and clear what interrupted writes left; only in a folder known to be cdfast's."""
    if not (path / MARKER).is_file():
        atomic_write(path / MARKER, json.dumps({"cdfast_run": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    removed = remove_stale_temp(path)
    if removed:
        print(f"cdfast: removed {len(removed)} temporary file(s) an interrupted write left in {path}")


def lock_folder(path: Path) -> int:
    """Take the run folder's lock (an exclusive ``flock`` on the folder) or refuse: one process per run."""
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock on this platform: run unguarded
        pass
    except OSError:
        os.close(fd)
        raise RunFolderError(f"{path} is in use by another cdfast process; wait for it to finish, or use another "
                             "--out folder (nothing there was touched)") from None
    return fd


def unlock_folder(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _user_entries(path: Path) -> list[str]:
    """What is in a folder, less the temp file an interrupted marker write may leave."""
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(f".{MARKER}."))


def claim_new(path: str | Path) -> tuple[int, bool]:
    """Make ``path`` the folder of a new run and lock it: ``(lock, restarted)``.

    Accepted: a missing or empty folder, or a cdfast run folder that holds no checkpoint
    (a run stopped before its first checkpoint: nothing trained is lost by starting over;
    ``restarted`` is then True and its records are gone). Refused, with nothing touched:
    a folder with files cdfast did not write, or one with a checkpoint (continue it with
    --resume), or one another process is using.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder; pass a new or empty folder")
    entries = _user_entries(path) if path.is_dir() else []
    if entries and not is_run_folder(path):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunFolderError(f"--out {path} holds files cdfast did not write ({shown}); pass a new or empty "
                             "folder (nothing there was touched)")
    path.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(path)
    try:
        if has_checkpoint(path):
            raise FileExistsError(f"{path} already holds a run; continue it with --resume {path}, "
                                  "or pass another --out folder (nothing there was touched)")
        if entries:
            check_restartable(path)
            reset_records(path)
        mark(path)
    except BaseException:
        unlock_folder(lock)
        raise
    return lock, bool(entries)


def new_run_folder(base: str) -> Path:
    """A folder name no other run has: ``base``, else ``base-2``, ``base-3``, ... (runs started in the same second)."""
    path, k = Path(base), 1
    while path.exists():
        k += 1
        path = Path(f"{base}-{k}")
    return path


def resolve_resume(path: str | Path) -> Path:
    """The run folder named by ``--resume`` (the folder, or a checkpoint file in it); nothing is written."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot resume: {folder} does not exist; pass the folder of a cdfast run")
    if not is_run_folder(folder):
        raise RunFolderError(f"cannot resume: {folder} is not a cdfast run folder (it has no {MARKER} marker, "
                             f"or no {CONFIG_FILE} and checkpoint)")
    return folder


def check_restartable(path: str | Path) -> None:
    """Refuse to start a run folder over when its records hold more than a first epoch, or a
    summary: a finished run whose checkpoints were deleted (or set aside as unreadable) would lose
    results no checkpoint can give back. (A run that died between its first epoch's record and
    its first checkpoint loses nothing by starting again.)"""
    path = Path(path)
    epochs = read_epochs(path)
    if len(epochs) > 1 or (path / SUMMARY_FILE).is_file():
        raise RunFolderError(
            f"{path} holds the records of {len(epochs)} finished epoch(s) but no readable checkpoint (deleted, or "
            "set aside as unreadable), so the run cannot continue, and starting it again would erase those records. "
            "Nothing there was touched: leave the folder as it is to keep its results (cdfast report reads them), "
            "or move it aside (or delete it) to train that run again")


def run_state(path: str | Path, epochs: int) -> str:
    """'done' (all epochs recorded and the run's summary written, which happens after its last
    checkpoint; the checkpoints themselves may have been deleted since), 'partial' (a run folder
    to continue) or 'new'."""
    path = Path(path)
    if not is_run_folder(path):
        return "new"
    finished = read_epochs(path)
    if finished and finished[-1]["epoch"] >= epochs and (path / SUMMARY_FILE).is_file():
        return "done"
    return "partial"


# ---- records ------------------------------------------------------------------------
def read_epochs(out: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records; a line cut short by a crash is skipped."""
    path = Path(out) / EPOCHS_FILE
    if not path.is_file() or path.is_symlink():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def truncate_records(out: str | Path, step: int, epoch: int) -> None:
    """Drop the records written after the checkpoint being resumed (a crash may have left some)."""
    out = Path(out)
    steps_path, epochs_path = out / STEPS_FILE, out / EPOCHS_FILE
    if steps_path.is_file() or steps_path.is_symlink():
        text = steps_path.read_text() if steps_path.is_file() and not steps_path.is_symlink() else ""
        reader = csv.DictReader(io.StringIO(text))
        fields = reader.fieldnames or []
        rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= step
                and None not in r and None not in r.values()]
        buffer = io.StringIO(newline="")
        if fields:
            writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\r\n")
            writer.writeheader()
            writer.writerows(rows)
        atomic_write(steps_path, buffer.getvalue())  # os.replace replaces a planted link, never its target
    if epochs_path.is_file() or epochs_path.is_symlink():
        keep = [json.dumps(r) for r in read_epochs(out) if r["epoch"] <= epoch] if not epochs_path.is_symlink() else []
        atomic_write(epochs_path, "".join(line + "\n" for line in keep))


def reset_records(out: str | Path) -> None:
    """Start a run folder's records over (a run that never checkpointed starts again from step 0)."""
    out = Path(out)
    for name in (STEPS_FILE, EPOCHS_FILE, CHANGES_FILE, SUMMARY_FILE):
        (out / name).unlink(missing_ok=True)  # a link is removed itself, never its target
    tb = out / TENSORBOARD_DIR
    if tb.is_symlink():
        tb.unlink()
    elif tb.is_dir():
        shutil.rmtree(tb)
    remove_stale_temp(out)


def write_changes(out: str | Path, changes: list[dict[str, Any]]) -> None:
    """Rewrite ``changes.jsonl`` from the history the checkpoint carries."""
    path = Path(out) / CHANGES_FILE
    if changes or path.exists():
        atomic_write(path, "".join(json.dumps(c) + "\n" for c in changes))
