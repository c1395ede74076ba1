"""A real one-node SLURM cluster for the tests: this machine's munged, slurmctld and slurmd,
configured and run from a temporary directory, on free ports, shut down afterwards.

Debian's packages (tools/install_slurm.sh) are what it was made with; root is needed to
start munged as the munge user and slurmd as root. ``missing()`` says why it cannot run.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
SBIN = ("/usr/sbin", "/usr/local/sbin")


def which(name: str) -> str | None:
    found = shutil.which(name)
    for d in SBIN:
        if not found and os.access(f"{d}/{name}", os.X_OK):
            found = f"{d}/{name}"
    return found


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [b for b in DAEMONS + CLIENTS if not which(b)]
    if absent:
        return (
            f"SLURM is not installed ({', '.join(absent)} missing): "
            f"run tools/install_slurm.sh as root (Debian: slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        return "starting munged as the munge user and slurmd needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no munge user (the munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait(what: str, ready, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s\n{tail}")


class SlurmCluster:
    def __init__(self, root: Path, base_env: dict):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**base_env, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.files = []  # the daemons' stderr

    @classmethod
    def start(cls, base_env: dict) -> SlurmCluster:
        root = Path(tempfile.mkdtemp(prefix="largebatch-slurm-"))
        root.chmod(0o755)  # munged (not root) must reach its socket directory
        cluster = cls(root, base_env)
        try:
            cluster._start_munge()
            cluster._write_conf()
            cluster._start_slurm()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    # --- start-up ------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        munge = pwd.getpwnam("munge")
        for path in (d, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        d.chmod(0o711)  # munged insists: its socket's directory is searchable by all
        self.munge_socket = d / "munge.socket"
        self.procs["munged"] = subprocess.Popen(
            [
                which("munged"),
                "--foreground",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr("munged"),
        )
        _wait("munged", lambda: self.munge_socket.exists() or self.procs["munged"].poll() is not None, 20)
        if self.procs["munged"].poll() is not None:
            raise RuntimeError(f"munged exited: {(d / 'munged.log').read_text()[-2000:]}")

    def _stderr(self, name: str):
        self.files.append(open(self.root / f"{name}.stderr", "wb"))
        return self.files[-1]

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        (r / "state").mkdir()
        (r / "spool").mkdir()
        self.conf.write_text(f"""\
ClusterName=largebatch
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job would otherwise wait 121 s before it may start again
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=3600
MpiDefault=none
ReturnToService=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE DefaultTime=10 State=UP
""")

    def _start_slurm(self) -> None:
        for name, cmd in (
            ("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)]),
            ("slurmd", [which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)]),
        ):
            self.procs[name] = subprocess.Popen(
                cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr(name)
            )
        _wait("the SLURM node", lambda: self.node_state() == "idle", 60, self.root / "slurmd.log")

    # --- use -------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, StartTime, EndTime, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: {info}")
            time.sleep(1)

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {name}\n{(self.root / name).read_text()[-2000:]}"
            for name in ("slurmctld.log", "slurmd.log")
            if (self.root / name).exists()
        )

    # --- shut-down -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left, shut SLURM down, stop munged, remove the directory."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                try:
                    _wait("cancelled jobs", lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 60)
                except RuntimeError:
                    pass
            self.run("scontrol", "shutdown", check=False)
        for name in ("slurmctld", "slurmd", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if name == "munged":
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for f in self.files:
            f.close()
        shutil.rmtree(self.root, ignore_errors=True)
