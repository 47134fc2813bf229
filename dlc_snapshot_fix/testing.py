"""Make the broken snapshots this tool exists to fix, with the real DeepLabCut.

Used by the demo and the tests, and useful to anyone reproducing a report. Everything
here needs ``deeplabcut``; nothing here is needed to migrate a project.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from dlc_snapshot_fix.reading import load_snapshot


def build_pose_model(pytorch_config: Path) -> torch.nn.Module:
    """Build the pose model a ``pytorch_config.yaml`` describes, as DeepLabCut's inference does."""
    from deeplabcut.pose_estimation_pytorch.models import PoseModel

    config = yaml.safe_load(Path(pytorch_config).read_text(encoding="utf-8"))
    return PoseModel.build(copy.deepcopy(config["model"]), pretrained_backbone=False)


def save_like_multi_gpu_rc5(path: Path, model: torch.nn.Module, snapshot: dict[str, Any]) -> Path:
    """Save ``snapshot`` with ``model``'s weights as DeepLabCut 3.0.0rc5 did after a two-GPU run.

    rc5's ``TrainingRunner`` wrapped the model in ``torch.nn.DataParallel`` when
    ``runner.gpus`` listed several GPUs and saved ``wrapper.state_dict()``, so every key
    starts with ``module.``. Without CUDA, DataParallel is a pass-through wrapper, so
    the saved keys (and ``_metadata``) are exactly those of a real two-GPU run.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")  # never truncate a file that may be memory-mapped
    torch.save({**snapshot, "model": torch.nn.DataParallel(model).state_dict()}, partial)
    os.replace(partial, path)
    return path


def write_dataparallel_snapshots(
    train_dir: Path, model: torch.nn.Module, epochs: Iterable[int], best_epoch: int | None
) -> list[Path]:
    """Numbered (and one best) rc5-style multi-GPU snapshots of ``model`` in ``train_dir``."""
    written = []
    for epoch in epochs:
        name = f"snapshot-best-{epoch:03d}.pt" if epoch == best_epoch else f"snapshot-{epoch:03d}.pt"
        metadata = {
            "epoch": epoch,
            "metrics": {"test.rmse": 1.5, "test.mAP": 0.5},
            "losses": {"train.total_loss": 0.01},
        }
        written.append(save_like_multi_gpu_rc5(Path(train_dir) / name, model, {"metadata": metadata}))
    return written


def rewrap_as_dataparallel(path: Path, model: torch.nn.Module) -> Path:
    """Turn a snapshot DeepLabCut wrote into the one a two-GPU rc5 run would have written.

    Every entry but ``model`` (metadata, optimizer, scheduler) is kept as DeepLabCut wrote it.
    """
    snapshot = load_snapshot(path)
    model.load_state_dict(snapshot["model"], strict=True)
    return save_like_multi_gpu_rc5(path, model, snapshot)
