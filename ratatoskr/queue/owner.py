"""One daemon per SQLite queue: an exclusive ``flock`` on ``ratatoskr.lock`` in the queue folder.

A second ``ratatoskr serve`` on the same folder would requeue the first one's in-flight messages
as crash victims (duplicates) and could move bodies under it before failing on its ports. The
kernel drops the lock when the process dies, so a crash never leaves it behind. ``queue``
commands and ``check`` do not take it: they are meant to run beside the daemon.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ratatoskr.errors import QueueUnavailable
from ratatoskr.private import FILE_MODE, private_dir

LOCK_NAME = "ratatoskr.lock"


class QueueOwner:
    """Holds the lock from :meth:`take` until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def take(self) -> None:
        private_dir(self.path)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueUnavailable(
                f"another ratatoskr serve is using the queue in {self.path} (stop it first)"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
