"""The acceptance path, with the real DeepLabCut 3.0.2 on a copy of sample_project.

Real project → one epoch of real training from a random-init snapshot → the trained
snapshots turned into what a two-GPU 3.0.0rc5 run leaves (numbered and best) →
``evaluate_network`` raises DeepLabCut's own RuntimeError → the CLI migrates →
``evaluate_network`` succeeds → a second run changes nothing → restore gives back the
originals → ``evaluate_network`` fails again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import deeplabcut
import pytest
import torch
from conftest import HELD_LOCKS_SET_ERRNO, sample_project_copy, train_dir_of
from deeplabcut.core.config import read_config_as_dict

from dlc_snapshot_fix import load_snapshot
from dlc_snapshot_fix.testing import copy_project, load_in_memory, make_sample_project, save_like_multi_gpu_rc5
from dlc_snapshot_fix.verify import build_detector, build_pose_model

pytestmark = pytest.mark.deeplabcut


def cli(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def evaluate(config: Path) -> None:
    deeplabcut.evaluate_network(str(config), Shuffles=[1])


def snapshot_states(train_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(train_dir.glob("*.pt"))}


def test_migration_makes_evaluate_network_work_and_restore_undoes_it(multi_gpu_project: Path):
    project = multi_gpu_project
    config = project / "config.yaml"
    train_dir = next(project.glob("dlc-models-pytorch/iteration-0/*/train"))
    names = sorted(p.name for p in train_dir.glob("*.pt"))
    assert names == ["snapshot-001.pt", "snapshot-best-001.pt"]
    assert all(k.startswith("module.") for k in load_snapshot(train_dir / "snapshot-best-001.pt")["model"])
    originals = {name: (train_dir / name).read_bytes() for name in names}

    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*Unexpected key\(s\).*\"module\.backbone"):
        evaluate(config)

    migrated = cli(project)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert migrated.stdout.count("DeepLabCut: loads") == len(names)  # DeepLabCut's verdict, in a word by default
    assert f"summary: {len(names)} fixed" in migrated.stdout
    assert sorted(p.name for p in train_dir.glob("*.pt")) == names  # same names: scorers unchanged

    evaluate(config)
    results = list(project.glob("evaluation-results-pytorch/iteration-0/*/*-results.csv"))
    assert results, "evaluate_network wrote no results CSV"

    before = snapshot_states(train_dir)
    again = cli(project)
    assert again.returncode == 0
    assert f"summary: {len(names)} already clean" in again.stdout
    assert snapshot_states(train_dir) == before

    restored = cli("restore", project)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert {name: (train_dir / name).read_bytes() for name in names} == originals
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)"):
        evaluate(config)


SAMPLE = Path(__file__).parents[1] / "sample_project"


def _top_down_project(root: Path, detector_type: str = "ssdlite") -> tuple[Path, int]:
    """sample_project with a second shuffle: top-down ResNet-50 behind one of DeepLabCut's detectors."""
    project = sample_project_copy(root / "top down")
    deeplabcut.create_training_dataset(
        str(project / "config.yaml"),
        Shuffles=[2],
        net_type="top_down_resnet_50",
        detector_type=detector_type,
        engine=deeplabcut.Engine.PYTORCH,
        userfeedback=False,
    )
    return project, 2


def _multi_animal_project(root: Path) -> tuple[Path, int]:
    """A two-mouse project made by DeepLabCut (multi-animal ResNet-50 with part-affinity fields)."""
    return make_sample_project(root / "multi animal", multi_animal=True), 1


@pytest.mark.parametrize(
    "make",
    [
        _top_down_project,
        functools.partial(_top_down_project, detector_type="fasterrcnn_mobilenet_v3_large_fpn"),
        functools.partial(_top_down_project, detector_type="fasterrcnn_resnet50_fpn_v2"),
        _multi_animal_project,
    ],
    ids=["top-down", "top-down-fasterrcnn-mobilenet", "top-down-fasterrcnn-resnet50-v2", "multi-animal"],
)
def test_evaluate_network_works_after_the_one_command_on_top_down_and_multi_animal_projects(
    make, tmp_path: Path, seeded_torch_hub: Path
):
    """The pose snapshot and (top-down) the detector's, saved as a two-GPU rc5 run saved them: DeepLabCut's
    evaluate_network refuses them, one run fixes both (exit 0, DeepLabCut's verdict "loads it" for each), it
    evaluates; restore gives back every byte. Faster R-CNN is built by DeepLabCut's inference as users get it
    (ImageNet backbone weights, here from a seeded torch hub cache: FrozenBatchNorm2d in its backbone)."""
    project, shuffle = make(tmp_path)
    train_dir = next(project.glob(f"dlc-models-pytorch/iteration-0/*shuffle{shuffle}/train"))
    config = read_config_as_dict(str(train_dir / "pytorch_config.yaml"))
    torch.manual_seed(0)
    save_like_multi_gpu_rc5(train_dir / "snapshot-005.pt", build_pose_model(config["model"]), {"metadata": {}})
    if config.get("detector"):
        detector = build_detector(config["detector"]["model"])
        if hasattr(detector.model, "roi_heads"):  # Faster R-CNN, untrained, may find no animal in a frame (and
            with torch.no_grad():  # DeepLabCut's metrics fail on that) or a box too thin to crop: every anchor
                detector.model.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([-10.0, 10.0]))  # an animal,
                for deltas in (detector.model.rpn.head.bbox_pred, detector.model.roi_heads.box_predictor.bbox_pred):
                    deltas.weight.zero_()  # its box the anchor itself
                    deltas.bias.zero_()
        save_like_multi_gpu_rc5(train_dir / "snapshot-detector-005.pt", detector, {"metadata": {}})
    originals = snapshot_states(train_dir)
    assert len(originals) == (2 if config.get("detector") else 1)

    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*Unexpected key\(s\).*\"module\."):
        deeplabcut.evaluate_network(str(project / "config.yaml"), Shuffles=[shuffle])
    migrated = cli(project)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert f"summary: {len(originals)} fixed" in migrated.stdout
    assert migrated.stdout.count("DeepLabCut: loads") == len(originals)
    deeplabcut.evaluate_network(str(project / "config.yaml"), Shuffles=[shuffle])
    assert list(project.glob(f"evaluation-results-pytorch/iteration-0/*shuffle{shuffle}/*-results.csv"))
    assert cli("restore", project).returncode == 0
    assert {name: content for name, (content, _) in snapshot_states(train_dir).items()} == {
        name: content for name, (content, _) in originals.items()
    }


def test_check_mode_reports_the_real_project_without_writing(multi_gpu_project: Path):
    train_dir = next(multi_gpu_project.glob("dlc-models-pytorch/iteration-0/*/train"))
    before = snapshot_states(train_dir)
    checked = cli(multi_gpu_project, "--check")
    assert checked.returncode == 1
    assert "would be stripped 'module.'" in checked.stdout
    assert snapshot_states(train_dir) == before


def test_a_head_of_the_wrong_shape_is_explained_by_module(multi_gpu_project: Path):
    """Item 6 of the core issue: the model check names what does not fit, grouped by module."""
    train_dir = next(multi_gpu_project.glob("dlc-models-pytorch/iteration-0/*/train"))
    path = train_dir / "snapshot-001.pt"
    snapshot = load_in_memory(path)  # not mapped: the file is replaced below
    model_sd = dict(snapshot["model"])
    head_keys = [k for k in model_sd if k.startswith("module.heads.bodypart.heatmap_head")]
    for key in head_keys:  # a head trained for one more bodypart
        tensor = model_sd[key]
        model_sd[key] = torch.cat([tensor, tensor[:1]]) if tensor.ndim and tensor.shape[0] == 2 else tensor
    partial = path.with_name("partial")  # never truncate a file that is memory-mapped (SIGBUS)
    torch.save({**snapshot, "model": model_sd}, partial)
    os.replace(partial, path)

    migrated = cli(multi_gpu_project, "--json", "-")
    assert migrated.returncode == 3
    report = json.loads(migrated.stdout)
    by_name = {Path(s["path"]).name: s for s in report["snapshots"]}
    check = by_name["snapshot-001.pt"]["model_check"]["model"]
    assert check["status"] == "mismatch"
    assert any(m["key"].startswith("heads.bodypart.heatmap_head") for m in check["shape_mismatches"])
    assert by_name["snapshot-001.pt"]["status"] == "fixed"  # the prefix was still worth removing
    assert by_name["snapshot-best-001.pt"]["model_check"]["model"]["status"] == "ok"


@contextlib.contextmanager
def tmpfs(folder: Path, size_bytes: int) -> Iterator[Callable[[int], None]]:
    """A small RAM file system at ``folder``; yields a function that resizes it."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", folder], check=True)

    def resize(new_size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", folder], check=True)

    try:
        yield resize
    finally:
        gc.collect()  # drop memory maps of files on it
        subprocess.run(["umount", "--lazy", folder], check=True)


@pytest.mark.skipif(  # no geteuid on Windows: asked only on Linux
    sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux and root to mount a small tmpfs"
)
def test_a_full_disk_mid_run_leaves_every_snapshot_loadable_and_the_run_resumable(
    multi_gpu_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from dlc_snapshot_fix import migrate_project, store

    used = sum(p.stat().st_size for p in multi_gpu_project.rglob("*") if p.is_file())
    snapshot_size = (train_dir_of(multi_gpu_project) / "snapshot-001.pt").stat().st_size
    with tmpfs(tmp_path / "disk", used + snapshot_size // 2) as resize:
        project = tmp_path / "disk" / "project"
        copy_project(multi_gpu_project, project)
        train_dir = train_dir_of(project)
        originals = {p.name: p.read_bytes() for p in train_dir.glob("*.pt")}

        # 1. the disk fills up while the new file is being written (space check bypassed)
        monkeypatch.setattr(store, "ensure_space", lambda folder, size: None)
        report = migrate_project(project, check_model=False)
        monkeypatch.undo()
        assert {r.status.value for r in report.results} == {"failed"}
        assert all("No space left on device" in r.reason for r in report.results)
        assert {p.name: p.read_bytes() for p in train_dir.glob("*.pt")} == originals
        assert not [p for p in train_dir.iterdir() if p.name.endswith(".tmp")]

        # 2. the space check stops before writing, with a message saying what to do
        resize(used + snapshot_size + (12 << 20))  # room for one rewrite, not two
        checked = cli(project)
        assert checked.returncode == 3
        assert "1 fixed" in checked.stdout and "not enough space" in checked.stdout
        assert "Free some space" in checked.stdout
        for path in train_dir.glob("*.pt"):
            load_snapshot(path)  # every snapshot loads: one migrated, one original

        # 3. with room again, the rerun finishes the job and redoes nothing
        resize(used + 4 * snapshot_size)
        resumed = cli(project)
        assert resumed.returncode == 0, resumed.stdout
        assert "1 fixed, 1 already clean" in resumed.stdout
        evaluate(project / "config.yaml")
        restored = cli("restore", project)
        assert restored.returncode == 0
        assert {p.name: p.read_bytes() for p in train_dir.glob("*.pt")} == originals


def test_two_concurrent_runs_never_both_write(multi_gpu_project: Path):
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "dlc_snapshot_fix", str(multi_gpu_project), "--no-model-check"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [(run.wait(), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in outcomes)
    fixed = sum(out.count("  fixed ") for _, out, _ in outcomes)
    assert fixed == 2, outcomes  # each snapshot rewritten exactly once, by one of the two runs
    busy = [err for code, _, err in outcomes if code == 2]
    assert codes in ([0, 0], [0, 2]), outcomes  # the loser either waited its turn (found all clean) or stopped
    import filelock

    if HELD_LOCKS_SET_ERRNO or int(filelock.__version__.split(".")[0]) >= 4:
        assert all("another dlc-snapshot-fix run holds" in err for err in busy), busy
    else:  # Wine 8.0: the held lock fails with errno 0, which filelock 3.x (DeepLabCut's pin) raises as it is
        assert all("cannot take the lock" in err and "nothing was written" in err for err in busy), busy
    manifest = json.loads((multi_gpu_project / ".dlc-snapshot-fix" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 2
