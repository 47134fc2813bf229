"""Windows' own failures, on a real Windows CPython (`scripts/wine.sh test` runs these under Wine).

Another process holding a snapshot open or memory-mapped (DeepLabCut, a notebook, a viewer,
antivirus) makes Windows refuse to replace or truncate it. Python maps those refusals to
EACCES or EINVAL, whose usual advice ("check your permissions") is wrong there: the reason
must say that another program holds the file, and a run after it lets go must finish.
Between Wine processes the sharing rules are Windows' own (``../shared/wine-facts.md``).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import fserrors, load_snapshot, migrate_project, restore_project

pytestmark = pytest.mark.skipif(sys.platform != "win32", reason="Windows' own error codes: run on Windows (or Wine)")

HOLD = """
import sys, torch
held = torch.load(sys.argv[1], weights_only=True, mmap=True)  # as DeepLabCut's loader or a notebook maps it
print("holding", flush=True)
sys.stdin.read()  # until the test closes our standard input
"""


@contextmanager
def held_by_another_process(path: Path) -> Iterator[None]:
    """Another Windows process keeps ``path`` memory-mapped until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)


def prefixed(project: Path) -> Path:
    return save_snapshot(project / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"))


def stripped(path: Path) -> bool:
    return list(load_snapshot(path)["model"]) == list(TinyPose().state_dict())


def test_a_replace_refused_because_another_process_maps_the_file_says_so_and_a_rerun_finishes(project: Path):
    snapshot = prefixed(project)
    before = snapshot.read_bytes()
    with held_by_another_process(snapshot):
        (result,) = migrate_project(project, method="rewrite", check_model=False).results
    assert result.status.value == "failed", result.describe()
    assert "another program has the file open or mapped" in result.reason, result.reason
    assert "Close the programs that use the project" in result.reason and "permissions" not in result.reason
    assert snapshot.read_bytes() == before
    (rerun,) = migrate_project(project, method="rewrite", check_model=False).results
    assert rerun.status.value == "fixed", rerun.describe()
    assert stripped(snapshot)


def test_undoing_an_append_while_another_process_maps_the_file_says_so_and_a_rerun_finishes(project: Path):
    snapshot = prefixed(project)
    original = snapshot.read_bytes()
    (fixed,) = migrate_project(project, method="append", check_model=False).results
    assert fixed.status.value == "fixed", fixed.describe()
    with held_by_another_process(snapshot):
        (refused,) = restore_project(project).results
    assert refused.status.value == "failed"
    assert "a program has the file memory-mapped" in refused.reason, refused.reason
    assert "the original is still kept inside the file" in refused.reason
    assert stripped(snapshot)
    (restored,) = restore_project(project).results
    assert restored.status.value == "restored", restored.describe()
    assert snapshot.read_bytes() == original


def _read_only_stops_a_replace(folder: Path) -> bool:
    """Whether this system refuses to replace a file with the read-only attribute (Windows does; see below)."""
    target, source = folder / "read-only probe", folder / "replacement probe"
    target.write_bytes(b"old")
    source.write_bytes(b"new")
    os.chmod(target, stat.S_IREAD)
    try:
        os.replace(source, target)
        return False
    except PermissionError:
        return True
    finally:
        for path in (target, source):
            if path.exists():
                os.chmod(path, stat.S_IREAD | stat.S_IWRITE)
                path.unlink()


def test_a_snapshot_marked_read_only_is_named_as_such(project: Path, tmp_path: Path):
    if not _read_only_stops_a_replace(tmp_path):
        pytest.skip("the read-only attribute does not stop a replace here (Wine 8.0 gap, run as root)")
    snapshot = prefixed(project)
    os.chmod(snapshot, stat.S_IREAD)  # Windows: the read-only attribute
    try:
        (result,) = migrate_project(project, method="rewrite", check_model=False).results
    finally:
        os.chmod(snapshot, stat.S_IREAD | stat.S_IWRITE)
    assert result.status.value == "failed", result.describe()
    assert "the file is marked read-only" in result.reason and "attrib -r" in result.reason, result.reason


def test_windows_codes_are_worded_for_windows_users():
    """The codes Python maps to EACCES, ENOENT or EINVAL, as Windows raises them (errno derived from winerror)."""
    sharing = OSError(None, "The process cannot access the file", "C:\\p\\snapshot-005.pt", 32)
    assert isinstance(sharing, PermissionError)
    assert fserrors.meaning(sharing)[0].startswith("another program is using the file (a sharing violation)")
    long_name = "C:\\" + "\\".join(["a" * 50] * 6) + "\\snapshot-005.pt"
    too_long = OSError(None, "The filename or extension is too long", long_name, 206)
    what, advice = fserrors.meaning(too_long)
    assert what.startswith("the path is longer than Windows allows") and "LongPathsEnabled" in advice
    short = OSError(None, "The system cannot find the path specified", "C:\\p\\x.pt", 3)
    assert fserrors.meaning(short)[0] == "The system cannot find the path specified"  # not a long-path case
