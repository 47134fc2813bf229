"""The fast path: append a new data.pkl and directory; bytes [0, S) never change; undo truncates."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot, migrate_project, names, pickled, transforms, zipappend
from dlc_snapshot_fix.cli import main
from dlc_snapshot_fix.testing import load_in_memory
from dlc_snapshot_fix.verify import compare_snapshots


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def big_state() -> dict:
    state = wrapped_state_dict(TinyPose(), "dp")
    for i in range(60):  # enough keys for a pickle of a few KB, like a real pose model's (smaller) one
        state[f"module.backbone.model.layer{i}.conv.weight"] = torch.randn(4, 3)
    return state


@pytest.fixture
def snapshot(project: Path) -> Path:
    return save_snapshot(project / TRAIN / "snapshot-005.pt", big_state(), optimizer={"state": {}, "param_groups": []})


def expected_after(path: Path) -> dict:
    fixed, _ = transforms.strip_wrapper_prefixes(load_in_memory(path), ("model",))
    return fixed


def test_append_changes_only_the_end_and_loads_stripped(project: Path, snapshot: Path):
    original = snapshot.read_bytes()
    expected = expected_after(snapshot)
    result = CliRunner().invoke(main, [str(project), "--method", "append"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = snapshot.read_bytes()
    assert after[: len(original)] == original  # bytes [0, S) untouched
    assert 0 < len(after) - len(original) < zipappend.MAX_TAIL
    assert compare_snapshots(expected, load_snapshot(snapshot)) == []
    assert zipfile.ZipFile(snapshot).testzip() is None
    assert not list(names.tool_dir(project).glob("backups/**/*.orig"))  # the original is inside the file
    entry = json.loads(names.manifest_path(project).read_text())["entries"][0]
    assert (entry["backup_method"], entry["state"], entry["original_size"]) == ("append", "done", len(original))
    assert "already clean" in CliRunner().invoke(main, [str(project), "--method", "append"]).output

    restored = CliRunner().invoke(main, ["restore", str(project)])
    assert restored.exit_code == 0, restored.output
    assert snapshot.read_bytes() == original


def test_the_new_pickle_is_what_torch_save_would_write(snapshot: Path, tmp_path: Path):
    layout = zipappend.read_layout(snapshot)
    records, order = pickled.loads(zipappend.read_member(snapshot, layout, layout.pickle_record()))
    fixed, _ = transforms.strip_wrapper_prefixes(records, ("model",))
    full = tmp_path / "full.pt"
    torch.save(expected_after(snapshot), full)
    with zipfile.ZipFile(full) as archive:
        reference = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert pickled.dumps(fixed, order) == reference


def test_a_reordered_pickle_is_refused(snapshot: Path):
    layout = zipappend.read_layout(snapshot)
    records, order = pickled.loads(zipappend.read_member(snapshot, layout, layout.pickle_record()))
    records["model"] = dict(reversed(list(records["model"].items())))
    with pytest.raises(pickled.NotRecordable, match="another order"):
        pickled.dumps(records, order)


def test_stacked_appends_unwind_to_the_original(project: Path):
    import numpy as np

    path = project / TRAIN / "snapshot-006.pt"
    torch.save({"metadata": {"epoch": 6, "metrics": {"rmse": np.float64(2.5)}}, "model": big_state()}, path)
    original_sha, original_size = sha(path), path.stat().st_size
    first = migrate_project(project, method="append", check_model=False)
    assert first.results[0].status.value == "fixed" and first.results[0].notes  # numpy left: a note, not a failure
    second = migrate_project(project, method="append", check_model=False, fix_metadata=True)
    assert second.results[0].changes == ["1 numpy scalar(s) in 'metadata' made plain numbers"]
    assert torch.load(path, weights_only=True)["metadata"]["metrics"] == {"rmse": 2.5}
    entries = json.loads(names.manifest_path(project).read_text())["entries"]
    assert [e["original_size"] > original_size for e in entries] == [False, True]  # a second tail on the first
    restored = CliRunner().invoke(main, ["restore", str(project)], catch_exceptions=False)
    assert "2 restored" in restored.output
    assert sha(path) == original_sha


def cut_points(total: int, end_size: int) -> list[int]:
    """Every stage: no byte, through the body in steps, every byte of the end records, and complete."""
    body = total - end_size
    return sorted({0, 1, *range(0, body, 97), body - 1, *range(body, total + 1)})


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of ours runs after it."""


def test_a_cut_at_any_point_of_the_append_loads_as_original_or_migrated(project: Path, snapshot: Path, monkeypatch):
    original, original_sha = snapshot.read_bytes(), sha(snapshot)
    before, after = load_in_memory(snapshot), expected_after(snapshot)
    layout = zipappend.read_layout(snapshot)
    records, order = pickled.loads(zipappend.read_member(snapshot, layout, layout.pickle_record()))
    body, end = zipappend.build_tail(layout, pickled.dumps(transforms.strip_wrapper_prefixes(records)[0], order))
    tail = body + end
    real_append = zipappend.append
    outcomes = {"original": 0, "migrated": 0}
    for cut in cut_points(len(tail), len(end)):
        snapshot.write_bytes(original)
        names.manifest_path(project).unlink(missing_ok=True)

        def cut_append(path, size, body_, end_, cut=cut):
            with open(path, "r+b") as stream:
                stream.seek(size)
                stream.write((body_ + end_)[:cut])
            raise Killed

        monkeypatch.setattr(zipappend, "append", cut_append)
        with pytest.raises(Killed):
            migrate_project(project, method="append", check_model=False)
        monkeypatch.setattr(zipappend, "append", real_append)

        state = "migrated" if cut == len(tail) else "original"
        now = after if state == "migrated" else before
        assert compare_snapshots(now, load_snapshot(snapshot)) == [], f"cut at {cut}"
        outcomes[state] += 1
        # the next run settles the journal entry and finishes; undo gives back the original bytes
        rerun = migrate_project(project, method="append", check_model=False)
        assert rerun.exit_code() == 0 and compare_snapshots(after, load_snapshot(snapshot)) == []
        CliRunner().invoke(main, ["restore", str(project)], catch_exceptions=False)
        assert sha(snapshot) == original_sha, f"cut at {cut}"
    assert outcomes["migrated"] == 1 and outcomes["original"] > 50


@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_backup_dir_keeps_a_full_copy_elsewhere(project: Path, snapshot: Path, tmp_path: Path, method: str):
    original = snapshot.read_bytes()
    elsewhere = tmp_path / "other disk"
    result = CliRunner().invoke(
        main, [str(project), "--method", method, "--backup-dir", str(elsewhere), "--json", "-"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    copy = elsewhere / project.name / snapshot.relative_to(project)
    assert copy.read_bytes() == original
    assert not copy.samefile(snapshot) and copy.stat().st_nlink == 1  # a real copy, not a link
    (row,) = json.loads(result.output)["snapshots"]
    assert row["extra_backup"] == str(copy) and row["sha256_before"] == sha(copy)


def test_a_pickle_too_large_to_append_takes_the_rewrite_in_the_same_run(project: Path, monkeypatch):
    """HRNet-sized (~1,900 keys): the append would push the original end record out of the readers' window."""
    state = wrapped_state_dict(TinyPose(), "dp")
    for i in range(1900):
        state[f"module.backbone.model.stage{i // 64}.branch{i % 4}.layer{i}.weight"] = torch.randn(2)
    path = save_snapshot(project / TRAIN / "snapshot-005.pt", state)
    original, expected = path.read_bytes(), expected_after(path)

    def never(*_args):
        raise AssertionError("appended past the window")

    monkeypatch.setattr(zipappend, "append", never)
    check = CliRunner().invoke(main, [str(project), "--method", "append", "--check", "--json", "-"])
    assert check.exit_code == 1, check.output
    planned = json.loads(check.output)["snapshots"][0]
    assert (planned["status"], planned["method"]) == ("needs fix", "rewrite")
    assert "too large to append safely" in planned["method_note"]

    done = CliRunner().invoke(main, [str(project), "--method", "append", "--verbose"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert "rewritten, not appended: the new pickle is" in done.output and "too large to append safely" in done.output
    assert compare_snapshots(expected, load_snapshot(path)) == []
    entry = json.loads(names.manifest_path(project).read_text())["entries"][0]
    assert (entry["backup_method"], entry["state"]) != ("append", "writing")

    tool_files = sorted(names.tool_dir(project).rglob("*"))
    states = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [path, *tool_files] if p.is_file()}
    again = CliRunner().invoke(main, [str(project), "--method", "append"], catch_exceptions=False)
    assert again.exit_code == 0 and "already clean" in again.output
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in states} == states  # manifest included
    assert CliRunner().invoke(main, ["restore", str(project)]).exit_code == 0
    assert path.read_bytes() == original
