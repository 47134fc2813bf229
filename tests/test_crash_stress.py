"""A small sample of the crash stress script in CI (the 200-trial runs are in the issue note)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "crash_stress.py"


@pytest.mark.parametrize("keys", [9, 1900], ids=["resnet-sized pickle", "hrnet-sized pickle"])
@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, method: str, keys: int):
    """An HRNet-sized data.pkl (~0.3 MB, 1,900 keys) takes the rewrite even under --method append: killed too."""
    arguments = ["--trials", "5", "--seed", "7", "--projects", "2", "--size-mb", "2", "--method", method]
    arguments += ["--keys", str(keys)]
    completed = subprocess.run(
        [sys.executable, SCRIPT, *arguments, "--workdir", tmp_path],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "lost or corrupted: 0 of 5 trials" in completed.stdout
    killed = int(completed.stdout.split("killed mid-run: ")[1].split(",")[0])
    assert killed >= 1  # at least one kill landed while the migration was running
