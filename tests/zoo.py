"""A model zoo: every architecture family DeepLabCut 3.0.x trains, as a multi-GPU or compiled run saved it.

Built by the real DeepLabCut from its own configs (``make_pytorch_pose_config``, the
builder ``create_training_dataset`` calls), with random weights: nothing is downloaded
(pose backbones with ``pretrained_backbone=False``, torchvision's detectors in the structure
DeepLabCut trains and infers with, FrozenBatchNorm2d included, without their ImageNet backbone
weights). Each member is one shuffle of one of two projects (single- and
multi-animal), its ``pytorch_config.yaml`` as DeepLabCut writes it, its snapshot saved
through the wrappers a user's run had (``DataParallel``/DDP: ``module.``; ``torch.compile``:
``_orig_mod.``), with rc5's numpy float64 metrics; top-down members also have a detector
snapshot. About 1.5 GB, so it is built once per DeepLabCut, torch and recipe (this file)
and copied from the cache.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import wrapped_state_dict

SAMPLE = Path(__file__).parents[1] / "sample_project"
PROJECTS = {False: "single animal", True: "multi animal"}
EPOCH = 5


@dataclass(frozen=True)
class Member:
    """One architecture as a lab's snapshot of it: its net, project kind, detector, wrappers and extras."""

    name: str
    net_type: str
    multi_animal: bool = False
    detector: str | None = None
    """Top-down: the detector type (its snapshot is saved beside the pose one)."""
    wrappers: tuple[str, ...] = ("dp",)
    """Outermost first: ``dp`` (DataParallel and DDP save ``module.``), ``compile`` (``_orig_mod.``)."""
    backbone_model_name: str | None = None
    """A custom script's backbone (``resnet50``: timm's BatchNorm ResNet-50 instead of DeepLabCut's GroupNorm one)."""
    optimizer: bool = False
    """Also save an AdamW state and scheduler, as a training run does (a far larger ``data.pkl``)."""


MEMBERS = (
    Member("resnet_50", "resnet_50"),
    Member("resnet_50_batchnorm", "resnet_50", backbone_model_name="resnet50"),
    Member("resnet_101", "resnet_101"),
    Member("hrnet_w32", "hrnet_w32"),
    Member("cspnext_s_compiled_with_optimizer", "cspnext_s", wrappers=("compile",), optimizer=True),
    Member("rtmpose_s_ssdlite", "rtmpose_s", detector="ssdlite"),
    Member("animaltokenpose_fasterrcnn", "animaltokenpose_base", detector="fasterrcnn_mobilenet_v3_large_fpn"),
    Member("resnet_50_fasterrcnn_resnet50_v2", "resnet_50", detector="fasterrcnn_resnet50_fpn_v2"),
    Member("resnet_50_multi_animal", "resnet_50", multi_animal=True),
    Member("dekr_w32", "dekr_w32", multi_animal=True),
    Member("dlcrnet_compiled_ddp", "dlcrnet_stride16_ms5", multi_animal=True, wrappers=("compile", "dp")),
    Member("ctd_prenet_rtmpose_s", "ctd_prenet_rtmpose_s", multi_animal=True),
    Member("ctd_coam_w32", "ctd_coam_w32", multi_animal=True),
)

SNAPSHOT_COUNT = len(MEMBERS) + sum(member.detector is not None for member in MEMBERS)
"""Every member's pose snapshot, and a detector's beside it for the top-down ones."""


def shuffle_of(member: Member) -> int:
    return 1 + [m for m in MEMBERS if m.multi_animal == member.multi_animal].index(member)


def train_dir(root: Path, member: Member) -> Path:
    """Where ``member``'s snapshots are below a zoo (or a copy of it) at ``root``."""
    return (
        root
        / PROJECTS[member.multi_animal]
        / "dlc-models-pytorch"
        / "iteration-0"
        / (f"dotsNov22-trainset95shuffle{shuffle_of(member)}")
        / "train"
    )


def pose_snapshot(root: Path, member: Member) -> Path:
    return train_dir(root, member) / f"snapshot-{EPOCH:03d}.pt"


def detector_snapshot(root: Path, member: Member) -> Path | None:
    return train_dir(root, member) / f"snapshot-detector-{EPOCH:03d}.pt" if member.detector else None


def snapshots(root: Path) -> dict[Path, Member]:
    """Every snapshot of a zoo at ``root``, with the member it belongs to."""
    found = {}
    for member in MEMBERS:
        found[pose_snapshot(root, member)] = member
        if (detector := detector_snapshot(root, member)) is not None:
            found[detector] = member
    return found


def cached_zoo() -> Path:
    """The zoo for the DeepLabCut and torch installed here, built on first use."""
    import deeplabcut

    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    base = Path(os.environ.get("DLC_SNAPSHOT_FIX_ZOO", Path.home() / ".cache" / "dlc-snapshot-fix" / "zoo"))
    root = base / f"dlc-{deeplabcut.__version__}-torch-{torch.__version__}-numpy-{np.__version__}-{recipe}"
    if not root.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".building-", dir=base))
        try:
            build_zoo(partial)
        except BaseException:
            shutil.rmtree(partial)
            raise
        try:
            partial.rename(root)
        except OSError:  # another process built it first
            shutil.rmtree(partial)
    return root


def copy_zoo(destination: Path) -> Path:
    """A fresh, writable copy of the cached zoo (two projects) at ``destination``."""
    shutil.copytree(cached_zoo(), destination)
    return destination


def build_zoo(root: Path) -> None:
    for multi_animal, name in PROJECTS.items():
        _write_project_config(root / name, multi_animal)
    for member in MEMBERS:
        _build_member(root, member)


def _write_project_config(project: Path, multi_animal: bool) -> None:
    config = yaml.safe_load((SAMPLE / "config.yaml").read_text())
    config["project_path"] = str(project)
    if multi_animal:
        config.update(
            multianimalproject=True,
            individuals=["mouse1", "mouse2"],
            multianimalbodyparts=list(config["bodyparts"]),
            bodyparts="MULTI!",
            uniquebodyparts=[],
        )
    project.mkdir(parents=True)
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _build_member(root: Path, member: Member) -> None:
    from deeplabcut.utils.auxiliaryfunctions import read_config

    from dlc_snapshot_fix.verify import build_detector, build_pose_model

    folder = train_dir(root, member)
    folder.mkdir(parents=True)
    project_config = read_config(str(root / PROJECTS[member.multi_animal] / "config.yaml"))
    logging.disable(logging.WARNING)  # the builders log every layer they leave randomly initialised
    try:
        config = write_pytorch_config(project_config, folder / "pytorch_config.yaml", member)
        torch.manual_seed(shuffle_of(member))
        pose = build_pose_model(copy.deepcopy(config["model"]))
        _save(folder / f"snapshot-{EPOCH:03d}.pt", pose, member, member.optimizer)
        if member.detector:
            detector = build_detector(config["detector"]["model"])
            _save(folder / f"snapshot-detector-{EPOCH:03d}.pt", detector, member, optimizer=False)
    finally:
        logging.disable(logging.NOTSET)


def write_pytorch_config(project_config: dict, config_path: Path, member: Member) -> dict:
    """``member``'s ``pytorch_config.yaml`` for a project, written as create_training_dataset writes it."""
    from deeplabcut.core.config import read_config_as_dict
    from deeplabcut.pose_estimation_pytorch.config.make_pose_config import make_pytorch_pose_config
    from deeplabcut.utils.auxiliaryfunctions import edit_config

    make_pytorch_pose_config(
        project_config,
        config_path,
        net_type=member.net_type,
        top_down=member.detector is not None,
        detector_type=member.detector,
        ctd_conditions=(1, 1) if member.net_type.startswith("ctd") else None,
        save=True,
    )
    config = read_config_as_dict(str(config_path))
    if member.backbone_model_name:  # a custom script's edit, made as DeepLabCut edits its files
        config["model"]["backbone"]["model_name"] = member.backbone_model_name
        edit_config(str(config_path), {"model": config["model"]})
        config = read_config_as_dict(str(config_path))
    return config


def pytorch_config_with_another_bodypart(root: Path, member: Member, destination: Path) -> Path:
    """``member``'s config for its zoo project with a third bodypart ("mid"): what a reused snapshot meets."""
    from deeplabcut.utils.auxiliaryfunctions import read_config

    project_config = read_config(str(root / PROJECTS[member.multi_animal] / "config.yaml"))
    field = "multianimalbodyparts" if member.multi_animal else "bodyparts"
    project_config[field] = [*project_config[field], "mid"]
    destination.mkdir(parents=True, exist_ok=True)
    config_path = destination / "pytorch_config.yaml"
    logging.disable(logging.WARNING)
    try:
        write_pytorch_config(project_config, config_path, member)
    finally:
        logging.disable(logging.NOTSET)
    return config_path


def _save(path: Path, model: torch.nn.Module, member: Member, optimizer: bool) -> None:
    """``model`` saved as ``member``'s run saved it: through its wrappers, with rc5's numpy metrics."""
    snapshot = {
        "metadata": {
            "epoch": EPOCH,
            "metrics": {"test.rmse": np.float64(3.25), "test.mAP": np.float64(0.5)},
            "losses": {"train.total_loss": np.float64(0.01)},
        },
        "model": wrapped_state_dict(model, *member.wrappers),
    }
    if optimizer:  # (a wrapper holds the model's own parameters, in the same order)
        adamw = torch.optim.AdamW(model.parameters(), lr=5e-4)
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        adamw.step()
        scheduler = torch.optim.lr_scheduler.MultiStepLR(adamw, milestones=[90, 120])
        snapshot.update(optimizer=adamw.state_dict(), scheduler=scheduler.state_dict())
    torch.save(snapshot, path)
