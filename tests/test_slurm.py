"""A real SLURM (Debian's slurmctld and slurmd on localhost): the shipped array script, ``submit``
with its merge job, and SIGTERM in the middle of a migration, then a resubmission.

Without SLURM's commands these tests are skipped with a loud reason, except where
``DLC_REQUIRE_SLURM=1`` (CI sets it, after installing the packages): there they fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN, TinyPose, make_project, save_snapshot, wrapped_state_dict
from slurm_cluster import SlurmCluster, missing_commands

pytestmark = pytest.mark.slurm
REPO = Path(__file__).parents[1]
SHIPPED_SCRIPT = REPO / "examples" / "slurm" / "array.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    missing = missing_commands()
    if missing:
        reason = (
            f"SLURM is not installed (missing {', '.join(missing)}): the real-SLURM tests do NOT run here. "
            "Install it with: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client"
        )
        if os.environ.get("DLC_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        print(f"\n*** {reason} ***", file=sys.stderr)
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def make_archive(root: Path, projects: int, snapshots: int = 2, floats: int = 0) -> dict[Path, dict]:
    """Projects of DataParallel snapshots; what each must hold once migrated (tensors to compare)."""
    expected = {}
    for i in range(projects):
        project = make_project(root / f"lab {i // 10}" / f"project {i:02d}")
        for epoch in range(1, snapshots + 1):
            state = wrapped_state_dict(TinyPose(), "dp")
            if floats:
                state["module.backbone.extra"] = torch.randn(floats)
            path = save_snapshot(project / TRAIN / f"snapshot-{epoch:03d}.pt", state)
            expected[path] = {key.removeprefix("module."): tensor for key, tensor in state.items()}
    return expected


def snapshot_states(expected: dict[Path, dict]) -> dict[Path, str]:
    """Each snapshot is its original or its migrated self, with bit-identical tensors: which one."""
    states = {}
    for path, tensors in expected.items():
        model = torch.load(path, weights_only=True)["model"]
        prefixed = all(key.startswith("module.") for key in model)
        stripped = {key.removeprefix("module."): value for key, value in model.items()}
        assert list(stripped) == list(tensors), path
        for key, tensor in tensors.items():
            assert stripped[key].dtype == tensor.dtype and torch.equal(stripped[key], tensor), (path, key)
        states[path] = "original" if prefixed else "migrated"
    return states


def submit(slurm: SlurmCluster, archive: Path, run_dir: Path, *options: str) -> tuple[str, str]:
    done = slurm.run(
        sys.executable, "-m", "dlc_snapshot_fix", "submit", str(archive), "--run-dir", str(run_dir), *options
    )
    array = re.search(r"^array job (\d+):", done.stdout, re.M)
    merge = re.search(r"^merge job (\d+):", done.stdout, re.M)
    assert array and merge, done.stdout
    assert f"merged report: {run_dir / 'report.json'}" in done.stdout
    return array.group(1), merge.group(1)


def test_the_slurm_page_shows_the_shipped_array_script():
    assert SHIPPED_SCRIPT.read_text() in (REPO / "docs" / "slurm.md").read_text()


def test_the_shipped_array_script_and_merge_reports(slurm: SlurmCluster, tmp_path: Path):
    expected = make_archive(tmp_path / "archive", projects=6)
    broken = tmp_path / "archive" / "lab 0" / "project 00" / TRAIN / "snapshot-009.pt"
    broken.write_bytes(b"not a snapshot")
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "reports").mkdir()
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--array=1-3",
        f"--chdir={run}",
        f"--export=ALL,ARCHIVE={tmp_path / 'archive'},VENV={sys.prefix}",
        str(SHIPPED_SCRIPT),
    )
    job = submitted.stdout.strip()
    states = slurm.wait(job, timeout=240)
    assert len(states) == 3, states
    logs = "\n".join(p.read_text() for p in (run / "logs").glob("*.log"))
    exit_codes = sorted(code for _, code in states.values())
    assert exit_codes == ["0:0", "0:0", "3:0"], (states, logs)  # the task that owns the broken file says so

    outputs = ["--json", str(run / "report.json"), "--csv", str(run / "report.csv")]
    merged = subprocess.run(
        [sys.executable, "-m", "dlc_snapshot_fix", "merge-reports", str(run / "reports"), "--expect", "3", *outputs],
        capture_output=True,
        text=True,
    )
    assert merged.returncode == 3, merged.stdout + merged.stderr
    assert "snapshot(s) failed" in merged.stdout
    report = json.loads((run / "report.json").read_text())
    assert [s["shard"] for s in report["shards"]] == ["1/3", "2/3", "3/3"]
    assert {s["state"] for s in report["shards"]} == {"finished"} and report["missing_shards"] == []
    rows = {Path(r["path"]): r["status"] for r in report["snapshots"]}
    assert rows.pop(broken) == "failed"
    assert set(rows) == set(expected) and set(rows.values()) == {"fixed"}
    assert set(snapshot_states(expected).values()) == {"migrated"}
    assert broken.read_bytes() == b"not a snapshot"


def test_submit_runs_the_array_then_the_merge_job(slurm: SlurmCluster, tmp_path: Path):
    expected = make_archive(tmp_path / "archive", projects=7)
    run = tmp_path / "run"
    array, merge = submit(slurm, tmp_path / "archive", run, "--tasks", "3", "--cpus-per-task", "1", "--no-model-check")
    tasks = slurm.wait(array, timeout=240)
    assert sorted(tasks.values()) == [("COMPLETED", "0:0")] * 3, tasks
    assert slurm.wait(merge, timeout=120) == {merge: ("COMPLETED", "0:0")}, (run / "logs" / "merge.log").read_text()

    report = json.loads((run / "report.json").read_text())
    assert report["complete"] is True and report["expected_shards"] == 3
    assert [(s["shard"], s["state"]) for s in report["shards"]] == [(f"{i}/3", "finished") for i in (1, 2, 3)]
    assert {Path(r["path"]) for r in report["snapshots"]} == set(expected)
    assert len((run / "report.csv").read_text().splitlines()) == len(expected) + 1
    assert set(snapshot_states(expected).values()) == {"migrated"}
    assert "merged 3 reports" in (run / "logs" / "merge.log").read_text()


def test_a_shard_that_never_reported_fails_the_merge_job(slurm: SlurmCluster, tmp_path: Path):
    make_archive(tmp_path / "archive", projects=2, snapshots=1)
    run = tmp_path / "run"
    array, merge = submit(slurm, tmp_path / "archive", run, "--tasks", "2", "--cpus-per-task", "1", "--no-model-check")
    slurm.wait(array, timeout=240)
    slurm.wait(merge, timeout=120)
    (run / "reports" / "shard-2.json").unlink()  # as if task 2 had been killed before its first report
    merge_again = slurm.run(
        "sbatch", "--parsable", f"--dependency=afterany:{array}", str(run / "merge.sbatch")
    ).stdout.strip()
    assert slurm.wait(merge_again, timeout=120) == {merge_again: ("FAILED", "3:0")}
    assert "shard 2/2: never reported" in (run / "logs" / "merge.log").read_text()
    assert json.loads((run / "report.json").read_text())["missing_shards"] == ["2/2"]


@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_sigterm_mid_migration_then_resubmit_finishes(slurm: SlurmCluster, tmp_path: Path, method: str):
    # one task, many projects: the signal lands while snapshots are being written
    expected = make_archive(tmp_path / "archive", projects=60, floats=200_000)
    run = tmp_path / "run"
    options = ("--tasks", "1", "--cpus-per-task", "2", "--no-model-check", "--method", method)
    array, merge = submit(slurm, tmp_path / "archive", run, *options)
    log = run / "logs" / "task-1.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and re.search(r"^\[\d+/60\]", log.read_text(), re.M)):  # a project is done
        assert time.monotonic() < deadline, f"the task never got going:\n{slurm.logs()}"
        time.sleep(0.05)
    slurm.run("scancel", array)  # what a time limit or preemption does: SIGTERM, then SIGKILL later
    assert slurm.wait(array, timeout=120)[f"{array}_1"][0] == "CANCELLED"
    assert slurm.wait(merge, timeout=120) == {merge: ("FAILED", "3:0")}

    shard = json.loads((run / "reports" / "shard-1.json").read_text())
    assert shard["state"] == "interrupted", log.read_text()
    assert "INTERRUPTED, run again to finish" in log.read_text()
    first = snapshot_states(expected)  # nothing lost: every snapshot is its original or migrated
    done = {path for path, state in first.items() if state == "migrated"}
    assert done and len(done) < len(expected), "the signal did not land mid-run"
    assert {Path(r["path"]) for r in shard["snapshots"] if r["status"] == "fixed"} <= done

    array, merge = submit(slurm, tmp_path / "archive", run, *options)  # resubmit into the same run folder
    assert slurm.wait(array, timeout=240) == {f"{array}_1": ("COMPLETED", "0:0")}, log.read_text()
    assert slurm.wait(merge, timeout=120) == {merge: ("COMPLETED", "0:0")}
    report = json.loads((run / "report.json").read_text())
    assert report["complete"] is True
    assert {Path(r["path"]) for r in report["snapshots"]} == set(expected)
    assert set(snapshot_states(expected).values()) == {"migrated"}
    assert list((tmp_path / "archive").rglob(".*.tmp")) == []


def test_a_requeued_task_resumes_and_the_merge_waits_for_it(slurm: SlurmCluster, tmp_path: Path):
    expected = make_archive(tmp_path / "archive", projects=60, floats=200_000)
    run = tmp_path / "run"
    options = ("--tasks", "1", "--cpus-per-task", "1", "--no-model-check", "--sbatch-arg=--requeue")
    array, merge = submit(slurm, tmp_path / "archive", run, *options)
    log = run / "logs" / "task-1.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and re.search(r"^\[\d+/60\]", log.read_text(), re.M)):
        assert time.monotonic() < deadline, f"the task never got going:\n{slurm.logs()}"
        time.sleep(0.05)
    slurm.run("scontrol", "requeue", f"{array}_1")  # what preemption with PreemptMode=REQUEUE does
    deadline = time.monotonic() + 60
    while slurm.job_states(f"{array}_1")[f"{array}_1"][0] != "PENDING":  # the task has stopped
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # not SLURM's 2-minute requeue delay, but not within the second of the requeue either: slurmd revokes the
    # old launch credential by the second, and a relaunch in that same second is killed ("Job credential revoked")
    time.sleep(1.5)
    slurm.run("scontrol", "update", f"JobId={array}_1", "StartTime=now")
    assert slurm.wait(array, timeout=240) == {f"{array}_1": ("COMPLETED", "0:0")}, log.read_text()
    assert slurm.wait(merge, timeout=120) == {merge: ("COMPLETED", "0:0")}
    first, second = [line for line in log.read_text().splitlines() if line.startswith("archive ")]
    assert first.endswith("INTERRUPTED, run again to finish") and "INTERRUPTED" not in second
    assert ": 60 projects, " in second and "already clean" in second  # the requeued run resumed
    assert json.loads((run / "report.json").read_text())["complete"] is True
    assert set(snapshot_states(expected).values()) == {"migrated"}


@pytest.mark.deeplabcut
def test_submit_migrates_an_archive_of_every_architecture(slurm: SlurmCluster, tmp_path: Path):
    """The model zoo (tests/zoo.py) as a lab archive: the append where it keeps its promise, the rewrite elsewhere;
    DeepLabCut judges every snapshot inside the tasks; the merged report is complete."""
    import zoo

    root = zoo.copy_zoo(tmp_path / "archive")
    run = tmp_path / "run"
    array, merge = submit(slurm, root, run, "--tasks", "2", "--cpus-per-task", "1")
    tasks = slurm.wait(array, timeout=600)
    logs = "\n".join(p.read_text() for p in (run / "logs").glob("*.log"))
    assert sorted(tasks.values()) == [("COMPLETED", "0:0")] * 2, (tasks, logs)
    assert slurm.wait(merge, timeout=120) == {merge: ("COMPLETED", "0:0")}, (run / "logs" / "merge.log").read_text()

    report = json.loads((run / "report.json").read_text())
    assert report["complete"] is True and report["expected_shards"] == 2
    rows = {Path(r["path"]): r for r in report["snapshots"]}
    assert set(rows) == set(zoo.snapshots(root))
    assert {r["status"] for r in rows.values()} == {"fixed"}, [r for r in rows.values() if r["status"] != "fixed"]
    assert {r["method"] for r in rows.values()} == {"append", "rewrite"}
    assert all("DeepLabCut 3.0" in r["reason"] and " loads it" in r["reason"] for r in rows.values())
    check = subprocess.run([sys.executable, "-m", "dlc_snapshot_fix", "migrate", str(root), "--check"], check=False)
    assert check.returncode == 0
