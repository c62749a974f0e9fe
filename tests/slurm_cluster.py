"""A real single-node SLURM cluster on localhost, for the tests: munged, MariaDB, slurmdbd, slurmctld
and slurmd from Debian's packages (`apt-get install slurm-wlm slurmdbd munge mariadb-server`), each
started in a private folder with its own ports. One file lands outside it: /etc/slurm/slurm.conf,
a link to the cluster's configuration, since the executor's job step calls srun with SLURM_CONF
removed from its environment (so a cluster configured through SLURM_CONF alone is not found);
the link goes when the cluster stops, and a machine that has a slurm.conf of its own is left alone.

slurmdbd (with MariaDB) is there because Snakemake's SLURM executor reads job states with sacct,
and sacct answers from the accounting database. The daemons run as the user running the tests
(root in CI), which SLURM allows when SlurmUser and SlurmdUser are that user.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct", "sacctmgr")
CLUSTER, PARTITION, ACCOUNT = "moefy-test", "debug", "moefy"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def missing_programs() -> list[str]:
    """The daemons and commands this machine lacks (empty: a cluster can start here)."""
    return [name for name in DAEMONS if _program(name) is None]


def cannot_start() -> str | None:
    """Why a cluster cannot start here (missing programs, a slurm.conf of the machine's own), or None."""
    missing = missing_programs()
    if missing:
        return f"missing {', '.join(missing)} (apt-get install slurm-wlm slurmdbd munge mariadb-server)"
    if SYSTEM_CONF.is_symlink() and not SYSTEM_CONF.exists():
        SYSTEM_CONF.unlink()  # left by a test cluster whose process was killed
    if SYSTEM_CONF.exists():
        return f"{SYSTEM_CONF} exists: this machine has a SLURM configuration of its own, which the test would shadow"
    if not os.access(SYSTEM_CONF.parent if SYSTEM_CONF.parent.exists() else SYSTEM_CONF.parent.parent, os.W_OK):
        return f"{SYSTEM_CONF.parent} is not writable (the test runs as root in CI)"
    return None


def _program(name: str) -> str | None:
    """Where `name` is, on PATH or in the sbin folders a non-root PATH lacks."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class SlurmCluster:
    """One node (this machine, all its cores, 80% of its memory), one partition, one account.

    `env` is what a client (sbatch, sacct, snakemake) needs to reach it: SLURM_CONF.
    """

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = root
        self.cpus = cpus or os.cpu_count() or 1
        self.user = getpass.getuser()
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.processes: list[subprocess.Popen] = []
        self.linked = False
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- start ---------------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> SlurmCluster:
        for folder in ("etc", "munge", "mysql", "spool/ctld", "spool/d", "log", "run"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._start_munge()
        self._start_mariadb(timeout)
        self._write_slurm_conf()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)
        self.linked = True
        self._start([_program("slurmdbd"), "-D"], "slurmdbd")
        self._wait(lambda: self._run([_program("sacctmgr"), "-n", "show", "cluster"]).returncode == 0, timeout, "slurmdbd")
        self._sacctmgr("add", "cluster", CLUSTER)
        self._sacctmgr("add", "account", ACCOUNT, "Description=moefy tests", "Organization=moefy")
        self._sacctmgr("add", "user", self.user, f"Account={ACCOUNT}", f"DefaultAccount={ACCOUNT}")
        self._start([_program("slurmctld"), "-D", "-i"], "slurmctld")
        self._start([_program("slurmd"), "-D", "-N", self.node], "slurmd")
        self._wait(self._node_idle, timeout, "slurmd (node idle)")
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o600)
        self._start(
            [
                _program("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )
        self._wait(self.munge_socket.exists, 30, "munged")

    def _start_mariadb(self, timeout: float) -> None:
        datadir, sock = self.root / "mysql", self.root / "run" / "mysql.sock"
        self.db_port = _free_port()
        done = self._run(
            [
                _program("mariadb-install-db"),
                f"--datadir={datadir}",
                f"--user={self.user}",
                "--auth-root-authentication-method=normal",
            ]
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout}{done.stderr}")
        self._start(
            [
                _program("mariadbd"),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--socket={sock}",
                f"--port={self.db_port}",
                "--bind-address=127.0.0.1",
                f"--user={self.user}",
                f"--pid-file={self.root / 'run' / 'mariadb.pid'}",
                "--innodb-buffer-pool-size=64M",
            ],
            "mariadbd",
        )
        client = shutil.which("mariadb") or shutil.which("mysql")
        self.db_password = secrets.token_hex(8)
        sql = (
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        self._wait(
            lambda: self._run([client, f"--socket={sock}", "-u", "root", "-e", "SELECT 1"]).returncode == 0, timeout, "MariaDB"
        )
        done = self._run([client, f"--socket={sock}", "-u", "root", "-e", sql])
        if done.returncode != 0:
            raise RuntimeError(f"creating the slurm database user failed:\n{done.stderr}")

    def _write_slurm_conf(self) -> None:
        self.ctld_port, self.slurmd_port, self.dbd_port = _free_port(), _free_port(), _free_port()
        root, auth = self.root, f"socket={self.munge_socket}"
        memory = int(_memory_mb() * 0.8)
        dbd = self.root / "etc" / "slurmdbd.conf"
        dbd.write_text(
            "\n".join(
                [
                    f"AuthInfo={auth}",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    f"SlurmUser={self.user}",
                    f"LogFile={root / 'log' / 'slurmdbd.log'}",
                    f"PidFile={root / 'run' / 'slurmdbd.pid'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={self.db_port}",
                    "StorageUser=slurm",
                    f"StoragePass={self.db_password}",
                    "StorageLoc=slurm_acct_db",
                    "",
                ]
            )
        )
        dbd.chmod(0o600)
        self.conf.write_text(
            "\n".join(
                [
                    f"ClusterName={CLUSTER}",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={self.ctld_port}",
                    f"SlurmdPort={self.slurmd_port}",
                    f"SlurmUser={self.user}",
                    f"SlurmdUser={self.user}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo={auth}",
                    f"StateSaveLocation={root / 'spool' / 'ctld'}",
                    f"SlurmdSpoolDir={root / 'spool' / 'd'}",
                    f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    # no cgroups in a container: processes tracked through /proc, no task binding
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/linux",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU_Memory",
                    "AccountingStorageType=accounting_storage/slurmdbd",
                    "AccountingStorageHost=localhost",
                    f"AccountingStoragePort={self.dbd_port}",
                    f"AccountingStoragePass={self.munge_socket}",  # the munge socket of slurmdbd connections
                    "AccountingStoreFlags=job_comment",  # sacct shows each job's comment: Snakemake's rule name
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerType=sched/backfill",
                    "MinJobAge=300",  # SLURM's default: how long squeue shows a finished job's state
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
                    f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    # --- helpers -------------------------------------------------------------------------------

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def _sacctmgr(self, *args: str) -> None:
        done = self._run([_program("sacctmgr"), "-i", *args])
        if done.returncode != 0 and "Nothing new added" not in done.stdout + done.stderr:
            raise RuntimeError(f"sacctmgr {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    def _start(self, command: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        # a session of its own: no signal to the tests' process group (Ctrl-C, timeout) reaches it
        daemon = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(daemon)

    def _node_idle(self) -> bool:
        done = self._run(["sinfo", "-h", "-N", "-o", "%T"])
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a daemon exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*")))

    # --- queries -------------------------------------------------------------------------------

    SACCT_FIELDS = ("JobID", "JobName", "State", "Comment", "ExitCode", "ReqCPUS", "ReqMem", "Timelimit", "Partition", "Account")

    def sacct(self) -> list[dict[str, str]]:
        """Every job the cluster ran (allocations only, no steps): SACCT_FIELDS. Comment is the
        rule and wildcards as Snakemake's executor names them (rule_<name>[_wildcards_...])."""
        fields = self.SACCT_FIELDS
        done = self._run([_program("sacct"), "-a", "-X", "-n", "-P", f"--format={','.join(fields)}"])
        if done.returncode != 0:
            raise RuntimeError(f"sacct failed: {done.stderr}")
        return [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines() if line]

    def squeue(self) -> list[dict[str, str]]:
        done = self._run(["squeue", "-h", "-o", "%i|%T|%k"])
        return [dict(zip(("JobID", "State", "Comment"), line.split("|"))) for line in done.stdout.splitlines() if line]

    def scancel(self, job_id: str) -> None:
        self._run(["scancel", job_id])

    # --- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.linked and SYSTEM_CONF.is_symlink() and SYSTEM_CONF.resolve() == self.conf.resolve():
            SYSTEM_CONF.unlink()
            self.linked = False


RETRY_LINE = "did not answer; retrying"  # what a job logs for each retry on its tracking server (moefy.workflow.tracking)


def rule_of(comment: str) -> str:
    """The rule of a job from its sacct comment: rule_<name> or rule_<name>_wildcards_<values>."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


class CancelledThenRerun:
    """A study run through the SLURM profile whose job of `rule` is cancelled with scancel as soon as
    it runs, then run again, as a user would after a failure. Runs in a thread (start / join), so
    that the waits on the scheduler overlap other tests; each invocation's return code, stderr and
    wall-clock are kept, and the sacct records once both are done. An invocation still running after
    `timeout` seconds is killed, with its process group, and fails the study with its log.

    `outage` (server, rule, logs): in the second invocation, the tracking server (with stop() and
    start(), tests/mlflow_server.py) is killed as that rule's job starts running, and started again
    once a log in the folder `logs` says that a job is retrying (or after two minutes); `.outage`
    records the job, how long the server was down and whether a job said it retried."""

    def __init__(
        self,
        cluster: SlurmCluster,
        command: list[str],
        workdir: Path,
        env: dict[str, str],
        rule: str,
        outage: tuple | None = None,
        timeout: float = 900,
    ):
        import threading

        self.cluster, self.command, self.workdir, self.rule, self.timeout = cluster, command, workdir, rule, timeout
        self.env = {**env, "SLURM_CONF": str(cluster.conf)}
        self._outage = outage
        self.outage: dict | None = None
        self.runs: list[dict] = []
        self.cancelled: str | None = None
        self.jobs: list[dict[str, str]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_guarded, daemon=True)

    def start(self) -> CancelledThenRerun:
        self._thread.start()
        return self

    def join(self) -> CancelledThenRerun:
        self._thread.join()
        if self.error:
            raise self.error
        return self

    def _run_guarded(self) -> None:
        try:
            self.runs.append(self._invoke(cancel=True))
            self.runs.append(self._invoke(outage=self._outage))
            self.jobs = self.cluster.sacct()
        except BaseException as err:  # re-raised by join, in the test's thread
            self.error = err

    def _running(self, rule: str) -> str | None:
        """The id of a RUNNING job of `rule`, if any."""
        jobs = [j for j in self.cluster.squeue() if j["State"] == "RUNNING" and rule_of(j["Comment"]) == rule]
        return jobs[0]["JobID"] if jobs else None

    def _invoke(self, cancel: bool = False, outage: tuple | None = None) -> dict:
        started = time.time()
        log = self.workdir / f"snakemake-{len(self.runs)}.stderr"
        with open(log, "w") as stderr:
            # a session of its own, so that a hung snakemake and its children can be killed together
            proc = subprocess.Popen(
                self.command, cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )
            while cancel and proc.poll() is None and self.cancelled is None:
                self.cancelled = self._running(self.rule)
                if self.cancelled:
                    self.cluster.scancel(self.cancelled)
                time.sleep(0.2)
            while outage and proc.poll() is None and self.outage is None:
                server, rule, logs = outage
                job = self._running(rule)
                if job:
                    down = time.time()
                    server.stop()
                    retried = False
                    while not retried and time.time() < down + 120:
                        time.sleep(0.5)
                        retried = any(RETRY_LINE in job_log.read_text(errors="replace") for job_log in logs.rglob("*.log"))
                    server.start()
                    self.outage = {"rule": rule, "job": job, "seconds": time.time() - down, "retried": retried}
                time.sleep(0.2)
            try:
                proc.wait(timeout=max(1.0, started + self.timeout - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(
                    f"snakemake (invocation {len(self.runs) + 1}) still running after {self.timeout:.0f} s; "
                    f"squeue: {self.cluster.squeue()}\n{log.read_text()[-3000:]}"
                ) from None
        return {"returncode": proc.returncode, "stderr": log.read_text(), "seconds": time.time() - started}
