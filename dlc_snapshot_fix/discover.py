"""Find every snapshot of a DeepLabCut project, reading its YAML files and nothing else.

DeepLabCut's own ``read_config`` may write ``config.yaml`` back, so YAML is read here,
read-only, the way DeepLabCut's reader builds it (``dlcyaml``). Shuffle folders are
globbed rather than rebuilt from ``TrainingFraction`` (``int(fraction * 100)``
truncation makes names surprising).
"""

from __future__ import annotations

import locale
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlc_snapshot_fix import names

Role = Literal["pose", "detector", "exported"]

PYTORCH_MODELS = "dlc-models-pytorch"
TENSORFLOW_MODELS = "dlc-models"
EXPORTED_MODELS = "exported-models-pytorch"
MODEL_PREFIX_DEPTH = 3
"""How deep below the project a ``dlc-models-pytorch`` folder may sit (model prefixes)."""


class ProjectError(Exception):
    """The path given is not a DeepLabCut project this tool can read."""


@dataclass(frozen=True)
class SnapshotFile:
    """One file holding state dicts, and the model config it belongs to."""

    path: Path
    role: Role
    pytorch_config: Path | None
    """The shuffle's ``pytorch_config.yaml``; ``None`` for exported models (they carry their own)."""
    prefix: str = names.POSE_PREFIX
    """The snapshot prefix its name starts with (``snapshot``, ``snapshot-detector`` or a custom one)."""
    legacy_best: bool = False
    """Named ``<prefix>-best.pt``, as 3.0.0rc5 and older named the best snapshot (current DeepLabCut ignores it)."""

    @property
    def state_dict_entries(self) -> tuple[str, ...]:
        """Top-level entries of the file that are state dicts with parameter names."""
        return ("pose", "detector") if self.role == "exported" else ("model",)


@dataclass(frozen=True)
class SkippedPath:
    path: Path
    reason: str
    problem: bool = False
    """Whether DeepLabCut will trip over it (the run then exits non-zero), not just a file we leave alone."""


@dataclass
class ProjectInventory:
    """What discovery found: the files to look at and what it passed over, with reasons."""

    project: Path
    config: dict[str, Any]
    snapshots: list[SnapshotFile] = field(default_factory=list)
    skipped: list[SkippedPath] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Things DeepLabCut will fail on that are not snapshots (malformed YAML): reported, the run exits non-zero."""
    model_folders: list[Path] = field(default_factory=list)
    """Folders that hold snapshots (``train/`` and exported-model folders): where temp files may be left."""


def read_yaml(path: Path) -> Any:
    """Read a YAML file read-only, as DeepLabCut reads it (``dlcyaml``); a refusal names the file."""
    from dlc_snapshot_fix import dlcyaml

    try:
        return dlcyaml.load(read_config_text(path))
    except dlcyaml.YamlError as error:
        raise ProjectError(f"{path}: not valid YAML ({error}). Fix or restore this file.") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ProjectError(f"{path}: cannot be read ({error}).") from error


def read_config_text(path: Path) -> str:
    """A config file's text: UTF-8, or else the encoding DeepLabCut's own ``open()`` reads it in here.

    DeepLabCut writes and reads ``config.yaml`` and ``pytorch_config.yaml`` with a bare
    ``open()``: in the locale's encoding, which on Windows is the ANSI code page (cp1252 for a
    project under ``C:\\Users\\José``). What DeepLabCut reads on this machine, this reads too.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        encoding = locale.getpreferredencoding(False)
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as error:
            raise UnicodeDecodeError(
                error.encoding,
                error.object,
                error.start,
                error.end,
                f"{error.reason}; neither UTF-8 nor {encoding}, the encoding DeepLabCut reads it in here",
            ) from None


def project_root(path: Path) -> Path:
    """The project folder for a project folder or its ``config.yaml``."""
    path = Path(path)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path.parent
    return path


def discover_project(path: Path) -> ProjectInventory:
    """List every snapshot of the project at ``path`` (a folder or its ``config.yaml``)."""
    project = project_root(Path(path)).absolute()
    config_file = project / "config.yaml"
    if not config_file.is_file():
        raise ProjectError(f"{project}: no config.yaml here. Pass a DeepLabCut project folder or its config.yaml.")
    inventory = ProjectInventory(project=project, config={})
    try:
        config = read_yaml(config_file)
    except ProjectError as error:  # the snapshots do not depend on it: report, and carry on
        inventory.problems.append(f"{error} DeepLabCut cannot open this project until then.")
        config = {}
    if not isinstance(config, dict):
        inventory.problems.append(f"{config_file}: not a DeepLabCut project configuration (no mapping).")
        config = {}
    inventory.config = config
    recorded = config.get("project_path")
    if recorded and Path(str(recorded)) != project:
        inventory.warnings.append(
            f"config.yaml says project_path is {recorded}; using {project}, where it actually is."
        )
    for models_dir in model_roots(project, PYTORCH_MODELS):
        for train_dir in sorted(models_dir.glob("iteration-*/*/train")):
            _discover_train_dir(train_dir, inventory)
    for tf_dir in model_roots(project, TENSORFLOW_MODELS):
        for shuffle in sorted(tf_dir.glob("iteration-*/*")):
            inventory.skipped.append(
                SkippedPath(shuffle, "TensorFlow-engine model: not a PyTorch snapshot, left alone")
            )
    _discover_exported(project / EXPORTED_MODELS, inventory)
    return inventory


def model_roots(project: Path, folder_name: str) -> list[Path]:
    """``folder_name`` folders at the project root or under a model prefix, without following links."""
    found = []
    for current, subdirs, _ in os.walk(project):
        depth = len(Path(current).relative_to(project).parts)
        if folder_name in subdirs:
            found.append(Path(current) / folder_name)
        subdirs[:] = [
            d
            for d in subdirs
            if depth < MODEL_PREFIX_DEPTH
            and d not in (PYTORCH_MODELS, TENSORFLOW_MODELS, names.TOOL_DIR_NAME)
            and not d.startswith(".")
        ]
    return sorted(found)


def _snapshot_prefixes(model_config: dict[str, Any]) -> tuple[set[str], set[str]]:
    """Pose and detector prefixes to look for: DeepLabCut's defaults plus any custom ones."""
    pose, detector = {names.POSE_PREFIX}, {names.DETECTOR_PREFIX}
    custom = _section(_section(model_config, "runner"), "snapshot_prefix")
    if isinstance(custom, str) and custom:  # DeepLabCut's trainer falls back to its default for None or ""
        pose.add(custom)
    custom = _section(_section(_section(model_config, "detector"), "runner"), "snapshot_prefix")
    if isinstance(custom, str) and custom:
        detector.add(custom)
    return pose, detector


def _section(config: Any, key: str) -> Any:
    """``config[key]`` where ``config`` is a mapping, else None: a hand-edited config may hold anything."""
    return config.get(key) if isinstance(config, dict) else None


def _discover_train_dir(train_dir: Path, inventory: ProjectInventory) -> None:
    config_file = train_dir / "pytorch_config.yaml"
    model_config: dict[str, Any] = {}
    if not config_file.is_file():
        inventory.warnings.append(f"{config_file}: missing; snapshots here cannot be checked against their model.")
        config_file_or_none: Path | None = None
    else:
        config_file_or_none = config_file
        try:
            loaded = read_yaml(config_file)
            model_config = loaded if isinstance(loaded, dict) else {}
        except ProjectError as error:
            inventory.problems.append(f"{error} Snapshots here were looked for under DeepLabCut's default names.")
            config_file_or_none = None
    inventory.model_folders.append(train_dir)
    pose_prefixes, detector_prefixes = _snapshot_prefixes(model_config)
    legacy_names = {names.legacy_best_name(p) for p in pose_prefixes | detector_prefixes}

    for entry in sorted(train_dir.iterdir()):
        name = entry.name
        role: Role | None = None
        prefix = next((p for p in detector_prefixes if names.is_dlc_snapshot_name(name, p)), None)
        if prefix is not None:
            role = "detector"
        elif (prefix := next((p for p in pose_prefixes if names.is_dlc_snapshot_name(name, p)), None)) is not None:
            role = "pose"
        elif name in legacy_names:
            prefix = name.removesuffix("-best.pt")
            role = "detector" if prefix in detector_prefixes else "pose"
        elif name.endswith(".pt") and not name.startswith("."):
            inventory.skipped.append(
                SkippedPath(entry, "not named like a DeepLabCut snapshot; DeepLabCut never loads it")
            )
            continue
        else:
            continue
        if entry.is_symlink():
            target = os.readlink(entry)
            if not entry.exists():  # dangling, or a loop
                reason = (
                    f"a broken symbolic link (to {target}, maybe a loop): DeepLabCut will fail on it. Fix or remove it"
                )
                inventory.skipped.append(SkippedPath(entry, reason, problem=True))
            else:
                reason = f"a symbolic link to {target}; left alone (migrate the file it points to)"
                inventory.skipped.append(SkippedPath(entry, reason))
            continue
        if not entry.is_file():
            reason = "named like a snapshot but not a file: DeepLabCut will try to load it and fail. Rename it"
            inventory.skipped.append(SkippedPath(entry, reason, problem=True))
            continue
        legacy = name in legacy_names
        inventory.snapshots.append(SnapshotFile(entry, role, config_file_or_none, prefix, legacy))


def _discover_exported(exported_dir: Path, inventory: ProjectInventory) -> None:
    if not exported_dir.is_dir():
        return
    inventory.model_folders.extend(sorted(p for p in exported_dir.iterdir() if p.is_dir() and not p.is_symlink()))
    for entry in sorted(exported_dir.glob("*/*.pt")):
        if entry.is_file() and not entry.is_symlink():
            inventory.snapshots.append(SnapshotFile(entry, "exported", None))
