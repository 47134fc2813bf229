"""DeepLabCut plugin: prefixed snapshots load on every load path, and saved ones come out clean.

Rewriting files (``dlc-snapshot-fix PROJECT``) fixes what is on disk today; this keeps
the next DataParallel/DDP/``torch.compile`` snapshot from breaking DeepLabCut again.
While installed, every state dict DeepLabCut loads has its wrapper prefixes stripped in
memory (files on disk are never modified), and every snapshot DeepLabCut's
``TorchSnapshotManager`` saves is stripped before writing.

Hook points in DeepLabCut 3.0.0 … 3.0.2 (``pose_estimation_pytorch``):

- ``runners.base.attempt_snapshot_load``: evaluate_network, analyze_videos,
  analyze_images, SuperAnimal inference and training resume (including
  ``load_head_weights=False``). ``runners.train`` and ``runners`` import the name
  directly, so it is rebound there too.
- ``torch.load`` as called by ``models.model`` (``PoseModel.build`` with
  ``train_settings.weight_init``), ``models.detectors.base`` (detector
  ``weight_init``) and ``apis.export`` (``export_model``, whose output DeepLabCut-Live
  loads strictly): those modules' ``torch`` name is swapped for a view of torch whose
  ``load`` strips prefixes; everything else is torch itself.
- ``runners.snapshots.TorchSnapshotManager.update``: saving.

``install`` checks every hook point first and raises :class:`PluginError` naming the
DeepLabCut version and the missing hook rather than patch half of them;
``uninstall`` puts back exactly the objects it replaced.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlc_snapshot_fix import transforms

TESTED_VERSIONS = ("3.0.0", "3.0.1", "3.0.2")
"""The DeepLabCut versions a cell of the CI matrix runs the plugin's load paths on (``scripts/matrix.sh``)."""
PACKAGE = "deeplabcut.pose_estimation_pytorch"


class PluginError(RuntimeError):
    """The installed DeepLabCut lacks a hook point the plugin needs; nothing was patched."""


class UntestedDeepLabCutWarning(RuntimeWarning):
    """The installed DeepLabCut is not one the test matrix runs; the plugin installs, loudly."""


class PrefixedSnapshotWarning(UserWarning):
    """A snapshot with wrapper prefixes was loaded with them stripped in memory."""


@dataclass(frozen=True)
class _Patch:
    module: str
    attribute: str
    original: Any
    replacement: Any
    owner: Any  # the module or class whose attribute is replaced


_lock = threading.Lock()
_active: list[_Patch] = []
_warned: set[str] = set()


def is_installed() -> bool:
    return bool(_active)


def install() -> None:
    """Patch DeepLabCut's load and save paths (idempotent). Raises :class:`PluginError` on a missing hook."""
    with _lock:
        if _active:
            return
        patches = _plan_patches()
        for patch in patches:
            setattr(patch.owner, patch.attribute, patch.replacement)
        _active.extend(patches)


def uninstall() -> None:
    """Put back every object :func:`install` replaced (identity, not copies)."""
    with _lock:
        for patch in reversed(_active):
            setattr(patch.owner, patch.attribute, patch.original)
        _active.clear()


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """``with enabled(): deeplabcut.evaluate_network(...)``; leaves the plugin as it found it."""
    was_installed = is_installed()
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()


def strip_loaded(snapshot: Any, source: Any) -> Any:
    """``snapshot`` with wrapper prefixes removed from its ``model`` state dict, warning once per file.

    Anything unexpected (not a dict, no ``model``, mixed prefixes) is returned unchanged,
    so DeepLabCut reports it exactly as it would without the plugin.
    """
    try:
        if not isinstance(snapshot, dict) or not isinstance(snapshot.get("model"), Mapping):
            return snapshot
        stripped, changes = transforms.strip_wrapper_prefixes(snapshot, ("model",))
    except Exception:  # whatever is odd about the file, DeepLabCut reports it in its own words
        return snapshot
    if changes:
        _warn_once(source, changes[0].prefixes)
    return stripped


def _warn_once(source: Any, prefixes: tuple[str, ...]) -> None:
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)
    key = str(Path(name).resolve()) if isinstance(source, (str, os.PathLike)) else name
    if key in _warned:
        return
    _warned.add(key)
    target = _project_of(Path(name)) if isinstance(source, (str, os.PathLike)) else None
    command = f"dlc-snapshot-fix '{target}'" if target else "dlc-snapshot-fix PROJECT"
    warnings.warn(
        f"{name}: state dict keys start with {' + '.join(repr(p) for p in prefixes)}; "
        f"dlc-snapshot-fix's plugin removed it in memory. Fix the file for good with: {command}",
        PrefixedSnapshotWarning,
        stacklevel=4,  # _warn_once, strip_loaded, our wrapper, then DeepLabCut's caller
    )


def _project_of(path: Path) -> Path | None:
    """The DeepLabCut project a snapshot belongs to: the nearest parent holding a config.yaml."""
    for parent in path.resolve().parents:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def _tolerant_attempt_snapshot_load(original: Callable[..., dict]) -> Callable[..., dict]:
    @functools.wraps(original)
    def attempt_snapshot_load(path, *args, **kwargs):
        return strip_loaded(original(path, *args, **kwargs), path)

    return attempt_snapshot_load


class _TorchWithTolerantLoad(types.ModuleType):
    """What a patched DeepLabCut module sees as ``torch``: torch itself, except ``load``."""

    def __init__(self) -> None:
        super().__init__("torch", torch.__doc__)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        return strip_loaded(torch.load(f, *args, **kwargs), f)


def _clean_update(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def update(self, epoch: int, state_dict: dict, *args, **kwargs) -> None:
        if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), Mapping):
            with contextlib.suppress(Exception):  # an odd state dict is saved as DeepLabCut gave it
                state_dict, _ = transforms.strip_wrapper_prefixes(state_dict, ("model",))
        return original(self, epoch, state_dict, *args, **kwargs)

    return update


def _plan_patches() -> list[_Patch]:
    """Find and check every hook point; raise before anything is patched if one is missing."""
    try:
        import deeplabcut
    except ImportError as error:
        raise PluginError("deeplabcut is not installed; the plugin patches DeepLabCut 3.0.x") from error
    version = getattr(deeplabcut, "__version__", "unknown")
    if version not in TESTED_VERSIONS:
        warnings.warn(
            f"dlc-snapshot-fix's plugin was tested with deeplabcut {', '.join(TESTED_VERSIONS)}, not {version}: "
            "its hook points are there, but check that prefixed snapshots load before you rely on it",
            UntestedDeepLabCutWarning,
            stacklevel=3,
        )

    def missing(hook: str) -> PluginError:
        return PluginError(
            f"deeplabcut {version} has no hook point {hook}; dlc-snapshot-fix's plugin supports "
            f"{', '.join(TESTED_VERSIONS)}. Nothing was patched. "
            "Fix snapshots on disk instead: dlc-snapshot-fix PROJECT"
        )

    def module(name: str) -> types.ModuleType:
        try:
            return importlib.import_module(f"{PACKAGE}.{name}")
        except ImportError as error:
            raise missing(f"{PACKAGE}.{name}") from error

    patches = []
    base = module("runners.base")
    original_load = getattr(base, "attempt_snapshot_load", None)
    if not callable(original_load):
        raise missing(f"{PACKAGE}.runners.base.attempt_snapshot_load")
    tolerant_load = _tolerant_attempt_snapshot_load(original_load)
    for name in ("runners.base", "runners.train", "runners"):
        owner = module(name)
        if getattr(owner, "attempt_snapshot_load", None) is not original_load:
            raise missing(f"{PACKAGE}.{name}.attempt_snapshot_load")
        patches.append(_Patch(f"{PACKAGE}.{name}", "attempt_snapshot_load", original_load, tolerant_load, owner))

    torch_view = _TorchWithTolerantLoad()
    for name, function in (
        ("models.model", "PoseModel.build"),
        ("models.detectors.base", "_build_detector"),
        ("apis.export", "export_model"),
    ):
        owner = module(name)
        target: Any = owner
        for part in function.split("."):
            target = getattr(target, part, None)
        if (
            getattr(owner, "torch", None) is not torch
            or target is None
            or "torch.load(" not in inspect.getsource(target)
        ):
            raise missing(f"{PACKAGE}.{name}.{function} (its torch.load call)")
        patches.append(_Patch(f"{PACKAGE}.{name}", "torch", torch, torch_view, owner))

    manager = getattr(module("runners.snapshots"), "TorchSnapshotManager", None)
    original_update = getattr(manager, "update", None)
    if original_update is None:
        raise missing(f"{PACKAGE}.runners.snapshots.TorchSnapshotManager.update")
    patches.append(
        _Patch(f"{PACKAGE}.runners.snapshots", "update", original_update, _clean_update(original_update), manager)
    )
    return patches
