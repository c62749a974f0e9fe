"""Who owns a lock or an MLflow run, and whether that process is still alive.

After a crash (SIGKILL, power loss) Snakemake leaves its working-directory lock and MLflow leaves
runs RUNNING forever. Both are stamped with an owner token, host:pid:start-time, so a later
invocation can tell a dead owner from a live one (even if the pid was reused) and clean up only
after the dead.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import psutil

LOCKS = Path(".snakemake") / "locks"
OWNER_SUFFIX = ".moefy-owner"


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


def claim_lock(workdir: Path = Path(".")) -> None:
    """Stamp the lock this Snakemake process holds with its owner token (from onstart)."""
    locks = workdir / LOCKS
    if locks.is_dir():
        (locks / f"{os.getpid()}{OWNER_SUFFIX}").write_text(token())


def clear_dead_lock(workdir: Path = Path(".")) -> str | None:
    """Remove the working-directory lock if every process that stamped it is dead.

    A lock nobody stamped (taken before onstart, or by another tool) is left for `--unlock`.
    Returns a message when a lock was removed.
    """
    locks = workdir / LOCKS
    owners = list(locks.glob(f"*{OWNER_SUFFIX}")) if locks.is_dir() else []
    tokens = [p.read_text().strip() for p in owners]
    if not owners or not all(is_dead(t) for t in tokens):
        return None
    shutil.rmtree(locks, ignore_errors=True)
    return f"removed the lock of a snakemake that was killed ({', '.join(tokens)})"
