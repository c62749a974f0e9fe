import os
import signal
import subprocess
import sys

from moefy import owners


def dead_token() -> str:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    stamp = owners.token(child.pid)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return stamp


def test_liveness():
    assert not owners.is_dead(owners.token())
    assert owners.is_dead(dead_token())
    host, pid, started = owners.token().rsplit(":", 2)
    assert owners.is_dead(f"{host}:{pid}:{float(started) - 100}"), "a reused pid is a different process"
    assert not owners.is_dead(f"other-host:{pid}:1.0"), "cannot judge processes of other machines"
    assert not owners.is_dead("")


def test_only_a_lock_of_dead_owners_is_cleared(tmp_path):
    locks = tmp_path / owners.LOCKS
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("results/x\n")
    assert owners.clear_dead_lock(tmp_path) is None, "an unstamped lock is left for --unlock"
    owners.claim_lock(tmp_path)
    assert owners.clear_dead_lock(tmp_path) is None, "its owner (this process) is alive"
    (locks / f"{os.getpid()}{owners.OWNER_SUFFIX}").write_text(dead_token())
    assert "killed" in owners.clear_dead_lock(tmp_path)
    assert not locks.exists()
