"""Both numpy worlds: rc5 metrics pickled by numpy 1.x and by numpy 2.x, read in whichever runtime runs this.

The fixtures in tests/data were written by the real numpy 1.26 and numpy 2.4
(scripts/make_numpy_fixtures.py), not edited by hand.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
from conftest import TRAIN

from dlc_snapshot_fix import load_snapshot, migrate_project, pickled, restore_project, zipappend
from dlc_snapshot_fix.reading import NUMPY_SCALAR_NAMES, numpy_scalar_globals

DATA = Path(__file__).parent / "data"
FIXTURES = {"numpy 1.x": DATA / "rc5-metrics-numpy1.pt", "numpy 2.x": DATA / "rc5-metrics-numpy2.pt"}


def pickle_of(path: Path) -> bytes:
    layout = zipappend.read_layout(path)
    return zipappend.read_member(path, layout, layout.pickle_record())


@pytest.mark.parametrize("dialect", FIXTURES)
def test_each_numpy_dialect_is_what_its_numpy_wrote_and_loads_here(dialect: str):
    path = FIXTURES[dialect]
    assert pickled.numpy_dialect(pickle_of(path)) == dialect
    metrics = load_snapshot(path)["metadata"]["metrics"]
    assert {k: float(v) for k, v in metrics.items()} == {"test.rmse": 3.25, "test.mAP": 0.5}


def test_the_allow_list_names_only_what_this_numpy_has():
    """Built from names, each of which must resolve in every numpy of the matrix (this runtime is one)."""
    for entry in numpy_scalar_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        module, _, attribute = name.rpartition(".")
        if name in NUMPY_SCALAR_NAMES:  # matched by name: the object must be numpy's own scalar reconstructor
            assert obj is importlib.import_module("numpy._core.multiarray").scalar, name
            continue
        assert getattr(importlib.import_module(module), attribute) is obj, name


@pytest.mark.parametrize("method", ["rewrite", "append"])
@pytest.mark.parametrize("dialect", FIXTURES)
def test_either_dialect_migrates_and_restores(project: Path, dialect: str, method: str):
    path = project / TRAIN / "snapshot-005.pt"
    shutil.copyfile(FIXTURES[dialect], path)
    original = path.read_bytes()
    report = migrate_project(project, method=method, check_model=False)
    result = report.results[0]
    assert result.status.value == "fixed" and result.ok, result.describe()
    migrated = load_snapshot(path)
    assert not any(k.startswith("module.") for k in migrated["model"])
    import numpy as np

    runtime = f"numpy {np.__version__.split('.')[0]}.x"
    if dialect == runtime:  # DeepLabCut running with this numpy reads them: left, with a note
        assert result.notes and "numpy value(s) (float64)" in result.notes[0]
        assert pickled.numpy_dialect(pickle_of(path)) == runtime
    else:  # DeepLabCut here refuses the other numpy's names: the same numbers, plain, by default
        assert any(f"pickled under {dialect}'s names" in change for change in result.changes), result.changes
        assert not result.notes and pickled.numpy_dialect(pickle_of(path)) is None
        original_metrics = {k: float(v) for k, v in load_snapshot(FIXTURES[dialect])["metadata"]["metrics"].items()}
        assert migrated["metadata"]["metrics"] == original_metrics
        assert all(type(v) is float for v in migrated["metadata"]["metrics"].values())
    del migrated  # its tensors map the file: Windows refuses to replace a file a process maps
    restore_project(project)
    assert path.read_bytes() == original


def test_reading_leaves_torchs_allow_list_as_it_found_it(tmp_path: Path):
    """DeepLabCut registers numpy.dtype (and more) at import; a load of ours must not take it away again."""
    import numpy as np
    import torch

    original = list(torch.serialization.get_safe_globals())  # as this process has it (DeepLabCut's, if imported)
    torch.serialization.add_safe_globals([np.dtype])  # what DeepLabCut's runners.base adds, among others
    before = set(torch.serialization.get_safe_globals())
    try:
        load_snapshot(FIXTURES["numpy 2.x"])
        assert set(torch.serialization.get_safe_globals()) == before
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(original)
