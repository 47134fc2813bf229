"""The rewrite at copy speed: a new data.pkl, every other record copied byte for byte, laid out as torch lays it out."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot, migrate_project, pickled, rezip, transforms, zipappend
from dlc_snapshot_fix.reading import read_recorded
from dlc_snapshot_fix.report import Status
from dlc_snapshot_fix.verify import compare_snapshots


@pytest.fixture
def snapshot(project: Path) -> Path:
    state = wrapped_state_dict(TinyPose(), "dp")
    for i in range(40):  # a pickle of a few KB and records of many sizes, as a pose model's
        state[f"module.backbone.extra{i}.weight"] = torch.randn(i + 1, 3)
    return save_snapshot(project / TRAIN / "snapshot-005.pt", state, metadata={"epoch": 5})


def _rezipped(path: Path, new_pickle: bytes, target: Path) -> Path:
    plan = rezip.plan(path, zipappend.read_layout(path))
    head, tail = rezip.build(plan, new_pickle)
    rezip.write(plan, path, target, head, tail)
    return target


def test_the_same_pickle_gives_back_the_same_file_byte_for_byte(snapshot: Path, tmp_path: Path):
    """The layout is torch's own: local headers, padding, descriptors, directory and end records."""
    layout = zipappend.read_layout(snapshot)
    same = _rezipped(snapshot, zipappend.read_member(snapshot, layout, layout.pickle_record()), tmp_path / "same.pt")
    assert same.read_bytes() == snapshot.read_bytes()


def test_a_new_pickle_loads_in_torch_with_bit_identical_tensors(snapshot: Path, tmp_path: Path):
    recorded = read_recorded(snapshot)
    fixed, _ = transforms.strip_wrapper_prefixes(recorded.snapshot)
    new = _rezipped(snapshot, pickled.dumps(fixed, recorded.storage_order), tmp_path / "new.pt")
    expected, _ = transforms.strip_wrapper_prefixes(load_snapshot(snapshot))
    for mmap in (False, True):
        assert compare_snapshots(expected, torch.load(new, weights_only=True, mmap=mmap)) == []
    with zipfile.ZipFile(new) as archive:
        assert archive.testzip() is None  # every record's CRC
    layout = zipappend.read_layout(new)
    starts = [start for start, _ in zipappend.data_spans(new, layout.records)]
    assert all(start % rezip.ALIGNMENT == 0 for start in starts)  # every record's bytes aligned, as torch aligns them


def test_migrate_rewrites_without_torch_saving_and_restores(project: Path, snapshot: Path, monkeypatch):
    original = snapshot.read_bytes()
    expected, _ = transforms.strip_wrapper_prefixes(load_snapshot(snapshot))
    monkeypatch.setattr(torch, "save", None)  # the copy-speed path never calls it
    report = migrate_project(project, check_model=False)
    assert [r.status for r in report.results] == [Status.FIXED], report.results[0].describe()
    assert compare_snapshots(expected, load_snapshot(snapshot)) == []
    from dlc_snapshot_fix import restore_project

    restore_project(project)
    assert snapshot.read_bytes() == original


def test_a_file_not_laid_out_as_torch_writes_it_is_left_to_torch(snapshot: Path, tmp_path: Path):
    other = tmp_path / "other.pt"
    with zipfile.ZipFile(snapshot) as source, zipfile.ZipFile(other, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))  # valid, loadable, but no padding or descriptors
    with pytest.raises(rezip.NotRezippable):
        rezip.plan(other, zipappend.read_layout(other))
