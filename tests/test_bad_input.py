"""Bad input, one case each: a message naming the file, what is wrong and what to do; a
non-zero exit; zero bytes changed in that file; and the good snapshot beside it still migrated."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, needs_symlinks, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot, reading
from dlc_snapshot_fix.cli import main


def run(project: Path):
    return CliRunner().invoke(main, [str(project)], catch_exceptions=False)


@pytest.fixture
def good(project: Path) -> Path:
    return save_snapshot(project / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"))


def assert_good_migrated(good: Path) -> None:
    assert list(load_snapshot(good)["model"]) == list(TinyPose().state_dict())


def tf_data_named_like_a_snapshot(train: Path) -> Path:
    path = train / "snapshot-100.pt"  # a TensorFlow .data-00000-of-00001 shard, renamed
    path.write_bytes(b"\x00" * 64 + os.urandom(4096))
    return path


def truncated(train: Path) -> Path:
    path = save_snapshot(train / "snapshot-007.pt", wrapped_state_dict(TinyPose(), "dp"))
    path.write_bytes(path.read_bytes()[:1500])
    return path


def torchscript(train: Path) -> Path:
    path = train / "snapshot-008.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    return path


def lfs_pointer(train: Path) -> Path:
    path = train / "snapshot-009.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 94542086\n")
    return path


def raw_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(train: Path) -> Path:
        (train / name).write_bytes(content)
        return train / name

    return make


def snapshot_with(name: str, model) -> Callable[[Path], Path]:
    def make(train: Path) -> Path:
        path = train / name
        torch.save({"metadata": {"epoch": 1}, **({} if model is None else {"model": model})}, path)
        return path

    return make


CASES = {
    "zero-bytes": (raw_file("snapshot-001.pt", b""), "empty file"),
    "random-bytes": (raw_file("snapshot-002.pt", random.Random(2).randbytes(9000)), "damaged or not a torch file"),
    "truncated-zip": (truncated, "damaged or not a torch file"),
    "tensorflow-checkpoint-as-pt": (tf_data_named_like_a_snapshot, "damaged or not a torch file"),
    "torchscript": (torchscript, "TorchScript archive"),
    "git-lfs-pointer": (lfs_pointer, "git-LFS pointer"),
    "no-model": (snapshot_with("snapshot-010.pt", None), "no 'model' entry"),
    "model-not-a-dict": (snapshot_with("snapshot-011.pt", [torch.ones(1)]), "'model' is a list, not a state dict"),
    "some-keys-prefixed": (
        snapshot_with("snapshot-012.pt", {"module.a.weight": torch.ones(1), "b.weight": torch.ones(1)}),
        "1 of 2 keys start with 'module.'",
    ),
    "keys-collide": (
        snapshot_with("snapshot-013.pt", {"module.a.weight": torch.ones(1), "a.weight": torch.zeros(1)}),
        "would make keys collide",
    ),
    "non-tensor-values": (
        snapshot_with("snapshot-014.pt", {"module.a": torch.ones(1), "module.b": "not a tensor"}),
        "not tensors",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_snapshot(project: Path, good: Path, case: str):
    make, message = CASES[case]
    bad = make(project / TRAIN)
    before = (bad.read_bytes(), bad.stat().st_mtime_ns)
    result = run(project)
    assert result.exit_code == 3, result.output
    line = next(line for line in result.output.splitlines() if bad.name in line)
    detail = result.output.split(line, 1)[1].splitlines()[1]
    assert message in detail
    assert (bad.read_bytes(), bad.stat().st_mtime_ns) == before
    assert_good_migrated(good)


def test_legacy_pre_zip_format_is_migrated_and_stays_legacy(project: Path, good: Path):
    legacy = project / TRAIN / "snapshot-003.pt"
    torch.save({"model": wrapped_state_dict(TinyPose(), "dp")}, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    assert run(project).exit_code == 0
    assert not zipfile.is_zipfile(legacy)
    assert list(load_snapshot(legacy)["model"]) == list(TinyPose().state_dict())


def test_malformed_config_yaml_is_reported_and_snapshots_still_migrated(project: Path, good: Path):
    (project / "config.yaml").write_text("Task: [unclosed\n")
    result = run(project)
    assert result.exit_code == 3
    assert "config.yaml: not valid YAML" in result.output and "Fix or restore this file" in result.output
    assert (project / "config.yaml").read_text() == "Task: [unclosed\n"
    assert_good_migrated(good)


def test_malformed_pytorch_config_is_reported(project: Path, good: Path):
    config = project / TRAIN / "pytorch_config.yaml"
    config.write_text("runner: {snapshot_prefix: [\n")
    result = run(project)
    assert result.exit_code == 3
    assert "pytorch_config.yaml: not valid YAML" in result.output
    assert_good_migrated(good)


def test_missing_config_yaml(project: Path, good: Path):
    (project / "config.yaml").unlink()
    before = good.read_bytes()
    result = CliRunner().invoke(main, [str(project)])
    assert result.exit_code == 2
    assert "no config.yaml here. Pass a DeepLabCut project folder" in result.output
    assert good.read_bytes() == before


def test_project_path_pointing_elsewhere_is_only_a_warning(project: Path, good: Path):
    config = yaml.safe_load((project / "config.yaml").read_text())
    (project / "config.yaml").write_text(yaml.safe_dump({**config, "project_path": "/moved/from/here"}))
    result = run(project)
    assert result.exit_code == 0  # DeepLabCut repairs project_path itself; nothing here depends on it
    assert "project_path is /moved/from/here" in result.output
    assert_good_migrated(good)


def test_unreadable_file(project: Path, good: Path, monkeypatch: pytest.MonkeyPatch):
    """As root, chmod 000 does not stop reads, so EACCES is injected at open() for that one file."""
    bad = save_snapshot(project / TRAIN / "snapshot-004.pt", wrapped_state_dict(TinyPose(), "dp"))
    before = bad.read_bytes()
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if Path(file) == bad:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(reading, "open", guarded_open, raising=False)
    result = run(project)
    assert result.exit_code == 3
    assert "snapshot-004.pt" in result.output
    assert "cannot be read: permission denied (Permission denied)" in result.output
    assert bad.read_bytes() == before
    assert_good_migrated(good)


@contextlib.contextmanager
def read_only_bind_mount(folder: Path):
    subprocess.run(["mount", "--bind", folder, folder], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", folder], check=True, capture_output=True)


def can_mount() -> bool:
    """Root on Linux with ``mount`` (no ``geteuid`` on Windows: asked only where it exists)."""
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not can_mount(), reason="needs root to bind-mount a folder read-only")
def test_read_only_folder(project: Path, good: Path):
    other_train = project / TRAIN.replace("shuffle1", "shuffle2")
    other_train.mkdir(parents=True)
    blocked = save_snapshot(other_train / "snapshot-006.pt", wrapped_state_dict(TinyPose(), "dp"))
    before = blocked.read_bytes()
    with read_only_bind_mount(other_train):
        result = run(project)
    assert result.exit_code == 3
    assert "snapshot-006.pt" in result.output and "Read-only file system" in result.output
    assert blocked.read_bytes() == before
    assert not list((project / ".dlc-snapshot-fix" / "backups").rglob("snapshot-006.pt*"))  # no backup wasted
    assert_good_migrated(good)


@needs_symlinks
def test_symlink_loop(project: Path, good: Path):
    train = project / TRAIN
    (train / "snapshot-020.pt").symlink_to("snapshot-020.pt")  # points at itself
    (train.parent.parent / "loop").symlink_to("..")  # a folder loop: iteration-0/loop -> dlc-models-pytorch
    result = run(project)
    assert result.exit_code == 3
    assert "snapshot-020.pt: a broken symbolic link" in result.output
    assert (train / "snapshot-020.pt").is_symlink()
    assert_good_migrated(good)


def test_folder_named_like_a_snapshot(project: Path, good: Path):
    (project / TRAIN / "snapshot-030.pt").mkdir()
    result = run(project)
    assert result.exit_code == 3
    assert "snapshot-030.pt: named like a snapshot but not a file" in result.output
    assert_good_migrated(good)


def test_spaces_and_non_ascii_in_paths(tmp_path: Path, project: Path):
    renamed = project.rename(tmp_path / "Projekt Maus ü 数据 (copy)")
    good = save_snapshot(renamed / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"))
    result = run(renamed)
    assert result.exit_code == 0, result.output
    assert_good_migrated(good)


def test_tensorflow_checkpoint_set_is_skipped_with_the_reason(project: Path, good: Path):
    tf_train = project / "dlc-models/iteration-0/testNov22-trainset80shuffle1/train"
    tf_train.mkdir(parents=True)
    for name in ("snapshot-1000.index", "snapshot-1000.meta", "snapshot-1000.data-00000-of-00001"):
        (tf_train / name).write_bytes(os.urandom(256))
    before = {p: p.read_bytes() for p in tf_train.iterdir()}
    result = run(project)
    assert result.exit_code == 0  # a project may hold both engines; TensorFlow models are simply not ours
    assert "TensorFlow-engine model: not a PyTorch snapshot, left alone" in result.output
    assert {p: p.read_bytes() for p in tf_train.iterdir()} == before
    assert_good_migrated(good)
