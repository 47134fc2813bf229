"""The rewrite at copy speed: a new data.pkl, every other record copied byte for byte, laid out as torch lays it out."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import (
    load_snapshot,
    migrate_project,
    names,
    pickled,
    restore_project,
    rezip,
    transforms,
    zipappend,
)
from dlc_snapshot_fix.reading import read_recorded
from dlc_snapshot_fix.report import Status
from dlc_snapshot_fix.testing import load_in_memory
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
    expected, _ = transforms.strip_wrapper_prefixes(load_in_memory(snapshot))
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


KILLED_CHILD = r"""
import os, sys
from pathlib import Path
from dlc_snapshot_fix import migrate_project, rezip, store

project, method, stage, cut = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])


def killed():
    os._exit(137)  # as SIGKILL: no handler, no clean-up, the temp file stays


def write_cut(plan, source, temp, head, tail):
    with open(source, "rb") as original:
        original.seek(plan.copy_from)
        body = original.read(plan.layout.directory_offset - plan.copy_from)
    with open(temp, "xb") as stream:
        stream.write((head + body + tail)[:cut])
    killed()


def after(real):
    return lambda *args, **kwargs: (real(*args, **kwargs), killed())


if stage == "temp":
    rezip.write = write_cut
elif stage == "backup kept":
    store.keep_original = after(store.keep_original)
elif stage == "before replace":
    store.commit_temp = lambda *args: killed()
elif stage == "after replace":
    store.commit_temp = after(store.commit_temp)
migrate_project(project, method=method, check_model=False)
raise SystemExit("the migration finished: the cut was never reached")
"""


def hrnet_sized_state(keys: int) -> dict:
    """``keys`` small tensors with HRNet's long names: a data.pkl of ~0.3 MB at 1,900 keys, as HRNet-w32's."""
    state = {f"module.backbone.stage{i // 64}.branch{i % 4}.layer{i}.weight": torch.randn(3) for i in range(keys)}
    return {**state, "module.heads.bodypart.bias": torch.randn(3)}


@pytest.mark.parametrize(
    ("method", "keys"),
    [("rewrite", 9), ("rewrite", 1900), ("append", 1900)],
    ids=["rewrite resnet-sized", "rewrite hrnet-sized", "append hrnet-sized (falls back)"],
)
def test_a_kill_at_any_point_of_the_rewrite_leaves_the_original_or_the_migrated_file(
    project: Path, tmp_path: Path, method: str, keys: int
):
    """Killed (a real process exit, nothing cleaned up) at each step and at byte offsets through the new file:
    the path holds the original or the migrated snapshot, the next run finishes, restore gives the original back."""
    path = save_snapshot(project / TRAIN / "snapshot-005.pt", hrnet_sized_state(keys), optimizer={"state": {}})
    original = path.read_bytes()
    before, after = load_in_memory(path), transforms.strip_wrapper_prefixes(load_in_memory(path), ("model",))[0]
    layout = zipappend.read_layout(path)
    records, order = pickled.loads(zipappend.read_member(path, layout, layout.pickle_record()))
    plan = rezip.plan(path, layout)
    head, tail = rezip.build(plan, pickled.dumps(transforms.strip_wrapper_prefixes(records)[0], order))
    size = len(head) + layout.directory_offset - plan.copy_from + len(tail)
    if method == "append":
        assert migrate_project(project, method="append", write=False).results[0].method == "rewrite"
    cuts = [("backup kept", 0), ("before replace", 0), ("after replace", 0)]
    cuts += [("temp", cut) for cut in sorted({0, 1, len(head) - 1, len(head), size // 2, size - len(tail), size - 1})]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CHILD)
    for stage, cut in cuts:
        path.write_bytes(original)
        names.manifest_path(project).unlink(missing_ok=True)
        shutil.rmtree(names.tool_dir(project), ignore_errors=True)  # each cut starts from a project never migrated
        child = subprocess.run(
            [sys.executable, script, project, method, stage, str(cut)], capture_output=True, text=True, check=False
        )
        assert child.returncode == 137, (stage, cut, child.stdout + child.stderr)
        expected = after if stage == "after replace" else before
        assert compare_snapshots(expected, load_snapshot(path)) == [], (stage, cut)
        rerun = migrate_project(project, method=method, check_model=False)
        assert rerun.exit_code() == 0, (stage, cut, [r.describe() for r in rerun.results])
        assert compare_snapshots(after, load_snapshot(path)) == [], (stage, cut)
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == [], (stage, cut)  # no temp left
        restore_project(project)
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(original).digest(), (stage, cut)
