"""A real single-node SLURM (Debian's slurmctld and slurmd) on localhost, all state in one folder.

Started by hand (the container starts no services), ``auth/none`` (no munge), linuxproc process
tracking (cgroup's freezer is not mounted here), torn down by the daemons' own PIDs. The facts
behind each setting: ``../shared/slurm-facts.md``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL"}


def missing_commands() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class SlurmCluster:
    """One controller and one node; ``env`` is what a client command (sbatch, scancel) needs."""

    folder: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        host = socket.gethostname().split(".")[0]
        folder = self.folder
        (folder / "state").mkdir(parents=True)
        (folder / "spool").mkdir()
        conf = folder / "slurm.conf"
        conf.write_text(
            "\n".join(
                [
                    "ClusterName=dlcsnapshotfix",
                    f"SlurmctldHost={host}",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/none",
                    "CredType=cred/none",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    f"StateSaveLocation={folder / 'state'}",
                    f"SlurmdSpoolDir={folder / 'spool'}",
                    f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                    f"SlurmdPidFile={folder / 'slurmd.pid'}",
                    f"SlurmctldLogFile={folder / 'slurmctld.log'}",
                    f"SlurmdLogFile={folder / 'slurmd.log'}",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "MailProg=/bin/true",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerParameters=sched_min_interval=0,batch_sched_delay=0",
                    "MinJobAge=300",  # finished jobs stay visible to scontrol, with their exit codes
                    "KillWait=30",  # SIGTERM, then SIGKILL 30 s later: what a time limit or preemption does
                    f"NodeName={host} CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 "
                    "RealMemory=8000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        for daemon in ("slurmctld", "slurmd"):
            log = open(folder / f"{daemon}.out", "wb")  # noqa: SIM115 - closed with the process
            self.processes.append(
                subprocess.Popen([daemon, "-D", "-f", str(conf)], env=self.env, stdout=log, stderr=log)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SLURM did not come up within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.folder.glob("*.log"))
        )

    def stop(self) -> None:
        for process in reversed(self.processes):  # slurmd first, then the controller
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def run(self, *command: str, check: bool = True, **options) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, **options)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def job_states(self, job_id: str) -> dict[str, tuple[str, str]]:
        """Every task of ``job_id`` (an array or a single job): ``{id: (state, exit code)}``."""
        shown = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        states = {}
        for line in shown.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
            states[key] = (fields["JobState"], fields.get("ExitCode", ""))
        return states

    def wait(self, job_id: str, timeout: float = 300.0) -> dict[str, tuple[str, str]]:
        """Wait (bounded) until every task of ``job_id`` has ended; its states and exit codes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and all(state in FINAL_STATES for state, _ in states.values()):
                return states
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not end within {timeout} s: {self.job_states(job_id)}\n{self.logs()}")
