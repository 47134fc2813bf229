"""Explain a snapshot: what it holds, whether it fits its model, and if not, why and what fixes it.

``likely_cause`` is pure: it turns a :class:`~dlc_snapshot_fix.verify.ModelCheck` (made
on the state dict with wrapper prefixes already stripped) into one plain sentence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlc_snapshot_fix import keys, transforms
from dlc_snapshot_fix.discover import ProjectError, SnapshotFile, discover_project, read_yaml
from dlc_snapshot_fix.reading import SnapshotReadError, load_snapshot
from dlc_snapshot_fix.verify import ModelCheck, ModelChecker, judge_numpy_values, numpy_dialect_of

logger = logging.getLogger(__name__)

HEAD = "heads."


@dataclass
class SnapshotDiagnosis:
    path: Path
    entries: list[str]
    epoch: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    prefixes: tuple[str, ...] = ()
    parameters: int = 0
    tensor_bytes: int = 0
    head_shapes: dict[str, list[int]] = field(default_factory=dict)
    model_check: ModelCheck | None = None
    checked_against: str | None = None
    cause: str = ""
    fix: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    """About the file beyond its fit (numpy metadata), failing ones in ``hints``."""
    hints: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether DeepLabCut loads it as it is: readable, no prefix, the model check not failed, no hint."""
        check = self.model_check
        return self.error is None and check is not None and check.fits and not self.prefixes and not self.hints

    def to_dict(self) -> dict[str, Any]:
        check = self.model_check
        return {
            "path": str(self.path),
            "entries": self.entries,
            "epoch": self.epoch,
            "metrics": {k: _plain(v) for k, v in self.metrics.items()},
            "wrapper_prefixes": list(self.prefixes),
            "parameters": self.parameters,
            "tensor_bytes": self.tensor_bytes,
            "head_shapes": self.head_shapes,
            "checked_against": self.checked_against,
            "model_check": None
            if check is None
            else {
                "status": check.status,
                "reason": check.reason,
                "missing": check.missing,
                "unexpected": check.unexpected,
                "shape_mismatches": [
                    {"key": k, "snapshot": list(s), "model": list(m)} for k, s, m in check.shape_mismatches
                ],
            },
            "cause": self.cause,
            "fix": self.fix,
            "error": self.error,
            "notes": self.notes,
            "hints": self.hints,
        }

    def render(self) -> list[str]:
        if self.error:
            return [f"{self.path}", f"  error: {self.error}"]
        lines = [
            f"{self.path}",
            f"  entries: {', '.join(self.entries)}",
            f"  epoch: {self.epoch}   metrics: {', '.join(f'{k}={_plain(v)}' for k, v in self.metrics.items()) or '-'}",
            f"  wrapper prefix: {' + '.join(self.prefixes) if self.prefixes else 'none'}",
            f"  parameters: {self.parameters:,} ({self.tensor_bytes / 2**20:.1f} MiB of tensors)",
        ]
        lines += [f"  head {key}: {shape}" for key, shape in self.head_shapes.items()]
        if self.model_check is not None:
            against = f" against {self.checked_against}" if self.checked_against else ""
            lines.append(f"  model check{against}: {self.model_check.status}")
            if self.model_check.status in ("mismatch", "refused"):
                lines.append(f"    {self.model_check.summary()}")
        lines += [f"  problem: {hint}" for hint in self.hints]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  likely cause: {self.cause}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return lines


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and not isinstance(value, torch.Tensor) else value


def heatmap_count(model_config: Mapping[str, Any] | None, head: str = "bodypart") -> int | None:
    """How many heatmaps (bodyparts) a model config's head predicts, if it says."""
    try:
        return int(model_config["heads"][head]["target_generator"]["num_heatmaps"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


def likely_cause(
    check: ModelCheck, prefixes: tuple[str, ...], configured_bodyparts: int | None = None
) -> tuple[str, str | None]:
    """One sentence on why a state dict does (not) fit, and a hint at the fix (``None`` when there is none)."""
    wrapped = (
        f"Every key starts with {' + '.join(map(repr, prefixes))}: it was saved from a wrapped model "
        "(DataParallel/DDP/torch.compile). "
        if prefixes
        else ""
    )
    migrate = "dlc-snapshot-fix PROJECT (strips the prefix in place, with a backup)"
    if check.status == "skipped":
        return (wrapped or "No wrapper prefix. ") + f"Not checked against a model: {check.reason}.", (
            migrate if prefixes else None
        )
    if check.status == "refused":
        numpy = "numpy" in check.reason
        return wrapped + f"{check.reason}.", (
            "dlc-snapshot-fix PROJECT --fix-metadata (numpy metadata made plain numbers, with a backup)"
            if numpy
            else None
        )
    if check.status == "ok":
        fits = "Without it the state dict loads strictly" if prefixes else "Loads strictly"
        return wrapped + f"{fits} into the model its config describes.", migrate if prefixes else None
    problem_keys = [
        *check.missing,
        *check.unexpected,
        *(k for k, _, _ in check.shape_mismatches),
    ]
    outside_heads = sorted({k for k in problem_keys if not k.startswith(HEAD)})
    resized = [(k, have, want) for k, have, want in check.shape_mismatches if not k.startswith(HEAD)]
    if outside_heads and len(resized) == len(outside_heads) and keys.resized_by_a_count(resized, configured_bodyparts):
        return (
            wrapped + f"The network is the same, but {len(resized)} tensor(s) outside the heads have other shapes "
            f"({keys.shape_changes(resized)}): parts sized by the bodyparts (AnimalTokenPose's keypoint tokens, "
            "CTD's conditioning layers), so the bodypart count changed.",
            "dlc-snapshot-fix adapt SNAPSHOT --target TARGET_PYTORCH_CONFIG --output NEW.pt --allow-non-head",
        )
    if outside_heads:
        return (
            wrapped + f"The backbone (or neck) does not match ({', '.join(outside_heads[:3])}"
            f"{', …' if len(outside_heads) > 3 else ''}): the snapshot was trained with a different network "
            "(net_type) than this model config. It cannot be reused for this model; "
            "train from a snapshot of the same net_type.",
            None,
        )
    heads = sorted({".".join(k.split(".")[:2]) for k in problem_keys})
    trained_for = _trained_bodyparts(check, configured_bodyparts)
    if trained_for is not None:
        sentence = (
            f"Only the head {', '.join(heads)} differs: the snapshot was trained for {trained_for} bodyparts, "
            f"this model is configured for {configured_bodyparts} (the bodypart count changed). The backbone fits."
        )
    else:
        sentence = f"Only the head(s) {', '.join(heads)} differ; the backbone fits."
    return wrapped + sentence, "dlc-snapshot-fix adapt SNAPSHOT --target TARGET_PYTORCH_CONFIG --output NEW.pt"


def _trained_bodyparts(check: ModelCheck, configured: int | None) -> int | None:
    """The heatmap count a mismatched heatmap head was trained for (its dim where the model has ``configured``)."""
    if configured is None:
        return None
    for key, in_snapshot, in_model in check.shape_mismatches:
        if "heatmap" not in key or len(in_snapshot) != len(in_model):
            continue
        for have, want in zip(in_snapshot, in_model, strict=True):
            if want == configured and have != want:
                return have
    return None


def diagnose_file(snapshot_file: SnapshotFile, checker: ModelChecker, against: Path | None = None) -> SnapshotDiagnosis:
    """Everything ``inspect`` says about one snapshot; never raises for a bad file: it says why."""
    diagnosis = SnapshotDiagnosis(path=snapshot_file.path, entries=[])
    try:
        _diagnose(diagnosis, snapshot_file, checker, against)
    except Exception as error:  # one odd file is reported, never the end of the run
        logger.debug("%s: cannot be diagnosed", snapshot_file.path, exc_info=True)
        diagnosis.error = str(error) or type(error).__name__
        if not isinstance(error, (SnapshotReadError, transforms.SnapshotFormatError)):
            diagnosis.error = f"{type(error).__name__}: {diagnosis.error}. Run with --debug for the traceback"
        diagnosis.cause = "The file cannot be used as a snapshot (see the error)."
    return diagnosis


def _diagnose(
    diagnosis: SnapshotDiagnosis, snapshot_file: SnapshotFile, checker: ModelChecker, against: Path | None
) -> None:
    snapshot = load_snapshot(snapshot_file.path)
    transforms.check_nesting(snapshot)
    fixed, stripped = transforms.strip_wrapper_prefixes(snapshot, snapshot_file.state_dict_entries)
    entry = transforms.present_entries(fixed, snapshot_file.state_dict_entries)[0]
    state_dict = fixed[entry]
    metadata: Mapping[str, Any] = snapshot["metadata"] if isinstance(snapshot.get("metadata"), Mapping) else {}
    diagnosis.entries = list(snapshot)
    diagnosis.epoch = _plain(metadata.get("epoch"))
    metrics = metadata.get("metrics")
    diagnosis.metrics = dict(metrics) if isinstance(metrics, Mapping) else {}
    diagnosis.prefixes = stripped[0].prefixes if stripped else ()
    diagnosis.parameters = sum(t.numel() for t in state_dict.values())
    diagnosis.tensor_bytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    diagnosis.head_shapes = {k: list(t.shape) for k, t in state_dict.items() if k.startswith(HEAD) and t.ndim > 1}
    # DeepLabCut's loader reads the file as it is; the state dict checked is the one without the prefix
    source = snapshot_file.path if snapshot_file.role != "exported" else None
    diagnosis.model_check = checker.check(snapshot_file, fixed, entry, against=against, source=source)
    hint, note = judge_numpy_values(
        transforms.numpy_values(snapshot), [diagnosis.model_check], numpy_dialect_of(snapshot_file.path)
    )
    diagnosis.hints += [hint] if hint else []
    diagnosis.notes += [note] if note else []
    config_path = against or snapshot_file.pytorch_config
    diagnosis.checked_against = str(config_path) if config_path else None
    configured = heatmap_count(_model_section(config_path)) if config_path else None
    diagnosis.cause, diagnosis.fix = likely_cause(diagnosis.model_check, diagnosis.prefixes, configured)


def _model_section(pytorch_config: Path) -> Mapping[str, Any] | None:
    try:
        config = read_yaml(pytorch_config)
    except ProjectError:
        return None
    return config.get("model") if isinstance(config, Mapping) else None


def resolve_pytorch_config(path: Path, shuffle: int | None = None) -> Path:
    """A ``pytorch_config.yaml`` from itself, a project folder or its ``config.yaml`` (the shuffle's, if several)."""
    path = Path(path)
    if path.name == "pytorch_config.yaml":
        return path
    inventory = discover_project(path)
    iteration = inventory.config.get("iteration")
    configs = sorted(inventory.project.glob("**/dlc-models-pytorch/iteration-*/*/train/pytorch_config.yaml"))
    if iteration is not None:
        configs = [c for c in configs if c.parents[2].name == f"iteration-{iteration}"] or configs
    if shuffle is not None:
        configs = [c for c in configs if c.parents[1].name.endswith(f"shuffle{shuffle}")]
    if len(configs) != 1:
        found = ", ".join(str(c.relative_to(inventory.project)) for c in configs) or "none"
        raise ProjectError(f"{path}: need exactly one pytorch_config.yaml, found {found}. Pass --shuffle or the file")
    return configs[0]


def diagnose(path: Path, *, against: Path | None = None, shuffle: int | None = None) -> list[SnapshotDiagnosis]:
    """Diagnose one snapshot file, or every snapshot of a project."""
    path = Path(path)
    checker = ModelChecker()
    target = resolve_pytorch_config(against, shuffle) if against else None
    if path.is_file() and path.suffix == ".pt":
        sibling = path.parent / "pytorch_config.yaml"
        single = SnapshotFile(path, "pose", sibling if sibling.is_file() else None)
        return [diagnose_file(single, checker, target)]
    snapshots = discover_project(path).snapshots
    if target is not None:  # --against names a pose model: a detector snapshot is not checked against it
        snapshots = [f for f in snapshots if f.role != "detector"]
    return [diagnose_file(f, checker, target) for f in snapshots]
