"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two slurmd nodes.

Debian's packages (slurmctld, slurmd, slurm-client, munge; .ci/run installs them) run it without
systemd or cgroups: process tracking by parent PID (proctrack/linuxproc), no task plugin, no
accounting database (job state comes from ``scontrol show job``). Everything lives in one private
directory: the config, the state, the spool, the logs, and a munged of its own on its own socket,
so a cluster already running on the machine is left alone. The nodes ``n1`` and ``n2`` both run
here, at 127.0.0.1 on their own ports; each declares this machine's CPUs. ``cred_expire=5`` and
1-second scheduling make a requeued job start again in seconds instead of two minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")
NODES = ("n1", "n2")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}  # fmt: skip


def missing_parts() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    absent = [name for name, path in DAEMONS.items() if not Path(path).is_file()]
    absent += [name for name in CLIENTS if shutil.which(name) is None]
    if absent:
        return f"SLURM/munge not installed ({', '.join(absent)}): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    def __init__(self):
        # Not under pytest's tmp_path: munged runs as the munge user and must reach its socket.
        self.root = Path(tempfile.mkdtemp(prefix="nemo-slurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        munge_dir = self.root / "munge"
        munge_dir.mkdir()
        shutil.chown(munge_dir, "munge", "munge")
        self.socket = munge_dir / "munge.socket"
        subprocess.run(["runuser", "-u", "munge", "--", DAEMONS["munged"], f"--socket={self.socket}",
                        f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                        f"--seed-file={munge_dir / 'munged.seed'}"], check=True, timeout=30)  # fmt: skip
        self.pids["munged"] = self._read_pid(munge_dir / "munged.pid")
        ctld, *node_ports = _free_ports(1 + len(NODES))
        cpus = os.cpu_count() or 1
        for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True)
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
                          for n, p in zip(NODES, node_ports, strict=True))  # fmt: skip
        self.conf.write_text(f"""\
ClusterName=nemo-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=bf_interval=1,sched_interval=1
KillWait=5
MinJobAge=3600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run([DAEMONS["slurmctld"], "-f", str(self.conf)], env=self.env, check=True, timeout=30)
        self.pids["slurmctld"] = self._read_pid(self.root / "slurmctld.pid")
        for node in NODES:
            subprocess.run([DAEMONS["slurmd"], "-f", str(self.conf), "-N", node], env=self.env, check=True, timeout=30)
            self.pids[f"slurmd-{node}"] = self._read_pid(self.root / f"slurmd-{node}.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
            if states and all(s == "idle" for s in states[1::2]) and len(states) == 2 * len(NODES):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout}s: {states}; logs in {self.root / 'log'}")

    def stop(self) -> None:
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.time() + 20  # let the nodes end what still runs before they go
            while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
                time.sleep(0.5)
        for name in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _read_pid(path: Path, timeout: float = 20) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.is_file() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"no pid file {path}")

    # -- using it ----------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, env: dict | None = None, cwd=None, timeout: float = 60):
        result = subprocess.run(list(args), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` as dicts: one per job, or per array task."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def state(self, job_id: str) -> str:
        jobs = self.job(job_id)
        return jobs[0]["JobState"] if jobs else "UNKNOWN"

    def wait(self, job_id: str, states=FINISHED, timeout: float = 300) -> list[dict[str, str]]:
        """Until every job (array task) of ``job_id`` is in one of ``states``; their records."""
        deadline = time.time() + timeout
        while True:
            jobs = self.job(job_id)
            if jobs and all(j["JobState"] in states for j in jobs):
                return jobs
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id}: {[(j.get('JobId'), j['JobState']) for j in jobs]} after "
                                   f"{timeout}s; slurmctld log: {self.tail('slurmctld.log')}")  # fmt: skip
            time.sleep(0.5)

    def tail(self, log: str, lines: int = 20) -> str:
        path = self.root / "log" / log
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else ""
