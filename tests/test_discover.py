"""Discovery over a project tree with every kind of model folder DeepLabCut makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import SYMLINKS_WORK, needs_symlinks

from dlc_snapshot_fix import ProjectError, discover, discover_project


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_yaml(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write_yaml(root / "config.yaml", {"Task": "t", "project_path": str(root), "iteration": 1})
    shuffle1 = root / "dlc-models-pytorch/iteration-0/tNov22-trainset95shuffle1/train"
    shuffle2 = root / "dlc-models-pytorch/iteration-1/tNov22-trainset80shuffle2/train"
    prefixed = root / "experiments/run-a/dlc-models-pytorch/iteration-0/tNov22-trainset95shuffle1/train"
    custom = root / "dlc-models-pytorch/iteration-1/tNov22-trainset80shuffle3/train"
    for folder in (shuffle1, shuffle2, prefixed):
        write_yaml(folder / "pytorch_config.yaml", {"method": "bu"})
    write_yaml(
        custom / "pytorch_config.yaml",
        {"method": "td", "runner": {"snapshot_prefix": "rtm"}, "detector": {"runner": {"snapshot_prefix": "det"}}},
    )
    for path in (
        shuffle1 / "snapshot-010.pt",
        shuffle1 / "snapshot-best-020.pt",
        shuffle1 / "snapshot-best.pt",  # legacy, 3.0.0rc5 and older
        shuffle1 / "notes.pt",  # not DeepLabCut's
        shuffle1 / ".snapshot-010.pt.abcd.tmp",  # a temp file of ours
        shuffle2 / "snapshot-005.pt",
        shuffle2 / "snapshot-detector-005.pt",
        shuffle2 / "snapshot-detector-best-007.pt",
        custom / "rtm-001.pt",
        custom / "det-best-002.pt",
        prefixed / "snapshot-100.pt",
        root / "exported-models-pytorch/DLC_t_resnet50_iteration-0_shuffle-1/DLC_t_resnet50_snapshot-020.pt",
        root / "dlc-models/iteration-0/tNov22-trainset95shuffle1/train/snapshot-1000.index",
    ):
        touch(path)
    (shuffle2 / "snapshot-999.pt").mkdir()  # a folder named like a snapshot
    if SYMLINKS_WORK:
        (shuffle2 / "snapshot-998.pt").symlink_to(shuffle2 / "snapshot-005.pt")
    return root


def test_finds_every_snapshot_with_its_role_and_config(tree: Path):
    inventory = discover_project(tree)
    found = {s.path.relative_to(tree).as_posix(): s for s in inventory.snapshots}
    roles = {
        name.split("/train/")[-1] if "/train/" in name else name.split("/")[-1]: s.role for name, s in found.items()
    }
    assert roles == {
        "snapshot-010.pt": "pose",
        "snapshot-best-020.pt": "pose",
        "snapshot-best.pt": "pose",
        "snapshot-005.pt": "pose",
        "snapshot-detector-005.pt": "detector",
        "snapshot-detector-best-007.pt": "detector",
        "rtm-001.pt": "pose",
        "det-best-002.pt": "detector",
        "snapshot-100.pt": "pose",
        "DLC_t_resnet50_snapshot-020.pt": "exported",
    }
    model_prefixed = found[
        "experiments/run-a/dlc-models-pytorch/iteration-0/tNov22-trainset95shuffle1/train/snapshot-100.pt"
    ]
    assert model_prefixed.pytorch_config == model_prefixed.path.parent / "pytorch_config.yaml"
    exported = next(s for s in inventory.snapshots if s.role == "exported")
    assert exported.state_dict_entries == ("pose", "detector")
    assert exported.pytorch_config is None


def test_reports_what_it_passes_over(tree: Path):
    inventory = discover_project(tree)
    skipped = {s.path.name: s.reason for s in inventory.skipped}
    problems = {s.path.name for s in inventory.skipped if s.problem}
    assert "TensorFlow" in skipped["tNov22-trainset95shuffle1"]
    assert "not named like a DeepLabCut snapshot" in skipped["notes.pt"]
    assert "not a file: DeepLabCut will try to load it" in skipped["snapshot-999.pt"]
    assert problems == {"snapshot-999.pt"}  # only the folder would make DeepLabCut fail
    assert ".snapshot-010.pt.abcd.tmp" not in skipped
    assert len(inventory.model_folders) == 5  # four train/ folders and one exported-model folder


@needs_symlinks
def test_a_symbolic_link_named_like_a_snapshot_is_passed_over(tree: Path):
    skipped = {s.path.name: s for s in discover_project(tree).skipped}
    assert "symbolic link to" in skipped["snapshot-998.pt"].reason and not skipped["snapshot-998.pt"].problem


def test_accepts_the_config_file_and_reads_without_writing(tree: Path):
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*.yaml")}
    assert discover_project(tree / "config.yaml").project == tree
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*.yaml")} == before


def test_project_path_elsewhere_is_a_warning_not_an_error(tree: Path):
    write_yaml(tree / "config.yaml", {"Task": "t", "project_path": "/somewhere/else"})
    inventory = discover_project(tree)
    assert any("/somewhere/else" in w for w in inventory.warnings)
    assert inventory.snapshots


def test_missing_or_malformed_config_is_a_clear_error(tmp_path: Path, tree: Path):
    with pytest.raises(ProjectError, match=r"no config\.yaml"):
        discover_project(tmp_path / "nothing-here")
    (tree / "config.yaml").write_text("Task: [unclosed\n")
    inventory = discover_project(tree)  # a problem to report, but the snapshots are still found
    assert any("config.yaml: not valid YAML" in p for p in inventory.problems)
    assert inventory.snapshots


def test_malformed_pytorch_config_falls_back_to_default_names(tree: Path):
    config = tree / "dlc-models-pytorch/iteration-0/tNov22-trainset95shuffle1/train/pytorch_config.yaml"
    config.write_text("runner: {snapshot_prefix: [\n")
    inventory = discover_project(tree)
    assert any(str(config) in p for p in inventory.problems)
    assert any(s.path.name == "snapshot-010.pt" and s.pytorch_config is None for s in inventory.snapshots)


def test_a_malformed_yaml_file_gets_deeplabcuts_readers_message_naming_the_file(tmp_path: Path):
    """libyaml's error is not the answer: DeepLabCut's reader (ruamel.yaml) reads the file again and says why."""
    path = tmp_path / "odd.yaml"
    path.write_text("a: 1\nb: [1, 2\n", encoding="utf-8")
    with pytest.raises(ProjectError) as refused:
        discover.read_yaml(path)
    assert str(refused.value).startswith(f"{path}: not valid YAML")
    assert "expected ',' or ']', but got '<stream end>'" in str(refused.value)  # ruamel's words, not libyaml's


@pytest.mark.parametrize("runner", ["a string", ["a", "list"], 7, {"snapshot_prefix": ["odd"]}])
def test_a_pytorch_config_of_odd_shape_never_stops_discovery(tree: Path, runner):
    config = tree / "dlc-models-pytorch/iteration-0/tNov22-trainset95shuffle1/train/pytorch_config.yaml"
    write_yaml(config, {"runner": runner, "detector": runner})
    inventory = discover_project(tree)
    assert any(s.path.name == "snapshot-010.pt" for s in inventory.snapshots)
