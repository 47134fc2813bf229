"""``submit``: one SLURM job array over a lab archive, and a merge job that runs after it.

The run folder holds everything about one submission: the two scripts (plain ``sbatch``
scripts a user can read, edit and submit again by hand), each task's log and JSON report,
and the merged report. Resubmitting into the same folder resumes: finished projects are
found clean and left alone, and each task's report is replaced by its newer run.
"""

from __future__ import annotations

import datetime as dt
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ARRAY_SCRIPT = "array.sbatch"
MERGE_SCRIPT = "merge.sbatch"


class SubmitError(RuntimeError):
    """``sbatch`` is missing or refused a script: the message says which and what it printed."""


@dataclass(frozen=True)
class SubmitPlan:
    """What to submit: the archive, how many tasks, the resources each asks for, where it all goes."""

    archive: Path
    tasks: int
    run_dir: Path
    method: str = "append"
    model_check: bool = True
    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int = 1
    account: str | None = None
    sbatch_args: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: sys.executable)
    """The interpreter that runs the tasks: the one running ``submit``, so the same install."""

    @property
    def reports_dir(self) -> Path:
        return self.run_dir / "reports"

    @property
    def merged_json(self) -> Path:
        return self.run_dir / "report.json"

    @property
    def merged_csv(self) -> Path:
        return self.run_dir / "report.csv"

    def _resources(self, cpus: int) -> list[str]:
        lines = [f"--cpus-per-task={cpus}"]
        for name, value in (("partition", self.partition), ("time", self.time), ("account", self.account)):
            if value:
                lines.append(f"--{name}={value}")
        if self.mem:
            lines.append(f"--mem={self.mem}")
        return lines + list(self.sbatch_args)

    def array_script(self) -> str:
        """One task per shard: task I migrates shard I/N and writes ``reports/shard-I.json``."""
        command = [
            self.python,
            "-m",
            "dlc_snapshot_fix",
            "migrate",
            str(self.archive),
            "--method",
            self.method,
        ] + ([] if self.model_check else ["--no-model-check"])
        return _script(
            [
                "--job-name=dlc-snapshot-fix",
                f"--array=1-{self.tasks}",
                *self._resources(self.cpus_per_task),
                f"--output={self.run_dir / 'logs' / 'task-%a.log'}",
                "--open-mode=append",  # a requeued task adds to its log
            ],
            "# SIGTERM (scancel, time limit, preemption) stops the task cleanly; a rerun resumes",
            f"exec {shlex.join(command)} \\\n"
            f'    --shard "$SLURM_ARRAY_TASK_ID/{self.tasks}" --jobs "${{SLURM_CPUS_PER_TASK:-1}}" \\\n'
            f'    --json {shlex.quote(str(self.reports_dir))}/shard-"$SLURM_ARRAY_TASK_ID".json',
        )

    def merge_script(self) -> str:
        """After every task ended (``afterany``): one report, exit 0 only if everything is migrated."""
        command = [
            self.python,
            "-m",
            "dlc_snapshot_fix",
            "merge-reports",
            str(self.reports_dir),
            "--expect",
            str(self.tasks),
            "--json",
            str(self.merged_json),
            "--csv",
            str(self.merged_csv),
        ]
        return _script(
            [
                "--job-name=dlc-snapshot-fix-merge",
                *self._resources(1),
                f"--output={self.run_dir / 'logs' / 'merge.log'}",
                "--open-mode=append",
            ],
            "# submitted with --dependency=afterany:<array job>: runs once every task has ended",
            f"exec {shlex.join(command)}",
        )


def _script(options: list[str], comment: str, command: str) -> str:
    header = "\n".join(f"#SBATCH {shlex.quote(option)}" for option in options)
    return f"#!/bin/bash\n{header}\n{comment}\nset -euo pipefail\n{command}\n"


@dataclass(frozen=True)
class Submitted:
    """Where the scripts are, and the job ids (None for a dry run)."""

    array_script: Path
    merge_script: Path
    array_job: str | None = None
    merge_job: str | None = None


def default_run_dir(now: dt.datetime | None = None) -> Path:
    return Path.cwd() / f"dlc-snapshot-fix-run-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def write_scripts(plan: SubmitPlan) -> Submitted:
    """The run folder, its ``logs/`` and ``reports/``, and both scripts in it."""
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    plan.reports_dir.mkdir(exist_ok=True)
    array, merge = plan.run_dir / ARRAY_SCRIPT, plan.run_dir / MERGE_SCRIPT
    array.write_text(plan.array_script(), encoding="utf-8")
    merge.write_text(plan.merge_script(), encoding="utf-8")
    return Submitted(array, merge)


def submit(plan: SubmitPlan, sbatch: str = "sbatch") -> Submitted:
    """Write the scripts, submit the array, then the merge job depending on it; the job ids."""
    written = write_scripts(plan)
    array_job = _sbatch([sbatch, "--parsable", str(written.array_script)], plan.run_dir)
    merge_job = _sbatch(
        [sbatch, "--parsable", f"--dependency=afterany:{array_job}", str(written.merge_script)], plan.run_dir
    )
    return Submitted(written.array_script, written.merge_script, array_job, merge_job)


def _sbatch(command: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError(
            f"{command[0]} not found: run submit on a SLURM login node, or use --dry-run and submit the scripts"
        ) from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"{shlex.join(command)} did not answer within 120 s") from None
    if done.returncode != 0:
        raise SubmitError(f"{shlex.join(command)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not job_id.isdigit():
        raise SubmitError(f"{shlex.join(command)} printed no job id: {done.stdout.strip()!r}")
    return job_id
