"""Shared fixtures: small snapshots and project trees built in memory, no DeepLabCut needed."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

TRAIN = "dlc-models-pytorch/iteration-0/testNov22-trainset80shuffle1/train"


class TinyPose(torch.nn.Module):
    """Small, but with DeepLabCut-like names: a backbone, a head, a BatchNorm (buffers)."""

    def __init__(self, keypoints: int = 2):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.heads = torch.nn.ModuleDict({"bodypart": torch.nn.Conv2d(4, keypoints, 1)})


def wrapped_state_dict(model: torch.nn.Module, *wrappers: str) -> OrderedDict:
    """``model``'s state dict as saved through wrappers, outermost first (``"dp"`` or ``"compile"``)."""
    for wrapper in reversed(wrappers):
        if wrapper == "dp":
            model = torch.nn.DataParallel(model)
        else:
            shell = torch.nn.Module()
            shell._orig_mod = model  # what torch.compile's OptimizedModule holds
            model = shell
    return model.state_dict()


def save_snapshot(path: Path, state_dict, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"metadata": {"epoch": 3, "metrics": {"test.rmse": 2.0}}, "model": state_dict, **extra}, path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DeepLabCut project skeleton (config files only) in a folder whose name has a space."""
    root = tmp_path / "my project"
    (root / TRAIN).mkdir(parents=True)
    (root / "config.yaml").write_text(
        yaml.safe_dump({"Task": "test", "project_path": str(root), "engine": "pytorch", "iteration": 0})
    )
    (root / TRAIN / "pytorch_config.yaml").write_text(yaml.safe_dump({"method": "bu", "net_type": "tiny"}))
    return root
