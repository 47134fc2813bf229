"""Projects made by DeepLabCut's own pre-releases, rescued for the DeepLabCut installed here.

``tests/data/vintage/<release>.tar.xz`` are tiny projects each pre-release made and trained
with its own ``apis.train.train(gpus=[0, 1])`` and the torch and numpy of its day
(``scripts/make_vintage_fixtures.py``; storages zeroed, pickles byte for byte):

- rc2 (torch 2.3.1, numpy 1.26): ``module.`` keys, and numpy-1 float64 metrics a numpy-2
  DeepLabCut refuses before it even sees the keys;
- rc5 (torch 2.4.1): ``module.`` keys and optimizer state (a pickle too large to append);
- rc6: clean (it saved ``model.module``), with optimizer and scheduler state.

One ``dlc-snapshot-fix PROJECT`` must leave every snapshot ``evaluate_network`` can use;
``--check`` before must say exactly what the run then does; restore gives back every byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import deeplabcut
import numpy as np
import pytest

pytestmark = pytest.mark.deeplabcut
VINTAGE = Path(__file__).parent / "data" / "vintage"
RELEASES = ("rc2", "rc5", "rc6")


def cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def unpacked(release: str, destination: Path) -> Path:
    with tarfile.open(VINTAGE / f"{release}.tar.xz") as archive:
        archive.extractall(destination, filter="data")
    return destination / f"vintage-{release}"


def evaluate(project: Path) -> None:
    deeplabcut.evaluate_network(str(project / "config.yaml"), Shuffles=[1], snapshotindex="all")


def snapshot_bytes(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(project.rglob("snapshot-*.pt"))}


def rows(path: Path) -> dict[str, dict]:
    return {Path(row["path"]).name: row for row in json.loads(path.read_text())["snapshots"]}


def prediction(row: dict) -> tuple:
    """What a check says a run will do to one snapshot, and what a run says it did, in the same terms."""
    status = {"needs fix": "fixed"}.get(row["status"], row["status"])
    verdicts = {entry: check["status"] for entry, check in row["model_check"].items()}
    return status, row["method"] if row["changes"] else None, row["changes"], verdicts


def numpy_refusal_expected(release: str) -> bool:
    """rc2 pickled its metrics under numpy 1.x's names: a numpy-2 DeepLabCut refuses them."""
    return release == "rc2" and int(np.__version__.split(".")[0]) >= 2


@pytest.mark.parametrize("release", RELEASES)
def test_one_command_leaves_every_vintage_snapshot_evaluable(release: str, tmp_path: Path):
    project = unpacked(release, tmp_path)
    originals = snapshot_bytes(project)
    assert len(originals) == 2
    made_by = (project / "MADE_BY.txt").read_text()
    assert made_by.startswith(f"deeplabcut 3.0.0{release},"), made_by

    if release == "rc6":
        evaluate(project)  # DeepLabCut loads what rc6 saved: the tool must leave it alone
    elif numpy_refusal_expected(release):
        with pytest.raises(Exception, match=r"numpy\.core\.multiarray\.scalar"):
            evaluate(project)
    else:
        with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*Unexpected key\(s\).*\"module\.backbone"):
            evaluate(project)

    check = cli(project, "--check", "--json", tmp_path / "check.json")
    assert check.returncode == (0 if release == "rc6" else 1), check.stdout + check.stderr
    run = cli(project, "--json", tmp_path / "run.json")
    assert run.returncode == 0, run.stdout + run.stderr
    predicted, done = rows(tmp_path / "check.json"), rows(tmp_path / "run.json")
    assert {name: prediction(row) for name, row in predicted.items()} == {
        name: prediction(row) for name, row in done.items()
    }
    assert all(check["status"] == "ok" for row in done.values() for check in row["model_check"].values())
    if release == "rc6":
        assert {row["status"] for row in done.values()} == {"already clean"}
        assert snapshot_bytes(project) == originals
    else:
        assert {row["status"] for row in done.values()} == {"fixed"}
        cured = "numpy scalar(s) in 'metadata' made plain numbers"
        assert all(any(cured in c for c in row["changes"]) == numpy_refusal_expected(release) for row in done.values())
        assert f"summary: {len(originals)} fixed" in run.stdout

    if release != "rc6":  # (rc6's bytes are what DeepLabCut evaluated above)
        evaluate(project)
    assert list(project.glob("evaluation-results-pytorch/iteration-0/*/*-results.csv"))

    migrated = snapshot_bytes(project)
    assert cli(project).returncode == 0
    assert snapshot_bytes(project) == migrated, "a second run changed a snapshot"
    if release != "rc6":
        restored = cli("restore", project)
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert snapshot_bytes(project) == originals


@pytest.mark.parametrize("release", RELEASES)
def test_check_predicts_the_archive_method_on_every_vintage(release: str, tmp_path: Path):
    """Under ``--method append`` too: rc5's optimizer state is too large to append, and --check says so first.
    (DeepLabCut's verdicts on these files are the test above's; here the method and the changes.)"""
    project = unpacked(release, tmp_path)
    originals = snapshot_bytes(project)
    cli(project, "--check", "--method", "append", "--no-model-check", "--json", tmp_path / "check.json")
    run = cli(project, "--method", "append", "--no-model-check", "--json", tmp_path / "run.json")
    assert run.returncode == 0, run.stdout + run.stderr
    predicted, done = rows(tmp_path / "check.json"), rows(tmp_path / "run.json")
    assert {name: prediction(row) for name, row in predicted.items()} == {
        name: prediction(row) for name, row in done.items()
    }
    methods = {row["method"] for row in done.values() if row["changes"]}
    assert methods == {"rc2": {"append"}, "rc5": {"rewrite"}, "rc6": set()}[release], done
    assert cli("restore", project).returncode == 0
    assert snapshot_bytes(project) == originals
