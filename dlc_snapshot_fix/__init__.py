"""Rescue DeepLabCut 3 PyTorch snapshots that DeepLabCut can no longer load.

Read top to bottom, the modules follow the data: ``discover`` finds the snapshots,
``reading`` loads them safely, ``keys`` and ``transforms`` decide what changes (pure),
``store`` keeps the original and writes the new file atomically, ``verify`` proves the
result, ``report`` says what happened. ``migrate`` strings them together; ``cli`` is a
thin layer over it.

The public names below are imported on first use, not with the package: the plugin's
start-up file imports ``dlc_snapshot_fix.autoload`` in every Python process of an
environment, and that must not cost an ``import torch`` (seconds, hundreds of MB).
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing is ~5 ms of every process's start-up
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ProjectError": "discover",
    "ProjectInventory": "discover",
    "SnapshotFile": "discover",
    "discover_project": "discover",
    "KeyCollisionError": "keys",
    "find_wrapper_prefixes": "keys",
    "strip_prefix": "keys",
    "strip_wrapper_prefixes": "keys",
    "ProjectBusyError": "migrate",
    "migrate_project": "migrate",
    "restore_project": "migrate",
    "RefusedSnapshotError": "reading",
    "SnapshotReadError": "reading",
    "load_snapshot": "reading",
    "ExitCode": "report",
    "ProjectReport": "report",
    "SnapshotResult": "report",
    "Status": "report",
}

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name: str) -> Any:
    """``dlc_snapshot_fix.migrate_project`` and friends, from their modules, on first use (PEP 562)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
