"""Reasons worded from the errno: a full drive, a lost share and a read-only mount each get their own
sentence and advice (not "check its permissions" for all), with the system's own words kept."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import fserrors, reading, rezip
from dlc_snapshot_fix.cli import main

WORDED = ["ENOSPC", "EDQUOT", "ENOTCONN", "EIO", "ESTALE", "EROFS", "EBUSY", "EACCES", "EPERM"]


@pytest.mark.parametrize("name", WORDED)
def test_each_errno_has_its_own_sentence_and_advice(name: str):
    code = getattr(errno, name)
    what, advice = fserrors.meaning(OSError(code, os.strerror(code)))
    assert what.endswith(f"({os.strerror(code)})") and advice and "run again" in advice
    others = {fserrors.meaning(OSError(getattr(errno, n), os.strerror(getattr(errno, n)))) for n in WORDED}
    assert len(others) == len(WORDED)  # no two share a sentence


def test_an_errno_without_a_sentence_keeps_the_systems_words_and_the_callers_advice():
    error = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    assert fserrors.reason(error, "could not write", "the snapshot is unchanged", "Shorten it, then run again") == (
        f"could not write: {os.strerror(errno.ENAMETOOLONG)}; the snapshot is unchanged. Shorten it, then run again"
    )


def two_snapshots(project: Path) -> tuple[Path, Path]:
    bad = save_snapshot(project / TRAIN / "snapshot-004.pt", wrapped_state_dict(TinyPose(), "dp"))
    good = save_snapshot(project / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"))
    return bad, good


@pytest.mark.parametrize(
    ("name", "meaning", "advice"),
    [
        ("ENOTCONN", "the share is not connected", "Reconnect"),
        ("ESTALE", "the share lost track of the file (changed or moved on the server)", "Mount the share again"),
        ("EIO", "the drive or the connection to it failed", "Check the drive"),
    ],
)
def test_a_read_that_the_drive_refuses_says_why(
    project: Path, monkeypatch: pytest.MonkeyPatch, name: str, meaning: str, advice: str
):
    if not hasattr(errno, name):
        pytest.skip(f"Windows has no {name}")  # ESTALE
    code = getattr(errno, name)
    said = f"{meaning} ({os.strerror(code)}). {advice}"  # the system's own words: "Unknown error" on Windows
    bad, _ = two_snapshots(project)
    before = bad.read_bytes()
    real_open = open

    def failing_open(file, *args, **kwargs):
        if Path(file) == bad:
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(reading, "open", failing_open, raising=False)
    result = CliRunner().invoke(main, [str(project)], catch_exceptions=False)
    assert result.exit_code == 3
    assert f"cannot be read: {said}" in result.output and "permissions" not in result.output, result.output
    assert bad.read_bytes() == before and "1 fixed, 1 failed" in result.output


def test_a_write_over_quota_says_so_and_changes_nothing(project: Path, monkeypatch: pytest.MonkeyPatch):
    bad, _ = two_snapshots(project)
    before = {path: path.read_bytes() for path in (bad.parent).glob("*.pt")}

    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(rezip, "write", over_quota)
    result = CliRunner().invoke(main, [str(project), "--no-model-check"], catch_exceptions=False)
    assert result.exit_code == 3
    assert (
        f"could not write: your disk quota is used up ({os.strerror(errno.EDQUOT)}); the snapshot is unchanged. "
        "Delete some of your files or ask for a larger quota, then run again"
    ) in result.output
    assert {path: path.read_bytes() for path in (bad.parent).glob("*.pt")} == before


def test_a_share_that_refuses_the_lock_is_named_as_the_lock_not_as_a_read(
    project: Path, monkeypatch: pytest.MonkeyPatch
):
    """filelock 4.x on an SMB share (smbnetfs) failed taking the lock with EBUSY; it was reported as a read."""
    import filelock

    bad, _ = two_snapshots(project)
    before = bad.read_bytes()

    def refused(self, *args, **kwargs):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    result = CliRunner().invoke(main, [str(project), "--no-model-check"])
    assert result.exit_code == 2, result.output
    assert "cannot take the lock" in result.output and "the file or the drive is busy" in result.output
    assert "cannot be read" not in result.output and bad.read_bytes() == before


@pytest.mark.parametrize(
    ("winerror", "meaning"),
    [
        (5, "access denied: on Windows this usually means another program has the file open or mapped"),
        (32, "another program is using the file (a sharing violation)"),
        (33, "another program has locked part of the file"),
        (1224, "a program has the file memory-mapped"),
    ],
)
def test_windows_sharing_errors_name_the_other_program_not_permissions(winerror: int, meaning: str):
    """Python maps these Windows codes to EACCES (or EINVAL): the errno's advice ("permissions") would be wrong.
    Built as Windows raises them (``winerror`` set); tests/test_windows.py makes Windows itself raise them."""
    error = PermissionError(errno.EACCES, "Access is denied", "C:\\lab\\snapshot-005.pt")
    error.winerror = winerror  # what CPython sets on Windows
    what, advice = fserrors.meaning(error)
    assert what.startswith(meaning) and what.endswith("(Access is denied)")  # the system's own words kept
    assert "Close the programs that use the project" in advice and "permissions" not in advice
