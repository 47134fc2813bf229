"""What a snapshot is called, and where this tool keeps its own files.

One module owns naming, as DeepLabCut's ``runners/snapshots.py`` does. DeepLabCut
lists snapshots in a model's ``train/`` folder with the pattern
``^<prefix>(-best)?-\\d+\\.pt$``; any file matching it is loaded by
``evaluate_network`` and friends. So nothing this tool writes next to a snapshot may
match it: temporary files start with a dot and end in ``.tmp``, and backups live in the
project's own ``.dlc-snapshot-fix/`` folder with a ``.orig`` suffix.
"""

from __future__ import annotations

import re
from pathlib import Path

POSE_PREFIX = "snapshot"
"""DeepLabCut's default prefix for pose models (bottom-up, top-down and CTD tasks)."""
DETECTOR_PREFIX = "snapshot-detector"
"""DeepLabCut's prefix for top-down detector snapshots."""

TOOL_DIR_NAME = ".dlc-snapshot-fix"
"""The folder in a project root that holds this tool's manifest, backups and lock."""
MANIFEST_NAME = "manifest.json"
BACKUP_SUFFIX = ".orig"
TEMP_SUFFIX = ".tmp"


def snapshot_pattern(prefix: str) -> re.Pattern[str]:
    """DeepLabCut's listing pattern for ``prefix`` (escaped: a prefix is a name, not a regex)."""
    return re.compile(rf"^{re.escape(prefix)}(-best)?-\d+\.pt$")


def is_dlc_snapshot_name(name: str, prefix: str) -> bool:
    """Whether DeepLabCut would list a file called ``name`` as a snapshot of ``prefix``."""
    return snapshot_pattern(prefix).match(name) is not None


def best_name(prefix: str, epoch: int) -> str:
    """What DeepLabCut 3.0.0rc6 and later call the best snapshot of ``epoch``."""
    return f"{prefix}-best-{epoch:03d}.pt"


def legacy_best_name(prefix: str) -> str:
    """The best snapshot's name up to DeepLabCut 3.0.0rc5; current versions ignore it."""
    return f"{prefix}-best.pt"


def tool_dir(project: Path) -> Path:
    return project / TOOL_DIR_NAME


def manifest_path(project: Path) -> Path:
    return tool_dir(project) / MANIFEST_NAME


def lock_path(project: Path) -> Path:
    return tool_dir(project) / "lock"


def backup_path(project: Path, snapshot: Path, sha256: str) -> Path:
    """Where the original bytes of ``snapshot`` are kept.

    The tree below ``backups/`` mirrors the project so a person can find a backup by
    eye; the content hash in the name keeps two different originals of one path apart.
    """
    relative = snapshot.relative_to(project)
    return tool_dir(project) / "backups" / relative.parent / (f"{relative.name}.{sha256[:16]}{BACKUP_SUFFIX}")


def temp_path(target: Path, token: str) -> Path:
    """A temporary file beside ``target``: same folder (so ``os.replace`` is atomic), hidden, not ``.pt``.

    ``token`` is 8 hex digits, so :func:`is_temp_name` recognises leftovers of a killed run.
    """
    return target.with_name(f".{target.name}.{token}{TEMP_SUFFIX}")


_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")


def is_temp_name(name: str) -> bool:
    return _TEMP_NAME.match(name) is not None
