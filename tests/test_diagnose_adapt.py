"""Inspect and adapt, with the real DeepLabCut 3.0.2: a 2-bodypart snapshot reused for a 3-bodypart project."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import deeplabcut
import pytest
import torch
from conftest import train_dir_of, train_one_epoch

from dlc_snapshot_fix import keys, load_snapshot
from dlc_snapshot_fix.diagnose import likely_cause
from dlc_snapshot_fix.testing import build_pose_model, copy_project
from dlc_snapshot_fix.verify import ModelCheck

pytestmark = pytest.mark.deeplabcut


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)], capture_output=True, text=True, check=False
    )


def test_likely_cause_names_the_head_and_the_bodypart_counts():
    check = ModelCheck(
        "mismatch",
        shape_mismatches=[("heads.bodypart.heatmap_head.deconv_layers.0.weight", (2048, 2, 3, 3), (2048, 3, 3, 3))],
    )
    cause, fix = likely_cause(check, ("module.",), configured_bodyparts=3)
    assert "'module.'" in cause and "heads.bodypart" in cause
    assert "trained for 2 bodyparts, this model is configured for 3" in cause
    assert fix.startswith("dlc-snapshot-fix adapt")
    backbone = ModelCheck("mismatch", missing={"backbone.model.layer4": 3})
    cause, fix = likely_cause(ModelCheck("mismatch", missing={"backbone.model.layer4.0.w": 1}), (), 3)
    assert "different network (net_type)" in cause and fix is None
    assert backbone.summary().startswith("missing keys (backbone.model.layer4: 3)")


def test_a_count_that_changed_outside_the_heads_is_told_from_another_network():
    """AnimalTokenPose's keypoint tokens and CTD CoAM's conditions (real shapes from the zoo, 2 -> 3 bodyparts)
    are the same network; HRNet-w32's widths against w48's, or a change of rank, are not."""
    tokens = [("neck.keypoint_token", (1, 2, 192), (1, 3, 192))]
    coam = [("backbone.coam.cnn_cond.weight", (2, 2, 3, 3), (3, 3, 3, 3)), ("backbone.coam.q.weight", (32, 2), (32, 3))]
    assert keys.resized_by_a_count(tokens, configured=3) and keys.resized_by_a_count(coam)
    assert not keys.resized_by_a_count(tokens, configured=4)  # not the model's bodypart count
    widths = [("backbone.stage2.0.weight", (32, 32, 3, 3), (48, 48, 3, 3)), ("backbone.stage3.0.weight", (64,), (96,))]
    assert not keys.resized_by_a_count(widths)
    assert not keys.resized_by_a_count([("neck.token", (1, 2, 192), (2, 192))])
    cause, fix = likely_cause(ModelCheck("mismatch", shape_mismatches=tokens), ("module.",), configured_bodyparts=3)
    assert "The network is the same" in cause and "neck.keypoint_token (1, 2, 192) in the snapshot" in cause
    assert fix is not None and fix.endswith("--allow-non-head")
    cause, fix = likely_cause(ModelCheck("mismatch", shape_mismatches=widths), (), configured_bodyparts=3)
    assert "different network (net_type)" in cause and fix is None


def test_inspect_adapt_and_train_a_three_bodypart_project(multi_gpu_project: Path, three_bodypart_project: Path):
    source = train_dir_of(multi_gpu_project) / "snapshot-best-001.pt"  # 2 bodyparts, DataParallel keys
    source_bytes = source.read_bytes()

    own = cli("inspect", source, "--json", "-")
    assert own.returncode == 3  # it fits its own model, but still has the wrapper prefix
    (report,) = json.loads(own.stdout)
    assert report["wrapper_prefixes"] == ["module."] and report["model_check"]["status"] == "ok"
    assert report["epoch"] == 1 and report["parameters"] > 20_000_000

    against = cli("inspect", source, "--against", three_bodypart_project)
    assert against.returncode == 3
    assert "heads.bodypart" in against.stdout
    assert "trained for 2 bodyparts, this model is configured for 3" in against.stdout
    assert "fix: dlc-snapshot-fix adapt" in against.stdout

    adapted = three_bodypart_project.parent / "adapted.pt"
    made = cli("adapt", source, "--target", three_bodypart_project, "--output", adapted)
    assert made.returncode == 0, made.stderr
    assert "re-initialised: heads.bodypart" in made.stdout
    assert source.read_bytes() == source_bytes  # the source is never modified
    result = load_snapshot(adapted)
    assert result["metadata"]["reinitialised"] and all(k.startswith("heads.") for k in result["metadata"]["dropped"])
    three_config = train_dir_of(three_bodypart_project) / "pytorch_config.yaml"
    build_pose_model(three_config).load_state_dict(result["model"], strict=True)
    original = load_snapshot(source)["model"]
    backbone_key = "backbone.model.layer4.2.conv3.weight"
    assert torch.equal(result["model"][backbone_key], original["module." + backbone_key])
    assert cli("inspect", adapted, "--against", three_config).returncode == 0

    train_one_epoch(three_bodypart_project, snapshot_path=adapted)
    trained = load_snapshot(train_dir_of(three_bodypart_project) / "snapshot-001.pt")
    assert trained["model"]["heads.bodypart.heatmap_head.deconv_layers.0.weight"].shape[1] == 3


def test_adapt_refuses_a_snapshot_of_another_net_type(trained_project: Path, tmp_path: Path):

    project = tmp_path / "project"
    copy_project(trained_project, project)
    deeplabcut.create_training_dataset(
        str(project / "config.yaml"),
        Shuffles=[2],
        net_type="resnet_101",
        engine=deeplabcut.Engine.PYTORCH,
        userfeedback=False,
    )
    (resnet101_config,) = project.glob("dlc-models-pytorch/iteration-0/*shuffle2/train/pytorch_config.yaml")
    source = tmp_path / "resnet101.pt"
    torch.save({"metadata": {"epoch": 5}, "model": build_pose_model(resnet101_config).state_dict()}, source)
    resnet50_config = next(project.glob("dlc-models-pytorch/iteration-0/*shuffle1/train/pytorch_config.yaml"))

    output = tmp_path / "adapted.pt"
    refused = cli("adapt", source, "--target", resnet50_config, "--output", output)
    assert refused.returncode == 3
    assert "outside the heads" in refused.stderr and "net_type" in refused.stderr
    assert not output.exists()
    inspected = cli("inspect", source, "--against", resnet50_config)
    assert "different network (net_type)" in inspected.stdout
