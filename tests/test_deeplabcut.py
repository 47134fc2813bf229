"""The acceptance path, with the real DeepLabCut 3.0.2 on a copy of sample_project.

Real project → one epoch of real training from a random-init snapshot → the trained
snapshots turned into what a two-GPU 3.0.0rc5 run leaves (numbered and best) →
``evaluate_network`` raises DeepLabCut's own RuntimeError → the CLI migrates →
``evaluate_network`` succeeds → a second run changes nothing → restore gives back the
originals → ``evaluate_network`` fails again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import deeplabcut
import pytest
import torch

from dlc_snapshot_fix import load_snapshot

pytestmark = pytest.mark.deeplabcut


def cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def evaluate(config: Path) -> None:
    deeplabcut.evaluate_network(str(config), Shuffles=[1])


def snapshot_states(train_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(train_dir.glob("*.pt"))}


def test_migration_makes_evaluate_network_work_and_restore_undoes_it(multi_gpu_project: Path):
    project = multi_gpu_project
    config = project / "config.yaml"
    train_dir = next(project.glob("dlc-models-pytorch/iteration-0/*/train"))
    names = sorted(p.name for p in train_dir.glob("*.pt"))
    assert names == ["snapshot-001.pt", "snapshot-best-001.pt"]
    assert all(k.startswith("module.") for k in load_snapshot(train_dir / "snapshot-best-001.pt")["model"])
    originals = {name: (train_dir / name).read_bytes() for name in names}

    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*Unexpected key\(s\).*\"module\.backbone"):
        evaluate(config)

    migrated = cli(project)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert migrated.stdout.count("loads strictly into its DeepLabCut model") == len(names)
    assert f"summary: {len(names)} fixed" in migrated.stdout
    assert sorted(p.name for p in train_dir.glob("*.pt")) == names  # same names: scorers unchanged

    evaluate(config)
    results = list(project.glob("evaluation-results-pytorch/iteration-0/*/*-results.csv"))
    assert results, "evaluate_network wrote no results CSV"

    before = snapshot_states(train_dir)
    again = cli(project)
    assert again.returncode == 0
    assert f"summary: {len(names)} already clean" in again.stdout
    assert snapshot_states(train_dir) == before

    restored = cli("restore", project)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert {name: (train_dir / name).read_bytes() for name in names} == originals
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)"):
        evaluate(config)


def test_check_mode_reports_the_real_project_without_writing(multi_gpu_project: Path):
    train_dir = next(multi_gpu_project.glob("dlc-models-pytorch/iteration-0/*/train"))
    before = snapshot_states(train_dir)
    checked = cli(multi_gpu_project, "--check")
    assert checked.returncode == 1
    assert "would strip 'module.'" in checked.stdout
    assert snapshot_states(train_dir) == before


def test_a_head_of_the_wrong_shape_is_explained_by_module(multi_gpu_project: Path):
    """Item 6 of the core issue: the model check names what does not fit, grouped by module."""
    train_dir = next(multi_gpu_project.glob("dlc-models-pytorch/iteration-0/*/train"))
    path = train_dir / "snapshot-001.pt"
    snapshot = load_snapshot(path)
    model_sd = dict(snapshot["model"])
    head_keys = [k for k in model_sd if k.startswith("module.heads.bodypart.heatmap_head")]
    for key in head_keys:  # a head trained for one more bodypart
        tensor = model_sd[key]
        model_sd[key] = torch.cat([tensor, tensor[:1]]) if tensor.ndim and tensor.shape[0] == 2 else tensor
    partial = path.with_name("partial")  # never truncate a file that is memory-mapped (SIGBUS)
    torch.save({**snapshot, "model": model_sd}, partial)
    os.replace(partial, path)

    migrated = cli(multi_gpu_project, "--json", "-")
    assert migrated.returncode == 3
    report = json.loads(migrated.stdout)
    by_name = {Path(s["path"]).name: s for s in report["snapshots"]}
    check = by_name["snapshot-001.pt"]["model_check"]["model"]
    assert check["status"] == "mismatch"
    assert any(m["key"].startswith("heads.bodypart.heatmap_head") for m in check["shape_mismatches"])
    assert by_name["snapshot-001.pt"]["status"] == "fixed"  # the prefix was still worth removing
    assert by_name["snapshot-best-001.pt"]["model_check"]["model"]["status"] == "ok"
