"""The fence around each snapshot: an error nobody expected is that file's failure, and the run goes on.

The error is injected (the odd files that cause real ones are in test_odd_files and
test_fuzz); what is checked is what the user sees: the file named, whether it was
changed, no traceback unless ``--debug``, the other snapshots migrated, exit 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot, migrate, transforms
from dlc_snapshot_fix.cli import main


@pytest.fixture
def two(project: Path) -> tuple[Path, Path]:
    first = save_snapshot(project / TRAIN / "snapshot-001.pt", wrapped_state_dict(TinyPose(), "dp"))
    second = save_snapshot(
        project / TRAIN / "snapshot-002.pt", wrapped_state_dict(TinyPose(), "dp"), metadata={"epoch": 2}
    )
    return first, second


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_error_fails_that_file_only(project: Path, two, monkeypatch: pytest.MonkeyPatch, debug: bool):
    first, second = two
    before = second.read_bytes()
    real = transforms.numpy_values

    def numpy_values(snapshot):
        if snapshot["metadata"]["epoch"] == 2:  # the second snapshot only
            raise RuntimeError("boom")
        return real(snapshot)

    monkeypatch.setattr(transforms, "numpy_values", numpy_values)
    result = CliRunner().invoke(main, [str(project), "--no-model-check", *(["--debug"] if debug else [])])
    assert result.exit_code == 3, result.output
    assert "snapshot-002.pt" in result.output
    assert "cannot be handled (RuntimeError: boom); the file is left as it is" in result.output
    assert ("Traceback" in result.output) is debug  # CliRunner mixes stderr into output
    assert second.read_bytes() == before
    assert not any(k.startswith("module.") for k in load_snapshot(first)["model"])


def test_an_error_after_the_file_changed_says_so(project: Path, two, monkeypatch: pytest.MonkeyPatch):
    first, _ = two
    original = first.read_bytes()

    def judge(*args, **kwargs):
        raise RuntimeError("late")

    monkeypatch.setattr(migrate.verify, "judge_numpy_values", judge)
    result = CliRunner().invoke(main, [str(project), "--no-model-check"])
    assert result.exit_code == 3
    assert "changed, then RuntimeError: late was raised" in result.output
    assert "restore PROJECT` puts it back" in result.output
    restored = CliRunner().invoke(main, ["restore", str(project)])
    assert restored.exit_code == 0 and "restored" in restored.output
    assert first.read_bytes() == original
