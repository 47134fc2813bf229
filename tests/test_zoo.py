"""Every architecture DeepLabCut trains, through every path, with DeepLabCut the judge.

The zoo (tests/zoo.py) holds, for each architecture family DeepLabCut 3.0.x offers, a
snapshot as a multi-GPU or compiled run saved it, built by the real DeepLabCut from its
own configs; top-down members carry a detector snapshot too. Before: DeepLabCut refuses
each. After one run: its loader and a strict load into the model (or detector) each
``pytorch_config.yaml`` builds accept each, tensors bit-identical; ``--check`` predicted
the method each got; a second run changes no byte; restore gives back every original.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo
from deeplabcut.core.config import read_config_as_dict
from deeplabcut.pose_estimation_pytorch.runners.base import attempt_snapshot_load

from dlc_snapshot_fix import load_snapshot, migrate_project, restore_project
from dlc_snapshot_fix.verify import build_detector, build_pose_model

pytestmark = pytest.mark.deeplabcut
WRAPPERS = ("module.", "_orig_mod.")
_models: dict[tuple[str, bool], torch.nn.Module] = {}


def cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def deeplabcut_refusal(path: Path, member: zoo.Member) -> str | None:
    """``None`` if DeepLabCut loads ``path`` (its loader, then a strict load into what its config builds)."""
    detector = "detector" in path.name
    key = (member.name, detector)
    if key not in _models:
        config = read_config_as_dict(str(path.parent / "pytorch_config.yaml"))
        _models[key] = build_detector(config["detector"]["model"]) if detector else build_pose_model(config["model"])
    try:
        snapshot = attempt_snapshot_load(path, "cpu")
        _models[key].load_state_dict(snapshot["model"], strict=True)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def stripped(key: str) -> str:
    """A key without its wrapper prefixes, removed only at the start, repeatedly (stacked wrappers)."""
    while key.startswith(WRAPPERS):
        key = key.removeprefix("module.") if key.startswith("module.") else key.removeprefix("_orig_mod.")
    return key


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(original: Path, migrated: Path) -> None:
    """Every tensor of the original is in the migrated file under its stripped key, bit for bit."""
    before, after = load_snapshot(original)["model"], load_snapshot(migrated)["model"]
    assert list(after) == [stripped(k) for k in before], migrated
    for key, tensor in before.items():
        other = after[stripped(key)]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, key
        assert torch.equal(as_bytes(other), as_bytes(tensor)), key


def file_states(root: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``root`` (manifests, lock files and backups included): its sha256 and mtime."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cached_zoo() -> Path:
    return zoo.cached_zoo()


def test_deeplabcut_refuses_every_zoo_snapshot_as_saved(cached_zoo: Path):
    """The population is what the tool exists for: every snapshot fails in DeepLabCut as it stands."""
    snapshots = zoo.snapshots(cached_zoo)
    assert len(snapshots) == zoo.SNAPSHOT_COUNT and {m.name for m in snapshots.values()} == {
        m.name for m in zoo.MEMBERS
    }
    for path, member in snapshots.items():
        refusal = deeplabcut_refusal(path, member)
        assert refusal is not None and "Unexpected key(s)" in refusal, (member.name, path.name, refusal[:300])
        assert any(f'"{prefix}' in refusal for prefix in WRAPPERS), refusal


def test_every_zoo_model_migrates_in_one_project(cached_zoo: Path, tmp_path: Path):
    """The project default, the rewrite (the archive default's append is the mixed-archive test's)."""
    method = "rewrite"
    root = zoo.copy_zoo(tmp_path / "zoo")
    snapshots = zoo.snapshots(root)
    for project in (root / name for name in zoo.PROJECTS.values()):
        check = migrate_project(project, write=False, method=method)
        predicted = {r.path: r.method for r in check.results}
        assert {r.status.value for r in check.results} == {"needs fix"} and all(r.ok for r in check.results), [
            r.describe() for r in check.results if not r.ok
        ]
        report = migrate_project(project, method=method)
        assert report.exit_code() == 0, [r.describe() for r in report.results if not r.ok]
        for result in report.results:
            assert result.status.value == "fixed", result.describe()
            assert result.method == predicted[result.path], (result.path, result.method, predicted[result.path])
            assert all(check.status == "ok" for check in result.model_checks.values()), result.describe()
            assert result.model_checks, f"{result.path}: DeepLabCut was not asked"
        assert {r.method for r in report.results} == {"rewrite"}
        assert migrate_project(project, write=False).exit_code(check=True) == 0

    for path, member in snapshots.items():
        assert deeplabcut_refusal(path, member) is None, (member.name, path.name)
        assert_same_tensors(cached_zoo / path.relative_to(root), path)
    coam = load_snapshot(zoo.pose_snapshot(root, next(m for m in zoo.MEMBERS if m.name == "ctd_coam_w32")))["model"]
    assert sum("channel_attention_module." in k for k in coam) > 0  # inner 'module.' names kept
    for member in zoo.MEMBERS:
        if (detector := zoo.detector_snapshot(root, member)) is not None:
            assert all(k.startswith("model.") for k in load_snapshot(detector)["model"])  # torchvision's own prefix

    before = file_states(root)
    for project in (root / name for name in zoo.PROJECTS.values()):
        again = migrate_project(project, method=method)
        assert {r.status.value for r in again.results} == {"already clean"}
    assert file_states(root) == before, "a second run changed a file"

    for project in (root / name for name in zoo.PROJECTS.values()):
        restored = restore_project(project)
        assert {r.status.value for r in restored.results} == {"restored"}, [r.describe() for r in restored.results]
    for path in snapshots:
        assert path.read_bytes() == (cached_zoo / path.relative_to(root)).read_bytes(), path


def test_a_mixed_archive_of_every_model_migrates_with_two_jobs(cached_zoo: Path, tmp_path: Path):
    """The archive default (append where it keeps its promise, the copy-speed rewrite elsewhere), --jobs 2."""
    root = zoo.copy_zoo(tmp_path / "archive")
    check = cli("migrate", root, "--check", "--jobs", "2", "--json", tmp_path / "check.json")
    assert check.returncode == 1, check.stdout + check.stderr
    predicted = {row["path"]: row["method"] for row in json.loads((tmp_path / "check.json").read_text())["snapshots"]}
    assert len(predicted) == zoo.SNAPSHOT_COUNT and set(predicted.values()) == {"append", "rewrite"}

    done = cli("migrate", root, "--jobs", "2", "--json", tmp_path / "migrate.json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "migrate.json").read_text())["snapshots"]
    assert {row["status"] for row in rows} == {"fixed"}, [row for row in rows if row["status"] != "fixed"]
    assert {row["path"]: row["method"] for row in rows} == predicted
    appended = sum(method == "append" for method in predicted.values())
    total = zoo.SNAPSHOT_COUNT
    assert (
        f"{total} fixed ({appended} by append, {total - appended} by rewrite)" in done.stdout
    )  # said where the user looks
    assert all(
        "too large to append safely" in row["reason"] or "only torch" in row["reason"]
        for row in rows
        if row["method"] == "rewrite"
    )
    for path, member in zoo.snapshots(root).items():
        assert deeplabcut_refusal(path, member) is None, (member.name, path.name)
        assert_same_tensors(cached_zoo / path.relative_to(root), path)

    before = file_states(root)
    again = cli("migrate", root, "--jobs", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert file_states(root) == before, "a second run changed a file"
    assert cli("migrate", root, "--check").returncode == 0

    for name in zoo.PROJECTS.values():
        assert cli("restore", root / name).returncode == 0
    for path in zoo.snapshots(root):
        assert path.read_bytes() == (cached_zoo / path.relative_to(root)).read_bytes(), path


def test_the_plugin_loads_every_zoo_snapshot_on_each_load_path(cached_zoo: Path, seeded_torch_hub: Path):
    """DeepLabCut's snapshot loader (evaluate, analyze, resume) and ``weight_init`` (``PoseModel.build`` and
    ``DETECTORS.build`` read the file with ``torch.load``): refused as saved, loaded with the plugin, tensors
    bit-identical, no file changed. Detectors are built by DeepLabCut as for a user (Faster R-CNN's ImageNet
    backbone from a seeded torch hub cache)."""
    from deeplabcut.core.weight_init import WeightInitialization
    from deeplabcut.pose_estimation_pytorch.models import PoseModel
    from deeplabcut.pose_estimation_pytorch.models.detectors import DETECTORS
    from deeplabcut.pose_estimation_pytorch.runners import base

    from dlc_snapshot_fix import plugin

    before = file_states(cached_zoo)
    for path, member in zoo.snapshots(cached_zoo).items():
        detector = "detector" in path.name
        config = read_config_as_dict(str(path.parent / "pytorch_config.yaml"))
        expected = {stripped(key): tensor for key, tensor in load_snapshot(path)["model"].items()}
        if detector:
            init = WeightInitialization(snapshot_path=None, detector_snapshot_path=path)

            def build(config=config, init=init):
                detector_config = copy.deepcopy(config["detector"]["model"])
                return DETECTORS.build(detector_config, weight_init=init, pretrained=False)
        else:
            init = WeightInitialization(snapshot_path=path, with_decoder=False)

            def build(config=config, init=init):
                return PoseModel.build(copy.deepcopy(config["model"]), weight_init=init, pretrained_backbone=False)

        with pytest.raises(RuntimeError, match=r"Missing key\(s\)|Unexpected key\(s\)"):
            build()
        plugin._warned.clear()
        with plugin.enabled(), pytest.warns(plugin.PrefixedSnapshotWarning):
            loaded = base.attempt_snapshot_load(path, "cpu")["model"]
            built = build().state_dict()
        deeplabcut_refusal(path, member)  # builds (and caches) the model DeepLabCut's inference builds
        model = _models[(member.name, detector)]
        model.load_state_dict(loaded, strict=True)
        assert list(loaded) == list(expected), (member.name, path.name)
        for key, tensor in expected.items():
            assert torch.equal(as_bytes(loaded[key]), as_bytes(tensor)), (member.name, key)
        initialised = [key for key in built if key.startswith(("backbone.", "model.backbone."))]
        assert initialised, (member.name, path.name, list(built)[:3])
        for key in initialised:
            assert torch.equal(as_bytes(built[key]), as_bytes(expected[key])), (member.name, key)
    assert file_states(cached_zoo) == before, "loading changed a file"


def test_inspect_and_adapt_every_zoo_model_for_a_third_bodypart(cached_zoo: Path, tmp_path: Path):
    """``inspect`` names each snapshot's wrappers (detectors too) and that it fits once stripped. Reused for a
    project with a third bodypart: where only the heads depend on the bodyparts, ``inspect --against`` says so
    and ``adapt`` re-initialises only them; where parts outside do (AnimalTokenPose's keypoint tokens, CTD's
    conditioning layers), both say that, not "another network", and ``--allow-non-head`` adapts. DeepLabCut
    loads every result strictly into the three-bodypart model; every tensor kept is bit-identical."""
    from dlc_snapshot_fix.adapt import AdaptRefusedError, adapt_snapshot
    from dlc_snapshot_fix.diagnose import diagnose

    snapshots = zoo.snapshots(cached_zoo)
    diagnoses = {d.path: d for name in zoo.PROJECTS.values() for d in diagnose(cached_zoo / name)}
    assert set(diagnoses) == set(snapshots)
    for path, member in snapshots.items():
        found = diagnoses[path]
        assert found.prefixes == tuple({"dp": "module.", "compile": "_orig_mod."}[w] for w in member.wrappers)
        assert found.model_check is not None and found.model_check.status == "ok", (path, found.render())
        assert found.fix is not None and found.fix.startswith("dlc-snapshot-fix PROJECT"), found.render()

    for member in zoo.MEMBERS:
        target = zoo.pytorch_config_with_another_bodypart(cached_zoo, member, tmp_path / member.name)
        source, output = zoo.pose_snapshot(cached_zoo, member), tmp_path / f"{member.name}.pt"
        resized = member.net_type.startswith(("animaltokenpose", "ctd_"))
        against = diagnose(source, against=target)[0]
        assert "different network" not in against.cause, (member.name, against.cause)
        if resized:
            assert "The network is the same" in against.cause and "--allow-non-head" in (against.fix or "")
            with pytest.raises(AdaptRefusedError, match="parts sized by the bodyparts"):
                adapt_snapshot(source, target, output)
            assert not output.exists()
        else:
            assert "Only the head" in against.cause, (member.name, against.cause)
        plan = adapt_snapshot(source, target, output, allow_non_head=resized)
        assert plan.reinitialised and (resized or all(k.startswith("heads.") for k in plan.reinitialised))
        assert resized == bool(plan.resized_outside_heads), (member.name, plan.resized_outside_heads)

        model = build_pose_model(read_config_as_dict(str(target))["model"])
        model.load_state_dict(attempt_snapshot_load(output, "cpu")["model"], strict=True)
        original = {stripped(k): t for k, t in load_snapshot(source)["model"].items()}
        adapted = load_snapshot(output)["model"]
        for key in plan.kept:
            assert torch.equal(as_bytes(adapted[key]), as_bytes(original[key])), (member.name, key)
