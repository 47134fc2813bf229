"""What a process pays for this package before it does any work: the plugin's start-up file above all.

With ``plugin enable``, every Python process of the environment runs the ``.pth`` line at
start-up (``pip``, a Jupyter kernel, ``python -c pass``): it must not import torch, numpy
or DeepLabCut, nor this package's heavy modules.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, TRAIN, TinyPose, make_project, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import autoload, transforms
from dlc_snapshot_fix.testing import load_in_memory
from dlc_snapshot_fix.verify import compare_snapshots

HEAVY = ("torch", "numpy", "deeplabcut", "yaml", "click", "dlc_snapshot_fix.reading", "dlc_snapshot_fix.plugin")


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_start_up_file_imports_nothing_heavy():
    loaded = _modules_after(autoload.PTH_LINE)
    assert "dlc_snapshot_fix.autoload" in loaded
    assert not [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY]


def test_the_package_imports_its_public_names_on_first_use():
    loaded = _modules_after("import dlc_snapshot_fix")
    assert "torch" not in loaded
    loaded = _modules_after("from dlc_snapshot_fix import migrate_project")
    assert "dlc_snapshot_fix.migrate" in loaded and "torch" not in loaded


def test_help_and_plugin_status_start_in_this_environment():
    """The first thing a user runs, in every cell of the matrix (numpy 1 or 2, with or without DeepLabCut)."""
    for args in (["--help"], ["plugin", "status"], ["--version"]):
        done = subprocess.run([sys.executable, "-m", "dlc_snapshot_fix", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert (
        "dlc-snapshot-fix PROJECT is short for"
        in subprocess.run([sys.executable, "-m", "dlc_snapshot_fix", "--help"], capture_output=True, text=True).stdout
    )


def test_the_command_line_imports_torch_only_for_work_that_needs_it():
    """``--help``, ``--version`` and ``plugin status`` must not pay seconds for ``import torch``."""
    loaded = _modules_after("import dlc_snapshot_fix.cli")
    assert "torch" not in loaded and "numpy" not in loaded and "yaml" not in loaded


def test_submit_and_merge_reports_run_without_torch(tmp_path):
    """The merge job and ``submit`` on a login node: no torch, no numpy (seconds and 650 MB each)."""
    report = tmp_path / "shard-1.json"
    report.write_text('{"root": "/a", "shard": "1/1", "state": "finished", "interrupted": false, "snapshots": []}')
    calls = [
        ["merge-reports", str(tmp_path), "--expect", "1", "--json", str(tmp_path / "m.json")],
        ["submit", str(tmp_path), "--tasks", "2", "--run-dir", str(tmp_path / "run"), "--dry-run"],
    ]
    for args in calls:
        loaded = _modules_after(
            f"from dlc_snapshot_fix.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as done:\n"
            "    assert not done.code, done.code"
        )
        assert "torch" not in loaded and "numpy" not in loaded, args
    assert (tmp_path / "m.json").is_file() and (tmp_path / "run" / "array.sbatch").is_file()


def _run_cli(args: list[str], expect: int) -> list[str]:
    """The command line in a fresh process; the modules it had loaded when it finished."""
    return _modules_after(
        f"from dlc_snapshot_fix.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as done:\n"
        f"    assert (done.code or 0) == {expect}, done.code"
    )


@pytest.mark.parametrize("method", ["append", "rewrite"])
@pytest.mark.parametrize("scope", ["project", "archive"])
def test_check_and_migration_run_without_torch(tmp_path: Path, scope: str, method: str):
    """None builds a tensor, so none pays for torch (seconds, ~600 MB) or numpy; the work is still done.

    ``append`` writes a new data.pkl at the end; ``rewrite`` copies every other record byte for byte.
    The YAML files are DeepLabCut's own (``lr: 1e-05`` and all): read at libyaml's speed, no ruamel.
    """
    project = make_project(tmp_path / "lab" / "p")
    shutil.copy(SAMPLE / "config.yaml", project / "config.yaml")
    shutil.copy(next(SAMPLE.glob("dlc-models-pytorch/*/*/train/pytorch_config.yaml")), project / TRAIN)
    state = wrapped_state_dict(TinyPose(), "dp")
    snapshots = [save_snapshot(project / TRAIN / f"snapshot-00{i}.pt", state, metadata={"epoch": i}) for i in (1, 2)]
    expected = [transforms.strip_wrapper_prefixes(load_in_memory(s))[0] for s in snapshots]
    target = str(project if scope == "project" else project.parent)
    for args, code in (
        ([target, "--check", "--no-model-check"], 1),
        ([target, "--method", method, "--no-model-check"], 0),
        ([target, "--check", "--no-model-check"], 0),
    ):
        loaded = _run_cli(args, code)
        assert "dlc_snapshot_fix.migrate" in loaded, args
        assert "torch" not in loaded and "numpy" not in loaded and "ruamel" not in loaded, args
    for path, meant in zip(snapshots, expected, strict=True):
        assert compare_snapshots(meant, torch.load(path, weights_only=True)) == []
