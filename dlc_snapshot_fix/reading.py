"""Read snapshots without ever running code from them.

Every load is ``torch.load(weights_only=True)`` with a small explicit allow-list:
numpy's scalar and numeric dtype types, because DeepLabCut up to 3.0.0rc5 stored
numpy float64 values in ``metadata["metrics"]``. Anything else a pickle asks for is
refused with the names of the offending globals. There is no automatic fallback to
unsafe unpickling.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LFS_POINTER_START = b"version https://git-lfs"

_NUMERIC_DTYPES = [
    getattr(np.dtypes, name)
    for name in dir(np.dtypes)
    if name.endswith("DType") and name not in {"ObjectDType", "VoidDType", "StrDType", "StringDType", "BytesDType"}
]
NUMPY_SCALAR_GLOBALS: list[Any] = [
    np.dtype,
    np._core.multiarray.scalar,
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),  # written by numpy 1.x
    *_NUMERIC_DTYPES,
]
"""What a numpy float64 (or int) in a snapshot's metadata needs to unpickle; nothing callable beyond it."""


class SnapshotReadError(Exception):
    """A snapshot cannot be read safely. The message says what is wrong and what to do."""

    def __init__(self, path: Path, problem: str, advice: str):
        self.path = Path(path)
        self.problem = problem
        self.advice = advice
        super().__init__(f"{path}: {problem}. {advice}")


class RefusedSnapshotError(SnapshotReadError):
    """The pickle names globals outside the allow-list; loading it could run code."""

    def __init__(self, path: Path, unsafe_globals: list[str]):
        self.unsafe_globals = unsafe_globals
        shown = ", ".join(unsafe_globals) if unsafe_globals else "unknown globals"
        super().__init__(
            path,
            f"refused: its pickle asks for {shown}, which weights-only loading does not allow",
            "Loading it could run code. Only if you trust where it came from, run again with --trust",
        )


class ArchiveTrickError(RefusedSnapshotError):
    """Zip member names that make different readers see different pickles (``DATA.PKL``)."""

    def __init__(self, path: Path, members: list[str], unsafe_globals: list[str]):
        super().__init__(path, unsafe_globals)
        self.members = members
        asks = f"; its pickle asks for {', '.join(unsafe_globals)}" if unsafe_globals else ""
        self.problem = (
            f"refused: zip members {', '.join(members)} differ from torch's data.pkl only by case or "
            f"repeat it, so a checker and torch.load could read different pickles{asks}"
        )
        self.advice = "Do not load it, with or without --trust; get the snapshot again from its source"
        self.args = (f"{path}: {self.problem}. {self.advice}",)


def load_snapshot(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """Load a snapshot with weights-only unpickling; tensors are memory-mapped from the file.

    Memory-mapping keeps a 95 MB (or 1 GB) snapshot out of RAM: a rewrite then holds
    at most the pages it is copying, never two copies of the snapshot. ``trust=True``
    (the CLI's ``--trust``) unpickles without the allow-list: only for files the user
    vouches for, since that can run code.
    """
    path = Path(path)
    _precheck(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        _check_members(path)
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=not trust, mmap=is_zip)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise RefusedSnapshotError(path, unsafe) from error
        detail = _line_with(error, "WeightsUnpickler error") or "its pickle cannot be read"
        raise SnapshotReadError(path, f"damaged or not a torch file ({detail})", _CORRUPT_ADVICE) from error
    except OSError as error:
        raise SnapshotReadError(path, f"cannot be read ({error.strerror or error})", _OS_ADVICE) from error
    except Exception as error:  # arbitrary bytes make torch's reader fail in arbitrary ways
        raise SnapshotReadError(path, f"damaged or not a torch file ({_first_line(error)})", _CORRUPT_ADVICE) from error
    if not isinstance(loaded, dict):
        raise SnapshotReadError(
            path,
            f"holds a {type(loaded).__name__}, not a DeepLabCut snapshot dict",
            "Snapshots are torch.save({'model': ..., 'metadata': ...}); "
            "leave this file alone or move it out of the model folder",
        )
    return loaded


def is_zip_snapshot(path: Path) -> bool:
    """Whether ``path`` uses torch's zip format (the default since torch 1.6) rather than the legacy one."""
    return zipfile.is_zipfile(path)


_CORRUPT_ADVICE = "Copy it again from its source or restore it from a backup"
_OS_ADVICE = "Check the file's permissions and that the disk is mounted, then run again"


def _precheck(path: Path) -> None:
    """Cheap checks that give a better message than torch's for the usual broken files."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(LFS_POINTER_START))
    except OSError as error:
        raise SnapshotReadError(path, f"cannot be read ({error.strerror or error})", _OS_ADVICE) from error
    if not head:
        raise SnapshotReadError(path, "empty file (0 bytes), probably an interrupted copy", _CORRUPT_ADVICE)
    if head.startswith(LFS_POINTER_START):
        raise SnapshotReadError(
            path, "a git-LFS pointer, not the snapshot itself", "Run `git lfs pull` in that repository first"
        )


def _check_members(path: Path) -> None:
    """Refuse TorchScript archives and zips whose member names could mislead a reader."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load reports a damaged file in its own words
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in members):
        raise SnapshotReadError(
            path,
            "a TorchScript archive (torch.jit.save), not a training snapshot",
            "DeepLabCut does not load TorchScript models as snapshots; move it out of the model folder",
        )
    pickles = [name for name in members if name.rsplit("/", 1)[-1].lower() == "data.pkl"]
    folded = [name.lower() for name in members]
    if len(pickles) > 1 or any(not name.endswith("data.pkl") for name in pickles) or len(set(folded)) != len(folded):
        tricky = sorted({name for name in members if folded.count(name.lower()) > 1} | set(pickles))
        raise ArchiveTrickError(path, tricky, _unsafe_globals(path))


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the weights-only unpickler would refuse, read from the pickle without running it."""
    with contextlib.suppress(Exception), torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    return []


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _line_with(error: BaseException, marker: str) -> str | None:
    """torch's weights-only errors open with advice to disable safety; keep only the diagnosis."""
    for line in str(error).splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip(" :") or None
    return None
