"""Folders and files that hold mail: 0700 and 0600 whatever the umask, as Postfix keeps its
queue. With umask 022 the queue database and the outbox's files were 0644 in 0755 folders,
readable by every local user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, *, tighten: bool = False) -> None:
    """Create ``path`` (and its parents) with the folder itself 0700. With ``tighten``, an
    existing folder of ours that others may read is made 0700 too (a queue from before)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if tighten:
        _tighten(path, DIR_MODE)


def private_file(path: Path) -> None:
    """Make sure ``path`` exists and only we may read it: SQLite creates its ``-wal`` and
    ``-shm`` files with the database's mode, so creating the database 0600 covers them."""
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if each.exists():
            _tighten(each, FILE_MODE)


def open_private(path: Path) -> int:
    """``os.open`` for a new file to write, 0600 (the umask can only take bits away)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    st = path.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
