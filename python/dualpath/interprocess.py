"""Small primitives for state shared by the processes of one host through files."""

from __future__ import annotations

import fcntl
import os
import threading


class FileLock:
    """Exclusive lock on an open file, across processes and threads.

    ``flock`` belongs to the open file description, so it does not exclude threads that share the
    descriptor; the thread lock does.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._thread_lock = threading.Lock()

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._thread_lock.release()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
