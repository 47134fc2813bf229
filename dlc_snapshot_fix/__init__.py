"""Rescue DeepLabCut 3 PyTorch snapshots that DeepLabCut can no longer load.

Read top to bottom, the modules follow the data: ``discover`` finds the snapshots,
``reading`` loads them safely, ``keys`` and ``transforms`` decide what changes (pure),
``store`` keeps the original and writes the new file atomically, ``verify`` proves the
result, ``report`` says what happened. ``migrate`` strings them together; ``cli`` is a
thin layer over it.
"""

__version__ = "0.1.0"

from dlc_snapshot_fix.discover import ProjectError, ProjectInventory, SnapshotFile, discover_project
from dlc_snapshot_fix.keys import KeyCollisionError, find_wrapper_prefixes, strip_prefix, strip_wrapper_prefixes
from dlc_snapshot_fix.migrate import ProjectBusyError, migrate_project, restore_project
from dlc_snapshot_fix.reading import RefusedSnapshotError, SnapshotReadError, load_snapshot
from dlc_snapshot_fix.report import ExitCode, ProjectReport, SnapshotResult, Status

__all__ = [
    "ExitCode",
    "KeyCollisionError",
    "ProjectBusyError",
    "ProjectError",
    "ProjectInventory",
    "ProjectReport",
    "RefusedSnapshotError",
    "SnapshotFile",
    "SnapshotReadError",
    "SnapshotResult",
    "Status",
    "__version__",
    "discover_project",
    "find_wrapper_prefixes",
    "load_snapshot",
    "migrate_project",
    "restore_project",
    "strip_prefix",
    "strip_wrapper_prefixes",
]
