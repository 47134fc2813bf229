"""Lab archives: discovery below a folder, --jobs, reports, shards, locking, interruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import processes
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    SYMLINKS_WORK,
    TRAIN,
    WITH_START_METHOD,
    TinyPose,
    make_project,
    needs_symlinks,
    save_snapshot,
    wrapped_state_dict,
)

from dlc_snapshot_fix import load_snapshot, names
from dlc_snapshot_fix.archive import Shard, find_projects
from dlc_snapshot_fix.cli import main


def prefixed_snapshots(project: Path, count: int = 2, floats: int = 0) -> list[Path]:
    paths = []
    for epoch in range(1, count + 1):
        state = wrapped_state_dict(TinyPose(), "dp")
        if floats:
            state["module.backbone.extra"] = torch.randn(floats)
        paths.append(save_snapshot(project / TRAIN / f"snapshot-{epoch:03d}.pt", state))
    return paths


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "lab archive"
    a = make_project(root / "2023" / "mouse A")
    prefixed_snapshots(a)
    b = make_project(root / "2024" / "nested" / "deeper" / "rat B", train="models/v2/" + TRAIN)
    prefixed_snapshots(b.joinpath("models/v2"), count=1)
    c = make_project(root / "2024" / "clean C")
    save_snapshot(c / TRAIN / "snapshot-001.pt", TinyPose().state_dict())
    (c / TRAIN / "snapshot-002.pt").write_bytes(b"")  # a broken one
    tf = root / "old" / "tensorflow only"
    (tf / "dlc-models/iteration-0/xNov22-trainset95shuffle1/train").mkdir(parents=True)
    (tf / "config.yaml").write_text("Task: x\n")
    (root / "locked").mkdir()
    if SYMLINKS_WORK:
        (root / "2023" / "loop").symlink_to(root)
    return root


def test_finds_projects_and_reports_what_it_cannot_search(archive: Path, monkeypatch: pytest.MonkeyPatch):
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod cannot make a folder unreadable: inject EACCES
        if Path(path) == archive / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    projects, skipped = find_projects(archive)
    assert [p.relative_to(archive).as_posix() for p in projects] == [
        "2023/mouse A",
        "2024/clean C",
        "2024/nested/deeper/rat B",
    ]
    reasons = {s.path.relative_to(archive).as_posix(): s.reason for s in skipped}
    assert reasons["old/tensorflow only"].startswith("TensorFlow-only project")
    assert reasons["locked"].startswith("cannot be read: permission denied (Permission denied)")


@needs_symlinks
def test_a_symbolic_link_loop_in_an_archive_is_reported_and_not_followed(archive: Path):
    projects, skipped = find_projects(archive)
    assert len(projects) == 3
    assert {s.path.relative_to(archive).as_posix(): s.reason for s in skipped}["2023/loop"] == (
        "a symbolic link loop; not followed"
    )


def test_migrates_an_archive_with_two_jobs(archive: Path, tmp_path: Path):
    report_json, report_csv = tmp_path / "report.json", tmp_path / "report.csv"
    result = CliRunner().invoke(
        main, [str(archive), "--jobs", "2", "--hash", "--json", str(report_json), "--csv", str(report_csv)]
    )
    assert result.exit_code == 3, result.output  # the broken snapshot in "clean C"
    rows = {
        Path(r["path"]).relative_to(archive).as_posix(): r for r in json.loads(report_json.read_text())["snapshots"]
    }
    statuses = {path: row["status"] for path, row in rows.items()}
    assert statuses == {
        f"2023/mouse A/{TRAIN}/snapshot-001.pt": "fixed",
        f"2023/mouse A/{TRAIN}/snapshot-002.pt": "fixed",
        f"2024/clean C/{TRAIN}/snapshot-001.pt": "already clean",
        f"2024/clean C/{TRAIN}/snapshot-002.pt": "failed",
        f"2024/nested/deeper/rat B/models/v2/{TRAIN}/snapshot-001.pt": "fixed",
    }
    fixed = rows[f"2023/mouse A/{TRAIN}/snapshot-001.pt"]
    assert fixed["project"] == str(archive / "2023" / "mouse A")
    assert fixed["size"] > 0 and len(fixed["sha256_before"]) == 64 and fixed["sha256_after"] != fixed["sha256_before"]
    assert "empty file" in rows[f"2024/clean C/{TRAIN}/snapshot-002.pt"]["reason"]
    header = report_csv.read_text().splitlines()[0]
    assert header == "project,path,status,method,kept_by,new_bytes,reason,size,sha256_before,sha256_after,seconds"
    assert fixed["kept_by"] == "append" and 0 < fixed["new_bytes"] < fixed["size"]  # what keeping the original cost
    failed_line = next(line for line in result.output.splitlines() if line.startswith("failed (1): "))
    assert "empty file" in failed_line and "clean C" in result.output.split(failed_line)[1].splitlines()[1]
    assert len(report_csv.read_text().splitlines()) == 6
    skipped = 2 if SYMLINKS_WORK else 1  # the TensorFlow-only project, and the link loop where links can be made
    summary = f"3 projects, 1 already clean, 1 failed, 3 fixed (3 by append, 0 by rewrite), {skipped} paths skipped"
    assert summary in result.output


def test_shards_cover_every_project_exactly_once_and_merge(tmp_path: Path):
    root = tmp_path / "archive"
    for i in range(9):
        prefixed_snapshots(make_project(root / f"p{i}"), count=1)
    reports = []
    for index in (1, 2, 3):
        path = tmp_path / f"shard{index}.json"
        result = CliRunner().invoke(main, [str(root), "--shard", f"{index}/3", "--json", str(path), "-q"])
        assert result.exit_code == 0, result.output
        reports.append(path)
    owners = [{r["project"] for r in json.loads(p.read_text())["snapshots"]} for p in reports]
    assert sum(len(o) for o in owners) == 9 and set().union(*owners) == {str(root / f"p{i}") for i in range(9)}
    assert all(owners)  # every shard got work with this stable hash
    merged = CliRunner().invoke(main, ["merge-reports", *map(str, reports), "--json", str(tmp_path / "all.json")])
    assert merged.exit_code == 0, merged.output
    assert "merged 3 reports (shards 1/3, 2/3, 3/3): 9 snapshots, 0 failed" in merged.output
    assert len(json.loads((tmp_path / "all.json").read_text())["snapshots"]) == 9


def test_shard_from_slurm_array_variables():
    assert Shard.parse(None, {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"}) == Shard(4, 5)
    assert Shard.parse(
        None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"}
    ) == Shard(4, 5)
    stepped = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}  # 0-6:2
    assert [Shard.parse(None, {**stepped, "SLURM_ARRAY_TASK_ID": str(i)}) for i in (0, 2, 4, 6)] == [
        Shard(i, 4) for i in range(4)
    ]
    assert Shard.parse("2/4", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "9"}) == Shard(1, 4)
    with pytest.raises(ValueError, match="out of range"):
        Shard.parse("5/4", {})
    with pytest.raises(ValueError, match="not on the array's grid"):
        Shard.parse(None, {**stepped, "SLURM_ARRAY_TASK_ID": "3"})


def test_shard_from_sge_pbs_and_lsf_array_variables():
    sge = {"SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "10", "SGE_TASK_STEPSIZE": "1"}
    assert [Shard.parse(None, {**sge, "SGE_TASK_ID": str(i)}) for i in range(1, 11)] == [
        Shard(i, 10) for i in range(10)
    ]
    assert Shard.parse(None, {"SGE_TASK_ID": "undefined", "SGE_TASK_FIRST": "undefined"}) == Shard()  # not an array
    # PBS Pro, Torque and LSF give only the index: the count comes from --shard-count; 0-based or 1-based
    for variable in ("PBS_ARRAY_INDEX", "PBS_ARRAYID", "LSB_JOBINDEX"):
        with pytest.raises(ValueError, match="--shard-count"):
            Shard.parse(None, {variable: "3"})
        for first in (0, 1) if variable != "LSB_JOBINDEX" else (1,):  # LSF counts from 1
            shards = {Shard.parse(None, {variable: str(first + i)}, count=4) for i in range(4)}
            assert shards == {Shard(i, 4) for i in range(4)}, (variable, first)
    assert Shard.parse(None, {"LSB_JOBINDEX": "0"}) == Shard()  # LSF outside an array job
    with pytest.raises(ValueError, match="no array index"):
        Shard.parse(None, {}, count=4)
    with pytest.raises(ValueError, match="not one of 3 shards"):
        Shard.parse(None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, count=3)


def test_merge_names_shards_that_were_killed_stopped_or_never_reported(tmp_path: Path):
    root = tmp_path / "archive"
    for i in range(6):
        prefixed_snapshots(make_project(root / f"p{i}"), count=1)
    reports = tmp_path / "reports"
    reports.mkdir()
    for index in (1, 2):
        result = CliRunner().invoke(
            main, [str(root), "--shard", f"{index}/4", "--json", str(reports / f"{index}.json")]
        )
        assert result.exit_code == 0, result.output
    killed = json.loads((reports / "2.json").read_text()) | {"state": "running"}  # saved mid-run, then SIGKILL
    (reports / "2.json").write_text(json.dumps(killed))
    (reports / "3.json").write_text('{"root": "/x", "shard": "3/4", "snap')  # cut short
    (reports / "other.json").write_text(json.dumps({"shard": "1/2", "snapshots": []}))  # another array's
    merged = CliRunner().invoke(
        main, ["merge-reports", str(reports), "--expect", "4", "--json", str(tmp_path / "m.json")]
    )
    assert merged.exit_code == 3, merged.output
    assert "shard 2/4: killed before it finished" in merged.output
    assert "shard 3/4: never reported" in merged.output and "shard 4/4: never reported" in merged.output
    assert "NOT COMPLETE" in merged.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["missing_shards"] == ["3/4", "4/4"] and report["complete"] is False
    assert sorted(Path(r["file"]).name for r in report["ignored_reports"]) == ["3.json", "other.json"]
    assert [(s["shard"], s["state"]) for s in report["shards"]] == [("1/4", "finished"), ("2/4", "running")]


def test_json_to_stdout_is_the_report_alone(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``--json -`` in archive mode: stdout is one JSON document (no file named ``-`` anywhere)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [str(archive), "--check", "--json", "-"])
    assert result.exit_code == 3, result.output  # the broken snapshot in "clean C"
    report = json.loads(result.stdout)
    assert {Path(r["path"]).name for r in report["snapshots"] if r["status"] == "needs fix"} == {
        "snapshot-001.pt",
        "snapshot-002.pt",
    }
    assert not (tmp_path / "-").exists() and not (archive / "-").exists()


def test_a_project_another_run_holds_is_skipped_with_a_message(archive: Path):
    busy = archive / "2023" / "mouse A"
    names.tool_dir(busy).mkdir()
    before = {p: p.read_bytes() for p in (busy / TRAIN).glob("*.pt")}
    with filelock.FileLock(names.lock_path(busy)):
        result = CliRunner().invoke(main, [str(archive), "--jobs", "2"])
    assert result.exit_code == 3
    assert "another dlc-snapshot-fix run holds" in result.output
    assert {p: p.read_bytes() for p in (busy / TRAIN).glob("*.pt")} == before
    assert list(
        load_snapshot(archive / "2024/nested/deeper/rat B/models/v2" / TRAIN / "snapshot-001.pt")["model"]
    ) == list(TinyPose().state_dict())


def big_archive(root: Path, projects: int = 12) -> list[Path]:
    snapshots = []
    for i in range(projects):
        snapshots += prefixed_snapshots(make_project(root / f"project {i:02d}"), count=2, floats=1_500_000)
    return snapshots


def states(paths: list[Path]) -> dict[Path, tuple[str, int]]:
    """For each snapshot: "original" or "migrated" (anything else fails), and its mtime."""
    result = {}
    for path in paths:
        keys = list(load_snapshot(path)["model"])
        assert keys[0].startswith("module.") or keys == [*TinyPose().state_dict(), "backbone.extra"], path
        result[path] = ("original" if keys[0].startswith("module.") else "migrated", path.stat().st_mtime_ns)
    return result


CTRL_C_AS_IN_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
"""SIGINT's default, whatever this test run inherited: a shell starts background jobs with SIGINT ignored,
and Python (rightly) leaves an ignored SIGINT ignored, so the run would never see the Ctrl-C sent below."""

if sys.platform == "win32":
    # Windows: no fork, no SIGTERM to send (terminate() is TerminateProcess, a kill), and Ctrl-C is a console
    # event, which Wine cannot send (it has no console: GenerateConsoleCtrlEvent fails with WinError 12)
    INTERRUPTIONS = [("kill", "spawn")]
else:
    INTERRUPTIONS = [(how, "fork") for how in ("SIGINT", "SIGTERM", "kill")] + [
        (how, start) for how in ("SIGINT", "SIGTERM") for start in ("spawn", "forkserver")
    ]


@pytest.mark.parametrize(("how", "start"), INTERRUPTIONS)
def test_an_interrupted_run_resumes_without_redoing_finished_work(tmp_path: Path, how: str, start: str):
    root = tmp_path / "archive"
    snapshots = big_archive(root)
    tool = [sys.executable, "-c", CTRL_C_AS_IN_A_TERMINAL + WITH_START_METHOD, start]
    command = [*tool, str(root), "--jobs", "2", "--no-model-check"]
    first_report = tmp_path / "first.json"
    run = processes.start(
        [*command, "--json", str(first_report)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    done = 0
    while done < 3:  # let a few projects finish, then interrupt
        line = run.stderr.readline()
        assert line, "the run ended before it could be interrupted"
        done += line.startswith("[")
    if how == "kill":
        run.kill_tree()  # the whole run, workers included: kill -9 of the session, or the job object's end
    else:  # Ctrl-C, or a scheduler's SIGTERM, to the main process only: it stops its workers
        os.kill(run.pid, getattr(signal, how))
    out, err = run.communicate(timeout=120)
    if how == "kill":
        assert run.killed(), run.returncode
    else:
        assert run.returncode == 130, out + err
        assert "INTERRUPTED, run again to finish" in out
        assert "Traceback" not in err
        saved = json.loads(first_report.read_text())
        assert saved["state"] == "interrupted" and saved["interrupted"] is True

    first = states(snapshots)  # every snapshot loads: original or migrated
    finished = {p for p, (state, _) in first.items() if state == "migrated"}
    assert finished and len(finished) < len(snapshots)
    time.sleep(0.01)
    rerun = subprocess.run([*command, "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    second = states(snapshots)
    assert {state for state, _ in second.values()} == {"migrated"}
    assert all(second[p] == first[p] for p in finished)  # not rewritten again
    rows = {Path(r["path"]): r["status"] for r in json.loads((tmp_path / "r.json").read_text())["snapshots"]}
    assert {p for p, status in rows.items() if status == "already clean"} == finished
    leftovers = [p for p in root.rglob(".*.tmp")]
    assert leftovers == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: SLURM clusters run Linux (submit writes bash scripts)")
def test_submit_dry_run_writes_both_scripts_and_submits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bash = shutil.which("bash")
    monkeypatch.setenv("PATH", str(tmp_path / "no sbatch here"))
    run = tmp_path / "run dir"
    options = ["--tasks", "4", "--time", "01:00:00", "--sbatch-arg=--qos=low", "--method", "rewrite"]
    result = CliRunner().invoke(main, ["submit", str(tmp_path), "--run-dir", str(run), *options, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "not submitted (--dry-run)" in result.output
    array, merge = (run / "array.sbatch").read_text(), (run / "merge.sbatch").read_text()
    assert "#SBATCH --array=1-4" in array and "#SBATCH --time=01:00:00" in array and "#SBATCH --qos=low" in array
    assert '--shard "$SLURM_ARRAY_TASK_ID/4"' in array and "--method rewrite" in array
    assert f"--json '{run}/reports'/shard-\"$SLURM_ARRAY_TASK_ID\".json" in array  # quoted: the path has a space
    assert f"merge-reports '{run}/reports' --expect 4" in merge
    assert (run / "logs").is_dir() and (run / "reports").is_dir()
    for script in (run / "array.sbatch", run / "merge.sbatch"):
        assert subprocess.run([bash, "-n", str(script)]).returncode == 0  # valid bash

    submitted = CliRunner().invoke(main, ["submit", str(tmp_path), "--run-dir", str(run), "--tasks", "2"])
    assert submitted.exit_code == 2
    assert "sbatch not found" in submitted.output


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: Windows has no SIGTERM a process can catch")
def test_sigterm_stops_a_single_project_run_cleanly_and_a_rerun_finishes(tmp_path: Path):
    project = make_project(tmp_path / "one project")
    snapshots = prefixed_snapshots(project, count=12, floats=1_500_000)
    command = [sys.executable, "-m", "dlc_snapshot_fix", str(project), "--no-model-check"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not names.manifest_path(project).exists():  # the first original is kept: writing has begun
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)  # what a scheduler's cancel, time limit or preemption sends
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, out + err
    assert "interrupted (stopped by signal SIGTERM)" in err and "Traceback" not in err
    first = states(snapshots)
    assert {state for state, _ in first.values()} <= {"original", "migrated"}
    assert any(state == "original" for state, _ in first.values()), "the signal came too late"
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {state for state, _ in states(snapshots).values()} == {"migrated"}
    assert list(project.rglob(".*.tmp")) == []
