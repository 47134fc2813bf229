"""What the tool says DeepLabCut does is what the real DeepLabCut does.

Each statement the tool makes about DeepLabCut (loads it, refuses it, reads numpy
metrics) is checked here against DeepLabCut's own loader and ``evaluate_network``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import deeplabcut
import numpy as np
import pytest
import torch
from conftest import SAMPLE, TRAIN, TinyPose, save_snapshot, train_dir_of, wrapped_state_dict
from deeplabcut.pose_estimation_pytorch.runners.base import attempt_snapshot_load

from dlc_snapshot_fix import load_snapshot
from dlc_snapshot_fix.testing import load_in_memory

pytestmark = pytest.mark.deeplabcut
DATA = Path(__file__).parent / "data"


def cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def states(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.glob("*.pt"))}


def deeplabcut_reads(path: Path) -> bool:
    try:
        attempt_snapshot_load(path, "cpu")
    except Exception:
        return False
    return True


@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_rc5_numpy_metrics_are_a_note_and_every_run_exits_0(multi_gpu_project: Path, method: str):
    """rc5 snapshots carried numpy float64 metrics; DeepLabCut 3.0.x reads them, so they never fail a run."""
    project, train_dir = multi_gpu_project, train_dir_of(multi_gpu_project)
    metrics = load_snapshot(train_dir / "snapshot-001.pt")["metadata"]["metrics"]
    assert metrics and all(type(v) is np.float64 for v in metrics.values())  # as rc5 saved them

    migrated = cli(project, "--method", method, "--verbose")  # notes are shown in full
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert f"DeepLabCut {deeplabcut.__version__} reads them" in migrated.stdout
    deeplabcut.evaluate_network(str(project / "config.yaml"), Shuffles=[1])

    before = states(train_dir)
    again = cli(project, "--method", method)
    assert again.returncode == 0 and "already clean" in again.stdout, again.stdout
    assert states(train_dir) == before
    assert cli(project, "--check").returncode == 0
    inspected = cli("inspect", project)
    assert inspected.returncode == 0, inspected.stdout
    assert "note: 'metadata' holds" in inspected.stdout


def test_the_verdict_is_deeplabcuts_loader_not_a_plain_strict_load(multi_gpu_project: Path):
    """float32 metrics: a weights-only load with numpy allow-listed reads the file and the state dict loads
    strictly, but DeepLabCut's loader refuses it, and so the tool says, as evaluate_network shows."""
    project, train_dir = multi_gpu_project, train_dir_of(multi_gpu_project)
    assert cli(project).returncode == 0
    path = train_dir / "snapshot-best-001.pt"
    snapshot = load_in_memory(path)  # not mapped: the file is replaced below
    partial = path.with_name("partial")  # never truncate a file that may be memory-mapped
    torch.save({**snapshot, "metadata": {"epoch": 1, "metrics": {"test.rmse": np.float32(2.5)}}}, partial)
    os.replace(partial, path)

    from dlc_snapshot_fix.testing import build_pose_model

    plain = load_in_memory(path)  # our allow-list reads it ... (not mapped: the tool replaces the file below)
    build_pose_model(train_dir / "pytorch_config.yaml").load_state_dict(plain["model"], strict=True)  # ... and fits
    assert not deeplabcut_reads(path)  # ... but DeepLabCut refuses it

    checked = cli(project, "--check", "--keep-numpy-metadata", "--json", "-")
    assert checked.returncode == 3
    row = {Path(s["path"]).name: s for s in json.loads(checked.stdout)["snapshots"]}["snapshot-best-001.pt"]
    assert row["model_check"]["model"]["status"] == "refused"
    assert "snapshot loader refuses it" in row["model_check"]["model"]["reason"]
    assert any("--fix-metadata" in hint for hint in row["hints"])
    with pytest.raises(Exception, match="Weights only load failed"):
        deeplabcut.evaluate_network(str(project / "config.yaml"), Shuffles=[1])

    planned = cli(project, "--check", "--json", "-")  # the default cures it: DeepLabCut asked about the planned file
    assert planned.returncode == 1, planned.stdout
    row = {Path(s["path"]).name: s for s in json.loads(planned.stdout)["snapshots"]}["snapshot-best-001.pt"]
    assert "made plain numbers (DeepLabCut allow-lists numpy float64 only" in " ".join(row["changes"])
    assert row["model_check"]["model"]["status"] == "ok" and not row["hints"]

    fixed = cli(project)
    assert fixed.returncode == 0, fixed.stdout
    assert deeplabcut_reads(path)
    deeplabcut.evaluate_network(str(project / "config.yaml"), Shuffles=[1])


def test_what_the_tool_says_without_deeplabcut_is_what_deeplabcut_does(tmp_path: Path):
    """The statements made when DeepLabCut is absent, each against the real one."""
    from dlc_snapshot_fix.verify import judge_numpy_values

    numpy_major = int(np.__version__.split(".")[0])
    here, other = DATA / f"rc5-metrics-numpy{numpy_major}.pt", DATA / f"rc5-metrics-numpy{3 - numpy_major}.pt"
    _, note = judge_numpy_values({"metadata": ["float64", "float64"]}, [], f"numpy {numpy_major}.x")
    assert "reads numpy float64 pickled under the numpy it runs with" in note
    assert deeplabcut_reads(here)  # float64 under the numpy that wrote it: read
    assert not deeplabcut_reads(other)  # ... under the other numpy: refused, as the note says
    # "a bare torch.load(weights_only=True) refuses this file": in a process that has not imported DeepLabCut
    bare_load = f"import torch; torch.load({str(here)!r}, weights_only=True)"
    bare = subprocess.run([sys.executable, "-c", bare_load], capture_output=True, text=True)
    assert bare.returncode != 0 and "Weights only load failed" in bare.stderr

    hint, _ = judge_numpy_values({"metadata": ["float32", "int64"]}, [], None)
    assert "allow-lists numpy float64 only, so its loader refuses this file" in hint
    odd = tmp_path / "float32.pt"
    torch.save({"model": {}, "metadata": {"metrics": {"a": np.float32(1)}, "epoch": np.int64(1)}}, odd)
    assert not deeplabcut_reads(odd)


@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_metrics_pickled_under_the_other_numpy_are_cured_by_the_one_command(project: Path, method: str):
    """3.0.0rc2's numpy-1 metrics under a numpy-2 DeepLabCut (and the other way round): refused on every
    snapshot, prefixed or not. --check says the default run will make them plain; after it DeepLabCut reads it."""
    numpy_major = int(np.__version__.split(".")[0])
    path = project / TRAIN / "snapshot-005.pt"
    path.write_bytes((DATA / f"rc5-metrics-numpy{3 - numpy_major}.pt").read_bytes())  # written by the real numpy
    original = path.read_bytes()
    assert not deeplabcut_reads(path)

    check = cli(project, "--no-model-check", "--method", method, "--check", "--json", "-")
    assert check.returncode == 1, check.stdout + check.stderr
    (planned,) = json.loads(check.stdout)["snapshots"]
    said = " ".join(planned["changes"])
    assert f"made plain numbers (DeepLabCut refuses them: they were pickled under numpy {3 - numpy_major}.x" in said
    assert not planned["hints"] and path.read_bytes() == original

    done = cli(project, "--no-model-check", "--method", method, "--json", "-")
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(done.stdout)["snapshots"]
    assert result["changes"] == planned["changes"] and result["method"] == planned["method"]
    assert deeplabcut_reads(path)
    metrics = attempt_snapshot_load(path, "cpu")["metadata"]["metrics"]
    assert all(type(v) is float for v in metrics.values()) and metrics == {
        k: float(v)
        for k, v in load_snapshot(DATA / f"rc5-metrics-numpy{3 - numpy_major}.pt")["metadata"]["metrics"].items()
    }
    assert cli("restore", project).returncode == 0
    assert path.read_bytes() == original


NUMPY_ELSEWHERE = {  # what a snapshot holds besides its model -> DeepLabCut's loader reads it
    "float32 in another entry": ({"scheduler": {"best": np.float32(1)}}, False),
    "float64 in another entry": ({"scheduler": {"best": np.float64(1)}}, True),
    "int64 as a key": ({"metadata": {"metrics": {np.int64(3): 1.0}}}, False),
    "a float64 dtype": ({"metadata": {"dtype": np.dtype("float64")}}, True),
    "an int32 dtype": ({"extra": [np.dtype("int32")]}, False),
    "float32 in the state dict": ({"model": {"module.step": np.float32(0)}}, False),
}


@pytest.mark.parametrize("case", sorted(NUMPY_ELSEWHERE))
def test_numpy_values_anywhere_are_judged_as_deeplabcut_judges_them(project: Path, case: str):
    """Found by the fuzzer: a numpy float32 outside 'metadata' made a migration say "fixed" with a note that
    DeepLabCut reads the file; DeepLabCut's loader refused it. Its allow-list applies to the whole file."""
    extra, deeplabcut_loads = NUMPY_ELSEWHERE[case]
    state_dict = {**wrapped_state_dict(TinyPose(), "dp"), **extra.get("model", {})}
    others = {entry: value for entry, value in extra.items() if entry != "model"}
    path = save_snapshot(project / TRAIN / "snapshot-001.pt", state_dict, **others)
    assert deeplabcut_reads(path) is deeplabcut_loads
    fixable = case == "int64 as a key"  # numpy scalars in 'metadata': the default run makes them plain numbers
    for args in (["--check"], ["--method", "append"]):
        run = cli(project, "--no-model-check", "--json", "-", *args)
        (result,) = json.loads(run.stdout)["snapshots"]
        said_loadable = result["status"] != "failed" and not result["hints"]
        assert said_loadable is (deeplabcut_loads or fixable), (case, args, result)
        exit_code = 3 if not (deeplabcut_loads or fixable) else 1 if args == ["--check"] else 0
        assert run.returncode == exit_code, run.stdout
    assert deeplabcut_reads(path) is (deeplabcut_loads or fixable)  # migrated: other numpy values are still there
    done = cli(project, "--no-model-check", "--fix-metadata", "--json", "-")
    (result,) = json.loads(done.stdout)["snapshots"]
    assert (done.returncode == 0) is (deeplabcut_loads or fixable), result
    assert deeplabcut_reads(path) is (deeplabcut_loads or fixable)
    if result["status"] != "failed":  # (a non-tensor in the state dict is refused before numpy is judged)
        advice = "must be saved again without numpy" in " ".join(result["hints"])
        assert advice is not (deeplabcut_loads or fixable), result


def test_what_discovery_says_of_names_is_how_deeplabcut_lists_them(project: Path):
    """"DeepLabCut never loads it", "current DeepLabCut ignores it", "will try to load it": DeepLabCut's own listing."""
    from deeplabcut.pose_estimation_pytorch.runners.snapshots import list_snapshots

    from dlc_snapshot_fix import discover_project, names

    train = project / TRAIN
    for name in ("snapshot-001.pt", "snapshot-best-002.pt", "snapshot-best.pt", "snapshot-detector-003.pt", "model.pt"):
        torch.save({"model": {}}, train / name)
    (train / "snapshot-999.pt").mkdir()
    temp = names.temp_path(train / "snapshot-001.pt", "ab12cd34")
    temp.write_bytes(b"")
    listed = {s.path.name for p in ("snapshot", "snapshot-detector") for s in list_snapshots(train, p)}

    inventory = discover_project(project)
    ours = {f.path.name for f in inventory.snapshots if not f.legacy_best}
    assert ours == listed - {"snapshot-999.pt"}
    reasons = {s.path.name: s.reason for s in inventory.skipped}
    assert "DeepLabCut never loads it" in reasons["model.pt"] and "model.pt" not in listed
    assert "will try to load it and fail" in reasons["snapshot-999.pt"] and "snapshot-999.pt" in listed
    assert [f.path.name for f in inventory.snapshots if f.legacy_best] == ["snapshot-best.pt"]
    assert "snapshot-best.pt" not in listed  # "current DeepLabCut ignores it"
    assert temp.name not in listed  # this tool's temp files are never picked up


def test_discovery_reads_pytorch_config_as_deeplabcut_reads_it(project: Path):
    """YAML 1.2, as DeepLabCut's ``read_config_as_dict``: ``snapshot_prefix: no`` is the prefix "no" (PyYAML: False).

    DeepLabCut's trainer takes that value as it reads it and saves ``no-010.pt``; a config with a
    duplicated key is one DeepLabCut cannot read at all, which the tool reports as a problem.
    """
    from deeplabcut.pose_estimation_pytorch.config import read_config_as_dict

    from dlc_snapshot_fix import discover_project

    train = project / TRAIN
    sample_config = next(SAMPLE.glob("dlc-models-pytorch/*/*/train/pytorch_config.yaml")).read_text(encoding="utf-8")
    config = train / "pytorch_config.yaml"
    assert "\n  snapshot_prefix:\n" in sample_config  # DeepLabCut writes it empty: its default prefix
    config.write_text(sample_config.replace("\n  snapshot_prefix:\n", "\n  snapshot_prefix: no\n"), encoding="utf-8")
    prefix = read_config_as_dict(config)["runner"]["snapshot_prefix"]
    assert prefix == "no"
    torch.save({"model": {}}, train / f"{prefix}-010.pt")

    inventory = discover_project(project)
    assert [(f.path.name, f.role, f.prefix) for f in inventory.snapshots] == [("no-010.pt", "pose", "no")]
    assert not inventory.problems

    config.write_text(sample_config + "runner: {}\n", encoding="utf-8")  # a second top-level "runner"
    with pytest.raises(Exception, match="duplicate key"):
        read_config_as_dict(config)
    problems = discover_project(project).problems
    assert len(problems) == 1 and str(config) in problems[0] and "duplicate key" in problems[0]


@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_a_record_whose_local_header_is_broken_is_refused_as_deeplabcut_refuses_it(project: Path, method: str):
    """torch's memory-mapped reader skips the local headers; DeepLabCut's loader (miniz) does not."""
    train = project / TRAIN
    files = [
        save_snapshot(train / "snapshot-001.pt", TinyPose().state_dict()),
        save_snapshot(train / "snapshot-002.pt", wrapped_state_dict(TinyPose(), "dp")),
    ]
    for path in files:
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as archive:
            record = next(info for info in archive.infolist() if "/data/" in info.filename)
        assert data[record.header_offset : record.header_offset + 4] == b"PK\x03\x04"
        data[record.header_offset + 3] = 0x05  # one byte of one tensor record's local header signature
        path.write_bytes(bytes(data))
        assert not deeplabcut_reads(path)
    before = states(train)
    for args in (["--check"], ["--method", method]):
        done = cli(project, "--no-model-check", *args)
        assert done.returncode == 3, done.stdout
        assert done.stdout.count("failed") >= 2 and "invalid header or archive is corrupted" in done.stdout
        assert "already clean" not in done.stdout
    assert states(train) == before


def _mark_as_folder(path: Path, member: str) -> None:
    """Set the MS-DOS folder bit in the external attributes of one member's central directory record."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        position = archive.start_dir
    while data[position : position + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, position + 28)
        if data[position + 46 : position + 46 + name_len].decode().endswith(f"/{member}"):
            data[position + 38] |= 0x10
            path.write_bytes(bytes(data))
            return
        position += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"no member {member}")


@pytest.mark.parametrize("member", ["data.pkl", "data/0"])
def test_a_member_marked_as_a_folder_is_refused_as_deeplabcut_misreads_it(project: Path, member: str):
    """Found by the fuzzer: miniz (torch's zip reader, DeepLabCut's loader) takes a member with the folder bit for
    a folder and extracts nothing; torch then reads the buffer it allocated. The torch-free reader and torch's
    memory-mapped one read the real bytes, and the file was called loadable (and was migrated)."""
    weight = torch.ones(256, 1024)  # 1 MiB: what DeepLabCut would read instead is a fresh allocation
    path = save_snapshot(project / TRAIN / "snapshot-001.pt", {"module.weight": weight})
    _mark_as_folder(path, member)
    try:
        loaded = attempt_snapshot_load(path, "cpu")["model"]["module.weight"]
    except Exception:
        assert member == "data.pkl"  # a pickle read from uninitialized memory: refused (or worse)
    else:
        assert member == "data/0" and not torch.equal(loaded, weight)  # loaded, silently, without its weights
    before = path.read_bytes()
    for args in (["--check"], ["--method", "append"], ["--method", "rewrite"]):
        done = cli(project, "--no-model-check", *args)
        assert done.returncode == 3, done.stdout
        assert f"/{member}' is marked as a folder" in done.stdout, done.stdout
    assert path.read_bytes() == before
