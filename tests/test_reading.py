"""Safe reading: numpy metadata loads, anything that could run code is refused unexecuted."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dlc_snapshot_fix import RefusedSnapshotError, SnapshotReadError, load_snapshot


class RunsCode:
    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch '{self.canary}'",))


def test_numpy_metrics_from_old_snapshots_load(tmp_path: Path):
    path = tmp_path / "snapshot-001.pt"
    torch.save(
        {"model": {"w": torch.ones(2)}, "metadata": {"metrics": {"rmse": np.float64(1.5), "n": np.int64(2)}}}, path
    )
    loaded = load_snapshot(path)
    assert loaded["metadata"]["metrics"]["rmse"] == 1.5
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path):
    canary = tmp_path / "canary"
    path = tmp_path / "snapshot-001.pt"
    torch.save({"model": {"w": torch.ones(1)}, "metadata": RunsCode(canary)}, path)
    before = path.read_bytes()
    with pytest.raises(RefusedSnapshotError) as refused:
        load_snapshot(path)
    assert any(name.endswith(".system") for name in refused.value.unsafe_globals)
    assert "system" in str(refused.value) and str(path) in str(refused.value)
    assert not canary.exists()
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 94542086\n", "git-LFS pointer"),
        (os.urandom(4096), "damaged or not a torch file"),
    ],
    ids=["zero-bytes", "lfs-pointer", "random-bytes"],
)
def test_broken_files_get_a_message_naming_the_file(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "snapshot-001.pt"
    path.write_bytes(content)
    with pytest.raises(SnapshotReadError, match=message) as error:
        load_snapshot(path)
    assert str(path) in str(error.value)
    assert error.value.advice


def test_a_truncated_snapshot_is_reported_as_damaged(tmp_path: Path):
    path = tmp_path / "snapshot-001.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(SnapshotReadError, match="damaged"):
        load_snapshot(path)


def test_a_torchscript_archive_is_not_taken_for_a_snapshot(tmp_path: Path):
    path = tmp_path / "snapshot-001.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(SnapshotReadError, match="TorchScript"):
        load_snapshot(path)


def test_something_other_than_a_dict_is_refused(tmp_path: Path):
    path = tmp_path / "snapshot-001.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(SnapshotReadError, match="holds a list"):
        load_snapshot(path)
