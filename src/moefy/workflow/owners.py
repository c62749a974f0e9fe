"""Who owns a study's lock or an MLflow run, and whether that process is still alive.

After a crash (SIGKILL, power loss) MLflow leaves runs RUNNING forever. They are stamped with an
owner token, host:pid:start-time, so a later invocation can tell a dead owner from a live one
(even if the pid was reused) and close only the runs of the dead. A study's lock needs no such
cleaning: it is an flock, which the kernel releases with its process.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import psutil

from moefy.errors import MoefyError


def token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.3f}"


def is_dead(owner: str) -> bool:
    """True only when the owner ran on this host and that process is gone."""
    try:
        host, pid, started = owner.rsplit(":", 2)
        pid, started = int(pid), float(started)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # cannot tell: another machine sharing the file system
    try:
        return abs(psutil.Process(pid).create_time() - started) > 0.01
    except psutil.NoSuchProcess:
        return True


_held: list = []  # this process's open lock files: the kernel releases a lock when its process ends


def hold_lock(path: Path, what: str) -> None:
    """Take an exclusive lock on `path` for the rest of this process, or raise a MoefyError naming
    the process that holds it.

    The lock is an flock: the kernel drops it when its process ends, however it ends (a SIGKILL, a
    power loss), so a crashed run never leaves a stale lock behind for the next one to clear.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise MoefyError(
            f"{what} is locked by a running process ({holder}, host:pid:start); wait for it to finish, or stop it, then run again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(token() + "\n")
    handle.flush()
    _held.append(handle)
