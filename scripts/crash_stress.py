"""Kill dlc-snapshot-fix (SIGKILL; TerminateProcess on Windows) at random moments of a migration, then check.

After every kill: each snapshot loads and holds either its original content or its
migrated content (bit-identical tensors, only the keys renamed); the manifest reads;
each backup it lists has the original's sha256; and a rerun completes, after which a
restore gives back byte-identical originals. Prints the trial count and every failure;
exits 1 if there was one.

    python scripts/crash_stress.py --trials 200 --seed 2026 [--method append]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
import yaml

from dlc_snapshot_fix import load_snapshot, migrate_project, names, restore_project
from dlc_snapshot_fix.report import Status
from dlc_snapshot_fix.store import sha256_of
from dlc_snapshot_fix.verify import tensors_bit_identical

TRAIN = "dlc-models-pytorch/iteration-0/stressNov22-trainset95shuffle1/train"
CHILD = """
import sys
from dlc_snapshot_fix import migrate_project
print("READY", flush=True)
for project in sys.argv[2:]:
    migrate_project(project, check_model=False, method=sys.argv[1])
print("DONE", flush=True)
"""


def build_archive(root: Path, projects: int, snapshots: int, size_mb: float, seed: int, keys: int = 9) -> list[Path]:
    """Projects of DataParallel-style snapshots (with optimizer state) of about ``size_mb`` each, ``keys`` tensors.

    ``--keys 1900`` gives an HRNet-sized ``data.pkl`` (~0.3 MB), which the append leaves to the rewrite.
    """
    generator = torch.Generator().manual_seed(seed)
    floats = int(size_mb * 2**20 / 4)
    layers = max(keys - 1, 1)
    made = []
    for p in range(projects):
        project = root / f"project {p}"
        (project / TRAIN).mkdir(parents=True)
        (project / "config.yaml").write_text(yaml.safe_dump({"Task": "stress", "project_path": str(project)}))
        (project / TRAIN / "pytorch_config.yaml").write_text(yaml.safe_dump({"method": "bu"}))
        for s in range(snapshots):
            state = OrderedDict(
                (
                    f"module.backbone.stage{i // 64}.branch{i % 4}.layer{i}.weight",
                    torch.randn(max(floats // layers, 1), generator=generator),
                )
                for i in range(layers)
            )
            state["module.heads.bodypart.bias"] = torch.randn(3, generator=generator)
            name = f"snapshot-best-{s + 1:03d}.pt" if s == snapshots - 1 else f"snapshot-{s + 1:03d}.pt"
            torch.save(
                {"metadata": {"epoch": s + 1}, "model": state, "optimizer": {"state": {}, "param_groups": []}},
                project / TRAIN / name,
            )
        made.append(project)
    return made


def snapshot_files(project: Path) -> list[Path]:
    return sorted((project / TRAIN).glob("snapshot-*.pt"))


def content_state(original: dict, current: dict) -> str | None:
    """``"original"`` or ``"migrated"`` if ``current`` is one of them exactly, else ``None``."""
    for state, rename in (("original", lambda k: k), ("migrated", lambda k: k.removeprefix("module."))):
        if list(current["model"]) != [rename(k) for k in original["model"]]:
            continue
        same_tensors = all(tensors_bit_identical(current["model"][rename(k)], v) for k, v in original["model"].items())
        same_rest = current["metadata"] == original["metadata"] and current["optimizer"] == original["optimizer"]
        if same_tensors and same_rest:
            return state
    return None


def check_trial(projects: list[Path], originals: dict[str, dict], shas: dict[str, str], method: str) -> list[str]:
    problems = []
    for project in projects:
        for path in snapshot_files(project):
            key = f"{project.name}/{path.name}"
            try:
                if content_state(originals[key], load_snapshot(path)) is None:
                    problems.append(f"{key}: neither original nor migrated content")
            except Exception as error:
                problems.append(f"{key}: does not load ({error})")
        expected = sorted(k.split("/")[1] for k in originals if k.startswith(project.name + "/"))
        if sorted(p.name for p in snapshot_files(project)) != expected:
            problems.append(f"{project.name}: the set of snapshot files changed")
        manifest = names.manifest_path(project)
        if manifest.exists():
            try:
                entries = json.loads(manifest.read_text())["entries"]
            except Exception as error:
                problems.append(f"{project.name}: manifest unreadable ({error})")
                entries = []
            for entry in (e for e in entries if e["backup_method"] != "append"):  # append: the file is the backup
                backup = project / entry["backup"]
                if entry["state"] == "done" and not backup.exists():
                    problems.append(f"{project.name}: backup {backup.name} of a rewritten snapshot is missing")
                elif backup.exists() and sha256_of(backup) != entry["sha256_before"]:
                    problems.append(f"{project.name}: backup {backup.name} differs from the original")
    if problems:
        return problems
    for project in projects:  # the rerun finishes the job
        report = migrate_project(project, check_model=False, method=method)
        if any(r.status not in (Status.FIXED, Status.CLEAN) for r in report.results):
            problems.append(f"{project.name}: rerun did not finish: {[r.describe() for r in report.results]}")
        for path in snapshot_files(project):
            if content_state(originals[f"{project.name}/{path.name}"], load_snapshot(path)) != "migrated":
                problems.append(f"{project.name}/{path.name}: not migrated after the rerun")
        restore_project(project)
        for path in snapshot_files(project):
            if sha256_of(path) != shas[f"{project.name}/{path.name}"]:
                problems.append(f"{project.name}/{path.name}: restore did not give back the original bytes")
    return problems


def run_child(projects: list[Path], kill_after: float | None, method: str) -> tuple[bool, float]:
    """Migrate in a child process, SIGKILLed ``kill_after`` s after its imports; (killed?, seconds run)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, method, *map(str, projects)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout.readline().strip() == "READY"
    started = time.perf_counter()
    if kill_after is None:
        child.wait()
        return False, time.perf_counter() - started
    time.sleep(kill_after)
    killed = child.poll() is None
    child.kill()  # SIGKILL; TerminateProcess on Windows: no handler, no clean-up, either way
    child.wait()
    return killed, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projects", type=int, default=3)
    parser.add_argument("--snapshots", type=int, default=3, help="per project")
    parser.add_argument("--size-mb", type=float, default=8.0, help="of each snapshot")
    parser.add_argument("--keys", type=int, default=9, help="tensors per snapshot (1900: an HRNet-sized data.pkl)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--method", choices=["rewrite", "append"], default="rewrite")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    # ignore_cleanup_errors: on Windows the templates this process still maps (originals) cannot be deleted yet
    with tempfile.TemporaryDirectory(dir=args.workdir, ignore_cleanup_errors=True) as scratch:
        template = Path(scratch) / "template"
        template_projects = build_archive(template, args.projects, args.snapshots, args.size_mb, args.seed, args.keys)
        originals = {f"{p.name}/{s.name}": load_snapshot(s) for p in template_projects for s in snapshot_files(p)}
        shas = {f"{p.name}/{s.name}": sha256_of(s) for p in template_projects for s in snapshot_files(p)}

        calibration = Path(scratch) / "calibration"
        shutil.copytree(template, calibration)
        _, full_run = run_child([calibration / p.name for p in template_projects], None, args.method)
        shutil.rmtree(calibration)

        failures, killed_count = [], 0
        for trial in range(args.trials):
            trial_dir = Path(scratch) / f"trial-{trial}"
            shutil.copytree(template, trial_dir)
            projects = [trial_dir / p.name for p in template_projects]
            kill_after = rng.uniform(0, full_run)
            killed_count += run_child(projects, kill_after, args.method)[0]
            problems = check_trial(projects, originals, shas, args.method)
            if problems:
                failures.append((trial, kill_after, problems))
                print(f"trial {trial} (kill after {kill_after:.3f}s): FAILED", *problems, sep="\n  ", flush=True)
            shutil.rmtree(trial_dir)

    print(
        f"method: {args.method}, keys: {args.keys}, trials: {args.trials}, killed mid-run: {killed_count}, "
        f"full run: {full_run:.2f}s, seed: {args.seed}"
    )
    print(f"lost or corrupted: {len(failures)} of {args.trials} trials")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
