"""Migration, check, dry run and restore on small synthetic snapshots, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path

import filelock
import pytest
import torch
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict
from hypothesis import given
from hypothesis import strategies as st
from test_reading import RunsCode

from dlc_snapshot_fix import ProjectBusyError, Status, load_snapshot, migrate_project, names, store
from dlc_snapshot_fix.cli import main
from dlc_snapshot_fix.verify import tensors_bit_identical


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def file_states(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def snapshots(project: Path) -> dict[str, Path]:
    train = project / TRAIN
    model = TinyPose()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {
        "dp": save_snapshot(
            train / "snapshot-005.pt",
            wrapped_state_dict(model, "dp"),
            optimizer=optimizer.state_dict(),
            scheduler={"last_epoch": 5},
        ),
        "stacked": save_snapshot(train / "snapshot-best-010.pt", wrapped_state_dict(model, "dp", "compile")),
        "clean": save_snapshot(train / "snapshot-001.pt", model.state_dict()),
        "detector": save_snapshot(train / "snapshot-detector-003.pt", {"module.model.backbone.w": torch.ones(3)}),
        "exported": _save_exported(project, model),
    }


def _save_exported(project: Path, model: torch.nn.Module) -> Path:
    path = project / "exported-models-pytorch/DLC_test_tiny_iteration-0_shuffle-1/DLC_test_tiny_snapshot-005.pt"
    path.parent.mkdir(parents=True)
    torch.save({"config": {"method": "bu"}, "pose": wrapped_state_dict(model, "dp"), "detector": None}, path)
    return path


def test_migrates_every_snapshot_and_keeps_everything_else(project: Path, snapshots: dict[str, Path]):
    # read into memory, as DeepLabCut reads them: a memory-mapped original could not be replaced on Windows
    originals = {name: torch.load(path, weights_only=True) for name, path in snapshots.items()}
    mode = snapshots["dp"].stat().st_mode
    result = run(project)
    assert result.exit_code == 0, result.output
    assert "summary: 4 fixed, 1 already clean" in result.output

    fixed = load_snapshot(snapshots["dp"])
    clean = TinyPose().state_dict()
    assert list(fixed["model"]) == list(clean)
    assert fixed["model"]._metadata == clean._metadata
    for key in clean:
        assert tensors_bit_identical(fixed["model"][key], originals["dp"]["model"]["module." + key])
    assert fixed["metadata"] == originals["dp"]["metadata"]
    assert fixed["scheduler"] == originals["dp"]["scheduler"]
    assert fixed["optimizer"]["param_groups"] == originals["dp"]["optimizer"]["param_groups"]
    assert snapshots["dp"].stat().st_mode == mode
    TinyPose().load_state_dict(load_snapshot(snapshots["stacked"])["model"], strict=True)
    assert list(load_snapshot(snapshots["detector"])["model"]) == ["model.backbone.w"]
    exported = load_snapshot(snapshots["exported"])
    TinyPose().load_state_dict(exported["pose"], strict=True)
    assert exported["detector"] is None and exported["config"] == {"method": "bu"}


def test_second_run_changes_nothing(project: Path, snapshots: dict[str, Path]):
    assert run(project).exit_code == 0
    before = file_states(project)
    result = run(project)
    assert result.exit_code == 0
    assert "summary: 5 already clean" in result.output
    assert file_states(project) == before


def test_backups_are_the_original_bytes_and_never_look_like_snapshots(project: Path, snapshots: dict[str, Path]):
    original_bytes = {path: path.read_bytes() for path in snapshots.values()}
    report = migrate_project(project, check_model=False)
    for result in report.results:
        if result.status == Status.FIXED:
            assert result.backup.read_bytes() == original_bytes[result.path]
    listed = [p for p in project.rglob("*") if p.is_file() and names.is_dlc_snapshot_name(p.name, "snapshot")]
    assert sorted(listed) == sorted(
        p for p in snapshots.values() if p.parent.name == "train" and "detector" not in p.name
    )
    manifest = json.loads(names.manifest_path(project).read_text())
    assert {e["state"] for e in manifest["entries"]} == {"done"}
    assert all(len(e["sha256_before"]) == 64 and len(e["sha256_after"]) == 64 for e in manifest["entries"])


def test_restore_gives_back_byte_identical_originals(project: Path, snapshots: dict[str, Path]):
    original_bytes = {path: path.read_bytes() for path in snapshots.values()}
    assert run(project).exit_code == 0
    result = run("restore", project)
    assert result.exit_code == 0, result.output
    assert "4 restored" in result.output
    assert {path: path.read_bytes() for path in snapshots.values()} == original_bytes
    assert "nothing to restore" in run("restore", project).output
    # and the cycle repeats: migrate again after a restore
    assert "4 fixed" in run(project).output


def test_check_and_dry_run_write_nothing(project: Path, snapshots: dict[str, Path]):
    before = file_states(project)
    check = run(project, "--check")
    assert check.exit_code == 1
    dry = run(project, "--dry-run")
    assert dry.exit_code == 0
    assert "would be stripped 'module.' from 'model'" in dry.output
    assert file_states(project) == before
    assert not names.tool_dir(project).exists()
    run(project)
    assert run(project, "--check").exit_code == 0


def test_bad_snapshots_fail_alone_and_stay_untouched(project: Path, snapshots: dict[str, Path]):
    train = project / TRAIN
    damaged = train / "snapshot-007.pt"
    damaged.write_bytes(snapshots["dp"].read_bytes()[:3000])
    no_model = save_snapshot(train / "snapshot-008.pt", None)
    half = save_snapshot(train / "snapshot-009.pt", {"module.a": torch.ones(1), "b": torch.ones(1)})
    canary = project.parent / "canary"
    hostile = save_snapshot(train / "snapshot-011.pt", wrapped_state_dict(TinyPose(), "dp"), extra=RunsCode(canary))
    bad = {p: p.read_bytes() for p in (damaged, no_model, half, hostile)}

    result = run(project, "--json", project.parent / "report.json")
    assert result.exit_code == 3
    report = json.loads((project.parent / "report.json").read_text())
    by_name = {Path(s["path"]).name: s for s in report["snapshots"]}
    assert by_name["snapshot-007.pt"]["status"] == "failed" and "damaged" in by_name["snapshot-007.pt"]["reason"]
    assert "no 'model'" in by_name["snapshot-008.pt"]["reason"]
    assert "1 of 2 keys start with 'module.'" in by_name["snapshot-009.pt"]["reason"]
    assert "refused" in by_name["snapshot-011.pt"]["reason"] and "system" in by_name["snapshot-011.pt"]["reason"]
    assert not canary.exists()
    assert by_name["snapshot-005.pt"]["status"] == "fixed"
    assert {p: p.read_bytes() for p in bad} == bad
    assert "snapshot-007.pt" in result.output and "restore it from a backup" in result.output


def test_a_folder_without_any_project_is_a_usage_error(tmp_path: Path):
    result = CliRunner().invoke(main, [str(tmp_path)])
    assert result.exit_code == 2
    assert "no DeepLabCut project (a config.yaml beside dlc-models-pytorch) found" in result.output
    (tmp_path / "dlc-models-pytorch").mkdir()  # a project that lost its config.yaml
    result = CliRunner().invoke(main, [str(tmp_path)])
    assert result.exit_code == 2
    assert "no config.yaml here" in result.output


def test_a_second_run_on_a_busy_project_stops(project: Path, snapshots: dict[str, Path]):
    names.tool_dir(project).mkdir()
    with filelock.FileLock(names.lock_path(project)), pytest.raises(ProjectBusyError, match="another"):
        migrate_project(project)
    assert load_snapshot(snapshots["dp"])["model"].keys() == wrapped_state_dict(TinyPose(), "dp").keys()


def test_json_to_stdout_is_machine_readable(project: Path, snapshots: dict[str, Path]):
    result = run(project, "--dry-run", "--json", "-")
    report = json.loads(result.output)
    assert report["summary"] == {"already clean": 1, "needs fix": 4}
    assert all(s["model_check"]["model"]["status"] == "skipped" for s in report["snapshots"] if s["role"] == "pose")


def test_console_script_is_installed(project: Path, snapshots: dict[str, Path]):
    # where pip put it for the Python this test runs in: bin/ in a venv, Scripts\ on Windows (an .exe)
    script = Path(sysconfig.get_path("scripts")) / ("dlc-snapshot-fix.exe" if os.name == "nt" else "dlc-snapshot-fix")
    completed = subprocess.run([script, "--check", "-q", project], capture_output=True, text=True, check=False)
    assert completed.returncode == 1, completed.stderr
    assert "4 needs fix" in completed.stdout


def test_an_unreadable_manifest_stops_the_run_before_any_write(project: Path, snapshots: dict[str, Path]):
    names.tool_dir(project).mkdir()
    names.manifest_path(project).write_text("{not json")
    before = snapshots["dp"].read_bytes()
    result = CliRunner().invoke(main, [str(project)])
    assert result.exit_code == 2
    assert "manifest.json: unreadable" in result.output
    assert snapshots["dp"].read_bytes() == before


def test_a_corrupted_write_is_caught_by_the_read_back_before_it_replaces_the_original(
    project: Path, snapshots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    """torch's rewrite (here with --trust): a bit flipped in a tensor on its way to disk is seen by the read-back,
    which runs before the swap (Windows cannot replace a file this process still maps): the original stays."""
    from dlc_snapshot_fix import store

    original = snapshots["dp"].read_bytes()
    real_write = store.write_temp

    def write_then_flip(*args, **kwargs):
        temp, sha256 = real_write(*args, **kwargs)
        _flip_first_storage_byte(temp)
        return temp, sha256

    monkeypatch.setattr(store, "write_temp", write_then_flip)
    report = migrate_project(project, check_model=False, trust=True)
    failed = {r.path.name: r for r in report.results if r.status == Status.FAILED}
    assert "snapshot-005.pt" in failed, [r.describe() for r in report.results]
    assert "read-back differed" in failed["snapshot-005.pt"].reason
    assert "the snapshot is unchanged" in failed["snapshot-005.pt"].reason
    assert snapshots["dp"].read_bytes() == original
    assert not [p for p in snapshots["dp"].parent.iterdir() if p.name.startswith(".")]  # no temp file left


def _flip_first_storage_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(b"data/0") + 200] ^= 0xFF  # inside the first storage's bytes
    path.write_bytes(bytes(data))


def test_a_corrupted_copy_is_caught_before_it_replaces_the_original(
    project: Path, snapshots: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    """The rewrite at copy speed: a bit flipped in the copied tensor bytes is seen before the swap (CRC)."""
    from dlc_snapshot_fix import rezip

    original = snapshots["dp"].read_bytes()
    real_write = rezip.write

    def write_then_flip(plan, source: Path, temp: Path, head: bytes, tail: bytes) -> None:
        real_write(plan, source, temp, head, tail)
        _flip_first_storage_byte(temp)

    monkeypatch.setattr(rezip, "write", write_then_flip)
    report = migrate_project(project, check_model=False)
    failed = {r.path.name: r for r in report.results if r.status == Status.FAILED}
    reason = failed["snapshot-005.pt"].reason
    assert "did not read back as meant (the bytes of" in reason and "do not match its CRC" in reason, reason
    assert "the snapshot is unchanged" in reason
    assert snapshots["dp"].read_bytes() == original
    assert not [p for p in snapshots["dp"].parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_hash_taken_ahead_is_used_only_for_the_file_as_it_was_hashed(tmp_path: Path):
    """The rewrite hashes the next original in a second thread; a file changed since is hashed again."""
    import hashlib

    from dlc_snapshot_fix import store

    same, changed, vanished = (tmp_path / name for name in ("same.pt", "changed.pt", "vanished.pt"))
    for path in (same, changed, vanished):
        path.write_bytes(b"original " * 100_000)
    ahead = store.HashAhead()
    try:
        hashing = [ahead.start(path) for path in (same, changed, vanished)]
        assert ahead.start(tmp_path / "never-there.pt") is None  # asked for, it fails as a plain hash would
        assert all(future.result() for future in hashing)  # hashed before the changes below
        changed.write_bytes(b"changed! " * 100_000)  # same size, another mtime
        vanished.unlink()
        assert ahead.sha256_of(same) == hashlib.sha256(same.read_bytes()).hexdigest()
        assert ahead.sha256_of(changed) == hashlib.sha256(changed.read_bytes()).hexdigest()
        with pytest.raises(FileNotFoundError):
            ahead.sha256_of(vanished)
        with pytest.raises(FileNotFoundError):
            ahead.sha256_of(tmp_path / "never-there.pt")
    finally:
        ahead.close()


@given(
    st.lists(
        st.tuples(
            st.text(max_size=12),
            st.one_of(st.none(), st.integers(min_value=0)),
            st.sampled_from(["pending", "writing", "done", "restored"]),
        ),
        max_size=12,
    ),
    st.lists(st.integers(min_value=0, max_value=11), max_size=6),
)
def test_a_manifest_saved_from_kept_texts_is_what_json_dumps_writes(rows, changed):
    """Saves re-serialise only changed entries (a run saves two or three times per snapshot); the file stays
    exactly ``json.dumps({"format": 1, "entries": [...]}, indent=2)``, whatever was changed between saves."""
    import dataclasses

    manifest = store.Manifest.__new__(store.Manifest)  # no project: only the text is asked for
    manifest.entries, manifest._texts = [], {}
    for name, size, state in rows:
        manifest.entries.append(
            store.ManifestEntry(
                path=f"train/{name}",
                backup="b\\é",
                sha256_before=None,
                sha256_after=None,
                backup_method="hardlink",
                tool_version="0",
                time="t",
                change=name,
                original_size=size,
                state=state,
            )
        )
        assert manifest._text() == json.dumps(
            {"format": 1, "entries": [dataclasses.asdict(e) for e in manifest.entries]}, indent=2
        )
    for index in changed:
        if index < len(manifest.entries):
            manifest.entries[index].state = "done"
            manifest.entries[index].sha256_after = "ab" * 32
        assert manifest._text() == json.dumps(
            {"format": 1, "entries": [dataclasses.asdict(e) for e in manifest.entries]}, indent=2
        )
