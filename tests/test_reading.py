"""Safe reading: numpy metadata loads, anything that could run code is refused unexecuted."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._weights_only_unpickler as weights_only
from oddfiles import rezip

from dlc_snapshot_fix import RefusedSnapshotError, SnapshotReadError, load_snapshot, pickled
from dlc_snapshot_fix.reading import read_recorded


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


def _tiny_snapshot(path: Path) -> Path:
    torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "metadata": {"epoch": 1, "losses": [0.5, 0.25]}}, path)
    return path


def test_the_torch_free_reader_reads_what_torch_reads(tmp_path: Path):
    path = _tiny_snapshot(tmp_path / "snapshot-001.pt")
    recorded = read_recorded(path)
    weight = recorded.snapshot["model"]["w"]
    assert isinstance(weight, pickled.TensorRecord) and weight.shape == (2, 3) and weight.storage.numel == 6
    assert recorded.snapshot["metadata"] == torch.load(path, weights_only=True)["metadata"]


def _local_header_signature_broken(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        offset = next(m.header_offset for m in archive.infolist() if m.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = b"PK\x00\x00"
    path.write_bytes(bytes(data))


def _storage_shorter_than_its_tensor(path: Path) -> None:
    recorded = read_recorded(path)
    storage = recorded.snapshot["model"]["w"].storage
    storage.pid = (*storage.pid[:4], 5)  # 5 elements for a 2 x 3 tensor
    rezip(io.BytesIO(path.read_bytes()), path, pickle=pickled.dumps(recorded.snapshot, recorded.storage_order))


def _setitem_on_a_list(path: Path) -> None:
    """``[0.5, 0.25]`` then ``SETITEM 0 := 9``: Python's unpickler does it, torch's weights-only one refuses."""
    data = zipfile.ZipFile(path).read("snapshot-001/data.pkl")
    losses = data.index(b"G?\xd0\x00\x00\x00\x00\x00\x00e")  # ... 0.25 APPENDS
    patched = data[: losses + 10] + b"K\x00K\x09s" + data[losses + 10 :]
    rezip(io.BytesIO(path.read_bytes()), path, pickle=patched)


@pytest.mark.parametrize(
    "damage", [_local_header_signature_broken, _storage_shorter_than_its_tensor, _setitem_on_a_list]
)
def test_what_torch_refuses_the_torch_free_reader_leaves_to_torch(tmp_path: Path, damage):
    """Never more lenient than torch: a naive reader reads each of these; torch, as DeepLabCut calls it, refuses."""
    path = _tiny_snapshot(tmp_path / "snapshot-001.pt")
    damage(path)
    with pytest.raises(pickled.NotRecordable):
        read_recorded(path)
    if damage is _setitem_on_a_list and not hasattr(weights_only.Unpickler, "_check_set_item_target"):
        torch.load(path, map_location="cpu", weights_only=True)  # torch 2.6 (the oldest supported) reads it
        return
    with pytest.raises(Exception):  # noqa: B017 - torch's own words vary with the damage
        torch.load(path, map_location="cpu", weights_only=True)
