"""The opt-in legacy clean-ups: numpy metadata, and the rc5 best-snapshot name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot, transforms
from dlc_snapshot_fix.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def numpy_snapshot(path: Path, epoch=17) -> Path:
    metadata = {
        "epoch": epoch,
        "metrics": {"test.rmse": np.float64(3.25), "test.mAP": np.float32(0.5)},
        "n": [np.int64(4)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"metadata": metadata, "model": wrapped_state_dict(TinyPose(), "dp")}, path)
    return path


def test_numpy_metadata_to_python_is_pure_and_counts():
    snapshot = {"metadata": {"metrics": {"a": np.float64(1.5)}, "epoch": np.int64(3)}, "model": {}}
    converted, count = transforms.numpy_metadata_to_python(snapshot)
    assert count == 2
    assert converted["metadata"] == {"metrics": {"a": 1.5}, "epoch": 3}
    assert type(converted["metadata"]["metrics"]["a"]) is float
    assert isinstance(snapshot["metadata"]["epoch"], np.int64)  # input untouched


def test_numpy_metadata_deeplabcut_refuses_is_made_plain_by_default_and_restored(project: Path):
    """float32 and int64 in metadata: DeepLabCut allow-lists numpy float64 only, so the default run cures them."""
    path = numpy_snapshot(project / TRAIN / "snapshot-017.pt")
    original = path.read_bytes()
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)

    kept = run(project, "--keep-numpy-metadata")
    assert kept.exit_code == 3  # prefix fixed, but DeepLabCut would still refuse the file: say how to fix it
    assert "--fix-metadata makes them plain numbers" in kept.output
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)

    fixed = run(project, "--verbose")  # the why of each change
    assert fixed.exit_code == 0, fixed.output
    assert "3 numpy scalar(s) in 'metadata' made plain numbers (DeepLabCut allow-lists numpy float64 only" in (
        fixed.output.replace("\n", " ")
    )
    loaded = torch.load(path, weights_only=True)
    assert loaded["metadata"]["metrics"] == {"test.rmse": 3.25, "test.mAP": 0.5}
    assert loaded["metadata"]["n"] == [4] and type(loaded["metadata"]["n"][0]) is int
    assert run("restore", project).exit_code == 0
    assert path.read_bytes() == original


def test_rename_legacy_best_and_restore(project: Path):
    legacy = numpy_snapshot(project / TRAIN / "snapshot-best.pt", epoch=17)
    original = legacy.read_bytes()
    result = run(project, "--rename-legacy-best", "--fix-metadata")
    assert result.exit_code == 0, result.output
    renamed = legacy.with_name("snapshot-best-017.pt")
    assert not legacy.exists() and renamed.exists()
    assert "renamed to snapshot-best-017.pt" in result.output
    assert "scorer name" in result.output
    assert list(load_snapshot(renamed)["model"]) == list(TinyPose().state_dict())
    assert "already clean" in run(project, "--rename-legacy-best").output

    restored = run("restore", project)
    assert restored.exit_code == 0, restored.output
    assert legacy.read_bytes() == original and not renamed.exists()


def test_rename_refuses_without_an_epoch(project: Path):
    no_epoch = project / TRAIN / "snapshot-best.pt"
    save_snapshot(no_epoch, wrapped_state_dict(TinyPose(), "dp"), metadata={"metrics": {}})
    before = no_epoch.read_bytes()
    result = run(project, "--rename-legacy-best")
    assert result.exit_code == 3
    assert "without a whole-number metadata['epoch']" in result.output
    assert no_epoch.read_bytes() == before


def test_rename_refuses_to_overwrite(project: Path):
    legacy = numpy_snapshot(project / TRAIN / "snapshot-best.pt", epoch=17)
    taken = save_snapshot(project / TRAIN / "snapshot-best-017.pt", TinyPose().state_dict())
    before = (legacy.read_bytes(), taken.read_bytes())
    result = run(project, "--rename-legacy-best", "--fix-metadata")
    assert result.exit_code == 3
    assert "cannot rename: snapshot-best-017.pt exists already" in result.output
    assert (legacy.read_bytes(), taken.read_bytes()) == before


@pytest.mark.deeplabcut
def test_deeplabcut_lists_the_renamed_best_snapshot(project: Path):
    from deeplabcut.pose_estimation_pytorch.data.snapshots import list_snapshots

    numpy_snapshot(project / TRAIN / "snapshot-best.pt", epoch=17)
    save_snapshot(project / TRAIN / "snapshot-010.pt", TinyPose().state_dict())
    assert [s.path.name for s in list_snapshots(project / TRAIN, "snapshot")] == ["snapshot-010.pt"]
    assert run(project, "--rename-legacy-best", "--fix-metadata").exit_code == 0
    listed = list_snapshots(project / TRAIN, "snapshot")
    assert [(s.path.name, s.best, s.epochs) for s in listed] == [
        ("snapshot-010.pt", False, 10),
        ("snapshot-best-017.pt", True, 17),
    ]
