"""Crash-safe, link-safe file writes: every file cdfast writes goes through here.

- :func:`atomic_write` replaces a file as a whole: a fresh ``mkstemp`` name in the
  target folder (never a fixed name a planted symlink could redirect), fsync, then
  ``os.replace``; readers see the old file or the new one, never half of one.
- :func:`open_append` opens a record file (``steps.csv``, ``epochs.jsonl``) for
  appending, refusing symlinks and anything that is not a regular file.
- :func:`remove_stale_temp` deletes the temporary files a crash left behind.

A full disk surfaces as :class:`WriteError`, a clear message naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

__all__ = ["WriteError", "describe", "atomic_write", "open_append", "remove_stale_temp", "fsync_dir", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"

Content = Union[bytes, str, Callable[[IO[bytes]], None]]


class WriteError(OSError):
    """Writing a file failed (disk full, permissions, a planted link); the message names the file."""


def describe(e: OSError, path: Path) -> str:
    """What went wrong writing ``path``, in words (the errno's meaning, the folder or file)."""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device holding {path.parent} while writing {path.name}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded in {path.parent} while writing {path.name}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write {path} ({e.strerror})"
    return f"could not write {path}: {e.strerror or e}"


def fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, content: Content) -> None:
    """Replace ``path`` with ``content`` (bytes, text, or a function writing to a binary file).

    The old file stays intact until the new one is complete and on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise WriteError(e.errno, describe(e, path)) from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; cdfast's files are as readable as any other
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(e.errno, describe(e, path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def open_append(path: str | Path, newline: str | None = None) -> IO[str]:
    """Open a text record file for appending; refuses a symlink or a non-regular file at ``path``."""
    path = Path(path)
    # O_NONBLOCK: a planted FIFO must not hang the open; the flag is cleared once it is known to be a file.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO with no reader
            raise WriteError(e.errno, f"{path} is not a regular file; cdfast will not append its records to it") from e
        if e.errno == errno.ELOOP or path.is_symlink():
            raise WriteError(e.errno, f"{path} is a symbolic link; cdfast writes its records only to regular "
                                      "files it created (remove the link)") from e
        raise WriteError(e.errno, describe(e, path)) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WriteError(errno.EINVAL, f"{path} is not a regular file; cdfast will not append its records to it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", newline=newline)


def remove_stale_temp(folder: str | Path) -> list[str]:
    """Delete the ``.<name>.<random>.tmp`` files an interrupted :func:`atomic_write` left in ``folder``."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and not entry.is_dir():
            entry.unlink(missing_ok=True)  # a symlink is removed itself; its target is never touched
            removed.append(entry.name)
    return removed
