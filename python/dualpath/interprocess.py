"""Small primitives for state shared by the processes of one host through files."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import threading

# This host in the names of files that several hosts may see (a shared store mount): a process can only
# tell whether a writer is alive when the writer ran on its own host.
HOST = re.sub(r"[^0-9A-Za-z_]", "_", socket.gethostname()) or "host"


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


def writer_tag() -> str:
    """``<host>-<pid>``: names a file's writing process, across the hosts of a shared mount."""
    return f"{HOST}-{os.getpid()}"


def dead_local_writer(tag: str) -> bool:
    """Whether the writer named by ``tag`` ran on this host and is gone (never true for other hosts' writers)."""
    host, _, pid = tag.rpartition("-")
    return host == HOST and pid.isdigit() and not pid_alive(int(pid))
