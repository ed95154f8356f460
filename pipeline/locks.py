"""Advisory file locks (``flock``) between processes: the MLflow SQLite store's creation lock and the lock a
training process holds on its run folder.

An ``flock`` lock belongs to the open file, so the operating system releases it when the process dies, however it
dies (``kill -9`` included): a lock that can be taken means nobody holds it any more. On Linux NFS mounts ``flock``
is emulated with byte-range locks, so it also works between machines that share the run folders.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the wait ended."""


class FileLock:
    """An exclusive ``flock`` on ``path`` (created when missing), as a context manager or with
    :meth:`acquire` / :meth:`release`.

    Args:
        path: the lock file.
        timeout_s: how long :meth:`acquire` waits for another holder (``0``: do not wait; ``None``: forever).
        poll_s: the pause between attempts while waiting.

    >>> with FileLock("/tmp/example.lock"):
    ...     pass
    """

    def __init__(self, path: str | os.PathLike, timeout_s: float | None = None, poll_s: float = 0.05) -> None:
        self.path = Path(path)
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FileLock:
        """Take the lock, waiting up to ``timeout_s``.

        Raises:
            LockTimeout: another process held it for the whole wait, naming the file.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return self
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(f"{self.path} is locked by another process") from None
                time.sleep(self.poll_s)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __del__(self) -> None:
        self.release()

    def __exit__(self, *exc) -> None:
        self.release()


def held_elsewhere(path: str | os.PathLike) -> bool:
    """Whether another open file (another process, or another :class:`FileLock` here) holds the lock on ``path``;
    ``False`` when the file does not exist. Creates nothing."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False
