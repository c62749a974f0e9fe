import signal
import subprocess
import sys

from moefy.workflow import owners


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


HOLD = "import sys, time; from pathlib import Path; from moefy.workflow import owners; owners.hold_lock(Path(sys.argv[1]), 'study t'); print('held', flush=True); time.sleep(60)"


def test_a_held_study_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "results" / "t" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    check = [
        sys.executable,
        "-c",
        "import sys; from pathlib import Path; from moefy.workflow import owners; owners.hold_lock(Path(sys.argv[1]), 'study t')",
        str(path),
    ]
    refused = subprocess.run(check, capture_output=True, text=True)
    assert (
        refused.returncode != 0
        and f":{holder.pid}:" in refused.stderr
        and "study t is locked by a running process" in refused.stderr
    )
    holder.send_signal(signal.SIGKILL)  # a crash: nothing cleans up, the kernel drops the lock
    holder.wait()
    assert path.exists() and subprocess.run(check).returncode == 0


def test_the_same_process_cannot_take_a_lock_twice(tmp_path):
    path = tmp_path / "lock"
    code = (
        "import sys; from pathlib import Path; from moefy.workflow import owners; from moefy.errors import MoefyError\n"
        "owners.hold_lock(Path(sys.argv[1]), 'x')\n"
        "try:\n    owners.hold_lock(Path(sys.argv[1]), 'x')\nexcept MoefyError as err:\n    print(err)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert "x is locked by a running process" in done.stdout, done.stdout + done.stderr
