"""Prove a result: the file reads back as intended, and it loads into its DeepLabCut model.

``compare_snapshots`` and ``compare_to_model`` are pure; ``ModelChecker`` builds the
model a ``pytorch_config.yaml`` describes with the real DeepLabCut (as its inference
does, with no weight download) and is skipped, saying so, where DeepLabCut is absent.
"""

from __future__ import annotations

import copy
import importlib.util
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dlc_snapshot_fix import keys, pickled, zipappend
from dlc_snapshot_fix.discover import SnapshotFile, read_yaml


def tensors_bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, NaN equals an identical NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    bytes_a = a.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    bytes_b = b.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return bool(np.array_equal(bytes_a, bytes_b))  # numpy compares bytes at memory speed


def compare_snapshots(expected: Any, actual: Any, where: str = "snapshot") -> list[str]:
    """Every difference between two loaded snapshots: keys, order, ``_metadata``, tensor bits."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            return [f"{where}: tensor expected on one side only"]
        return [] if tensors_bit_identical(expected, actual) else [f"{where}: tensor differs"]
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        if list(expected) != list(actual):
            return [f"{where}: keys differ"]
        problems = []
        if getattr(expected, "_metadata", None) != getattr(actual, "_metadata", None):
            problems.append(f"{where}: _metadata differs")
        for key in expected:
            problems += compare_snapshots(expected[key], actual[key], f"{where}[{key!r}]")
        return problems
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where}: length differs"]
        problems = []
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            problems += compare_snapshots(a, b, f"{where}[{index}]")
        return problems
    return [] if expected == actual or (expected != expected and actual != actual) else [f"{where}: value differs"]


def records_in(obj: Any) -> list[pickled.TensorRecord]:
    """Tensor records in pickling order (first reference)."""
    if isinstance(obj, pickled.TensorRecord):
        return [obj]
    if isinstance(obj, dict):
        return [r for value in obj.values() for r in records_in(value)]
    if isinstance(obj, (list, tuple)):
        return [r for value in obj for r in records_in(value)]
    return []


def same_structure(expected: Any, actual: Any) -> bool:
    if isinstance(expected, pickled.TensorRecord):
        return isinstance(actual, pickled.TensorRecord) and expected.args[1:] == actual.args[1:]
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and list(expected) == list(actual)
            and getattr(expected, "_metadata", None) == getattr(actual, "_metadata", None)
            and all(same_structure(expected[k], actual[k]) for k in expected)
        )
    if isinstance(expected, (list, tuple)):
        return (
            type(expected) is type(actual)
            and len(expected) == len(actual)
            and all(map(same_structure, expected, actual))
        )
    return expected == actual or (expected != expected and actual != actual)


def streamed_differences(original: Path, written: Path, expected: Any) -> list[str]:
    """Read-back of a rewrite without mapping either file: memory does not grow with snapshot size.

    ``expected`` is the snapshot meant, as tensor records (the original pickle, transformed).
    The new file's pickle must parse to it, tensor for tensor (offset, size, stride, storage
    type and length), and every storage's bytes must equal the original's, compared in
    1 MiB chunks straight from both zips (whose reader also checks each member's CRC).
    """
    old_layout, new_layout = zipappend.read_layout(original), zipappend.read_layout(written)
    new_records, new_order = pickled.loads(zipappend.read_member(written, new_layout, new_layout.pickle_record()))
    if not same_structure(expected, new_records):
        return ["the new file's pickle does not parse to the snapshot meant"]
    old_storages = list({r.storage.key: r.storage for r in records_in(expected)}.values())
    new_storages = list({r.storage.key: r.storage for r in records_in(new_records)}.values())
    if [s.key for s in new_storages] != new_order or len(old_storages) != len(new_storages):
        return ["the new file references its storages differently"]
    old_prefix = old_layout.pickle_record().name.rsplit("/", 1)[0]
    new_prefix = new_layout.pickle_record().name.rsplit("/", 1)[0]
    with zipfile.ZipFile(original) as old_zip, zipfile.ZipFile(written) as new_zip:
        for old, new in zip(old_storages, new_storages, strict=True):
            if old.pid[1] is not new.pid[1] or old.pid[4] != new.pid[4]:
                return [f"storage {new.key}: another type or length than the original's {old.key}"]
            with old_zip.open(f"{old_prefix}/data/{old.key}") as a, new_zip.open(f"{new_prefix}/data/{new.key}") as b:
                while chunk := a.read(CHUNK):
                    if b.read(len(chunk)) != chunk:
                        return [f"storage {new.key}: bytes differ from the original's"]
                if b.read(1):
                    return [f"storage {new.key}: longer than the original's"]
    return []


CHUNK = 1 << 20


CheckStatus = Literal["ok", "mismatch", "skipped"]


@dataclass(frozen=True)
class ModelCheck:
    """How a state dict fits the model it belongs to, in fvcore's terms."""

    status: CheckStatus
    reason: str = ""
    missing: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """``(key, shape in snapshot, shape in model)``."""

    def summary(self) -> str:
        if self.status != "mismatch":
            return self.reason
        parts = []
        for label, groups in (("missing", self.missing), ("unexpected", self.unexpected)):
            if groups:
                listed = ", ".join(f"{module}: {count}" for module, count in groups.items())
                parts.append(f"{label} keys ({listed})")
        if self.shape_mismatches:
            listed = ", ".join(f"{k} {list(s)} vs model {list(m)}" for k, s, m in self.shape_mismatches[:3])
            more = len(self.shape_mismatches) - 3
            parts.append(f"shape mismatches ({listed}{f', +{more} more' if more > 0 else ''})")
        return "; ".join(parts)


def compare_to_model(model_shapes: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]) -> ModelCheck:
    """What a strict ``load_state_dict`` would complain about, grouped by module."""
    missing = [k for k in model_shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_shapes]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(shape))
        for k, shape in model_shapes.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    if not (missing or unexpected or mismatched):
        return ModelCheck("ok", "loads strictly into its DeepLabCut model")
    return ModelCheck(
        "mismatch",
        missing=keys.group_by_module(missing),
        unexpected=keys.group_by_module(unexpected),
        shape_mismatches=mismatched,
    )


def deeplabcut_available() -> bool:
    return importlib.util.find_spec("deeplabcut") is not None


def build_pose_model(model_config: Mapping[str, Any]) -> torch.nn.Module:
    """The pose model a ``pytorch_config.yaml``'s ``model`` section describes, built as DeepLabCut's inference does.

    ``pretrained_backbone=False``: no weight download. The config is copied, since
    ``PoseModel.build`` writes into it.
    """
    from deeplabcut.pose_estimation_pytorch.models import PoseModel

    return PoseModel.build(copy.deepcopy(dict(model_config)), pretrained_backbone=False)


def model_config_from(pytorch_config: Path) -> tuple[dict | None, str]:
    """The ``model`` section of a ``pytorch_config.yaml``, or ``None`` and why not."""
    config = read_yaml(pytorch_config)
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        return None, f"{pytorch_config} has no 'model' section; model check skipped"
    return dict(config["model"]), str(pytorch_config)


class ModelChecker:
    """Builds each DeepLabCut model once and checks state dicts against it."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._models: dict[str, torch.nn.Module] = {}

    def check(
        self, snapshot_file: SnapshotFile, snapshot: Mapping[str, Any], entry: str, against: Path | None = None
    ) -> ModelCheck:
        """Check ``snapshot[entry]`` against its own model config, or the ``pytorch_config.yaml`` ``against``."""
        if not self.enabled:
            return ModelCheck("skipped", "model check not requested")
        if not deeplabcut_available():
            return ModelCheck("skipped", "deeplabcut is not installed; model check skipped")
        if entry == "detector" or snapshot_file.role == "detector":
            return ModelCheck(
                "skipped",
                "detector not checked: building torchvision's detector downloads backbone weights",
            )
        if against is not None:
            model_config, source = model_config_from(against)
        else:
            model_config, source = self._pose_model_config(snapshot_file, snapshot)
        if model_config is None:
            return ModelCheck("skipped", source)
        try:
            model = self.model(source, model_config)
        except Exception as error:  # DeepLabCut's builders raise many types for a bad config
            return ModelCheck("skipped", f"could not build the model from {source}: {error}")
        state_dict = snapshot[entry]
        result = compare_to_model({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict)
        if result.status == "ok" and all(isinstance(t, torch.Tensor) for t in state_dict.values()):
            model.load_state_dict(state_dict, strict=True)  # the real thing, as DeepLabCut calls it
        # (tensors recorded from the pickle by the fast path are compared by shape only: no data is read)
        return result

    @staticmethod
    def _pose_model_config(snapshot_file: SnapshotFile, snapshot: Mapping[str, Any]) -> tuple[dict | None, str]:
        if snapshot_file.role == "exported":
            config = snapshot.get("config")
            if isinstance(config, Mapping) and isinstance(config.get("model"), Mapping):
                return dict(config["model"]), f"{snapshot_file.path}#config"
            return None, "exported file has no model config; model check skipped"
        if snapshot_file.pytorch_config is None:
            return None, "no readable pytorch_config.yaml beside it; model check skipped"
        return model_config_from(snapshot_file.pytorch_config)

    def model(self, source: str, model_config: Mapping[str, Any]) -> torch.nn.Module:
        """The model built from ``model_config``, once per ``source``."""
        if source not in self._models:
            self._models[source] = build_pose_model(model_config)
        return self._models[source]
