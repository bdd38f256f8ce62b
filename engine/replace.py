"""Crash-safe replacement of a directory by a complete sibling.

On Linux the two directories are swapped in one ``renameat2(RENAME_EXCHANGE)`` call, so
at every instant the path holds either the complete old directory or the complete new
one. Where the exchange is unavailable (another OS, a file system without it) the old
directory is renamed to ``.NAME.old-PID`` and the new one renamed into place; a crash
between those two renames leaves the path absent and the old copy beside it, and
:func:`recover` (called before every load) moves it back. Each step is followed by an
fsync of the parent directory, so the rename itself survives a power cut.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _no_fault(step: str) -> None:
    """Called between filesystem steps; tests replace it to kill the process there."""


fault: Callable[[str], None] = _no_fault


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False when this system cannot."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def old_copy(path: Path) -> Path:
    return path.parent / f".{path.name}.old-{os.getpid()}"


def replace_dir(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` at ``path``, removing what was there. On any
    exception ``path`` holds the old or the new directory, whole, and ``new`` (if it
    still exists) is a leftover that the caller may remove."""
    fault("start")
    if not path.exists():
        os.replace(new, path)
        fault("renamed")
        _sync_dir(path.parent)
        return
    if exchange(new, path):  # ``new`` now holds the old directory
        fault("exchanged")
        _sync_dir(path.parent)
        fault("synced")
        shutil.rmtree(new, ignore_errors=True)
        return
    old = old_copy(path)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    fault("moved-old")
    os.replace(new, path)
    fault("moved-new")
    _sync_dir(path.parent)
    fault("synced")
    shutil.rmtree(old, ignore_errors=True)


def recover(path: Path) -> None:
    """Put back the old copy that an interrupted two-rename replace left beside a missing
    ``path`` (the newest, if several), and remove stale old copies beside a present one."""
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return
    if not path.exists():
        os.replace(olds.pop(), path)
        _sync_dir(path.parent)
    for stale in olds:
        shutil.rmtree(stale, ignore_errors=True)


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
