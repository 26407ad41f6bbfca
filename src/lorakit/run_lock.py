"""A training run owns its output directory: an exclusive ``fcntl`` lock held for the whole run.

The lock is ``<output_dir>/.lorakit.lock``, locked with ``flock`` and holding ``host pid start-time`` of the
holder. A second run into the same directory fails at once with an error naming the holder. The kernel drops a
``flock`` when its process dies, however it dies (SIGKILL included), so a stale lock file left by a killed run
is simply taken over by the next one. On release the lock file is removed, and so is the directory when the run
created it and left nothing in it (a start that failed before writing anything leaves nothing behind).

Only the process of rank 0 locks (``RANK`` unset or ``0``): the other ranks of a distributed run write nothing
of their own into the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from lorakit.errors import ConfigError, LorakitError

LOCK_NAME = ".lorakit.lock"


class RunLockedError(LorakitError, RuntimeError):
    """Another process is training into the same output directory (names its host and pid)."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").split()
    except OSError:
        return "another process"
    if len(text) >= 2:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(text[2]))) if len(text) > 2 else "?"
        return f"pid {text[1]} on host {text[0]} (since {since})"
    return "another process"


class RunLock:
    """The exclusive lock of one run's output directory; a context manager.

    Args:
        directory (str | PathLike): The run's ``output_dir`` (created if missing).

    Raises:
        RunLockedError: Another live process holds the lock.
        ConfigError: The directory cannot be created or written (a file is in the way, a read-only place).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunLock:
        """Take the lock (at once or not at all); returns self."""
        if os.environ.get("RANK", "0") not in ("", "0"):
            return self
        self._created = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"output_dir {self.directory}: cannot create it ({err.strerror}); choose another output_dir"
            ) from None
        while True:  # retried only when the file was replaced between open and flock (see below)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise ConfigError(
                    f"output_dir {self.directory}: cannot write into it ({err.strerror}); choose another output_dir"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(
                    f"output_dir {self.directory} is in use by another run: {_holder(self.path)} holds "
                    f"{self.path}. Wait for it to finish, stop it, or choose another output_dir"
                ) from None
            # A holder that released meanwhile unlinked the file we opened: lock the current one instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and its file; remove the directory if this run created it and left it empty."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiting opener then re-checks the inode (acquire)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        if self._created:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only succeeds when empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is a run's lock file (ignored when asking if a directory is empty)."""
    return path.name == LOCK_NAME


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "is_lock_file"]
