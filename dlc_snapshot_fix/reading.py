"""Read snapshots without ever running code from them.

Every load is ``torch.load(weights_only=True)`` with a small explicit allow-list:
numpy's scalar and numeric dtype types, because DeepLabCut up to 3.0.0rc5 stored
numpy float64 values in ``metadata["metrics"]``. Anything else a pickle asks for is
refused with the names of the offending globals. There is no automatic fallback to
unsafe unpickling.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

LFS_POINTER_START = b"version https://git-lfs"

NUMPY_SCALAR_NAMES = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
"""The name a pickled numpy scalar asks for: numpy 1.x writes the first, numpy 2.x the second."""
NUMPY_DTYPE_EXCLUDED = {"ObjectDType", "VoidDType", "StrDType", "StringDType", "BytesDType"}


def _numpy_scalar_reconstructor() -> Any:
    """``scalar`` from wherever this numpy keeps it (numpy 2: ``numpy._core``; numpy 1.x: ``numpy.core``)."""
    try:
        from numpy._core.multiarray import scalar  # numpy 2.x (numpy 1.26 has a shim with the same object)
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import scalar
    return scalar


def _numeric_dtype_classes() -> list[Any]:
    """numpy's numeric dtype classes (``numpy.dtypes``, numpy >= 1.25); none on older numpy."""
    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:
        return []
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n not in NUMPY_DTYPE_EXCLUDED]


NUMPY_SCALAR_GLOBALS: list[Any] = [
    np.dtype,
    *((_numpy_scalar_reconstructor(), name) for name in NUMPY_SCALAR_NAMES),  # files from either numpy
    *_numeric_dtype_classes(),
]
"""What a numpy float64 (or int) in a snapshot's metadata needs to unpickle; nothing callable beyond it."""


@contextlib.contextmanager
def numpy_allowed() -> Iterator[None]:
    """Allow-list numpy's scalar types for the loads inside, and leave torch's allow-list exactly as it was.

    Not ``torch.serialization.safe_globals``: on exit it removes every global it was
    given, even ones registered before it (DeepLabCut registers ``numpy.dtype``, its
    ``Float64DType`` and ``scalar`` at import), so one load of ours in DeepLabCut's process
    would make DeepLabCut refuse every numpy-metrics snapshot afterwards. This adds only
    what is missing and removes only what it added.
    """
    present = set(torch.serialization.get_safe_globals())
    added = [entry for entry in NUMPY_SCALAR_GLOBALS if entry not in present]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        keep = [entry for entry in torch.serialization.get_safe_globals() if entry not in added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(keep)


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
    is_zip = check_within_bounds(path)
    try:
        with numpy_allowed():
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


MAX_MEMBERS = 20_000
"""torch writes one zip member per storage plus three; a DeepLabCut snapshot with optimizer state has a few thousand."""
MAX_PICKLE_BYTES = 2 << 20
"""A DeepLabCut snapshot's ``data.pkl`` takes 30-300 KB. Unpickling can multiply a pickle's size ~80 times in
memory (one byte of pickle, one empty dict), so this bound keeps any reader within ~170 MiB."""


def check_within_bounds(path: Path) -> bool:
    """Refuse, before any reader allocates what a file declares, what ``torch.save`` never writes.

    Cheap checks for the usual broken files (empty, git-LFS pointer), then for a zip:
    no TorchScript, no member names that make readers disagree, at most
    :data:`MAX_MEMBERS` members, every member stored (never compressed: a few megabytes
    of DEFLATE can expand to gigabytes), inside the file and not overlapping another (so
    no reader reads more than the file's size), a ``data.pkl`` of at most
    :data:`MAX_PICKLE_BYTES` using only the pickle protocol torch writes (2). Returns
    whether the file is a zip (torch's legacy format has no members to check).
    """
    _precheck(path)
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_not_torchscript(path, [m.filename for m in members])
            _check_layout(path, members, os.path.getsize(path))  # before anything below reads a member
            _check_members(path, [m.filename for m in members])
            pickle_member = next(m for m in members if m.filename.rsplit("/", 1)[-1] == "data.pkl")
            pickle_bytes = archive.read(pickle_member)
            _check_pickle_opcodes(path, pickle_bytes)
            _check_pickle_objects(path, pickle_bytes)
    except (zipfile.BadZipFile, OSError, ValueError, StopIteration, EOFError, RuntimeError) as error:
        raise SnapshotReadError(path, f"damaged or not a torch file ({_first_line(error)})", _CORRUPT_ADVICE) from error
    return True


def _check_layout(path: Path, members: list[zipfile.ZipInfo], size: int) -> None:
    if len(members) > MAX_MEMBERS:
        raise _beyond(path, f"{len(members)} zip members, over {MAX_MEMBERS}")
    end = 0
    for member in sorted(members, key=lambda m: m.header_offset):
        if member.compress_type != zipfile.ZIP_STORED:
            raise _beyond(path, f"member {member.filename!r} is compressed (torch.save stores members uncompressed)")
        if member.file_size != member.compress_size:
            raise _beyond(
                path, f"member {member.filename!r} declares {member.file_size} bytes but stores {member.compress_size}"
            )
        if member.header_offset < end or member.header_offset + member.compress_size > size:
            raise _beyond(path, f"member {member.filename!r} overlaps another or runs past the end of the file")
        end = member.header_offset + member.compress_size
        if member.filename.endswith("data.pkl") and member.file_size > MAX_PICKLE_BYTES:
            raise _beyond(path, f"its data.pkl declares {member.file_size} bytes, over {MAX_PICKLE_BYTES}")


MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _check_pickle_opcodes(path: Path, data: bytes) -> None:
    """Only opcodes of pickle protocol 2 (what ``torch.save`` writes), and memo indices a pickle of this size can use.

    No sets, frames or out-of-band buffers; and since Python's unpickler sizes its memo
    by the largest index it is given, a 6-byte ``LONG_BINPUT`` of 72 million would take
    over 1 GiB (found by the fuzz suite): torch.save numbers its memo from 0, one per object.
    """
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.proto > 2:
            raise _beyond(
                path, f"its data.pkl uses pickle opcode {opcode.name} (protocol {opcode.proto}); torch.save writes 2"
            )
        if opcode.name in MEMO_OPCODES and not 0 <= int(argument) <= len(data):
            raise _beyond(path, f"its data.pkl uses memo index {argument}, beyond any pickle of {len(data)} bytes")


def _check_pickle_objects(path: Path, data: bytes) -> None:
    """Unpickle with the recording reader first: what could crash numpy or torch in C is refused before them."""
    from dlc_snapshot_fix import pickled  # (pickled builds on this module's allow-list)

    try:
        pickled.loads(data)
    except pickled.NeverWritten as error:
        raise _beyond(path, f"its data.pkl holds {error}", "numpy would crash the process reading it") from error
    except pickled.NotRecordable:
        pass  # something only torch's own loader reads (or refuses): it decides next


def _beyond(path: Path, what: str, risk: str = "reading it could take unbounded memory or time") -> SnapshotReadError:
    return SnapshotReadError(
        path,
        f"refused: {what}. torch.save never writes that, and {risk}",
        "Do not load it; get the snapshot again from its source",
    )


def _check_not_torchscript(path: Path, members: list[str]) -> None:
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in members):
        raise SnapshotReadError(
            path,
            "a TorchScript archive (torch.jit.save), not a training snapshot",
            "DeepLabCut does not load TorchScript models as snapshots; move it out of the model folder",
        )


def _check_members(path: Path, members: list[str]) -> None:
    """Refuse zips whose member names could make readers disagree (``DATA.PKL``), or that hold no pickle."""
    pickles = [name for name in members if name.rsplit("/", 1)[-1].lower() == "data.pkl"]
    folded = collections.Counter(name.lower() for name in members)
    if len(pickles) > 1 or any(not name.endswith("data.pkl") for name in pickles) or len(folded) != len(members):
        tricky = sorted({name for name in members if folded[name.lower()] > 1} | set(pickles))
        raise ArchiveTrickError(path, tricky, _unsafe_globals(path))
    if not pickles:
        raise SnapshotReadError(path, "damaged or not a torch file (a zip without data.pkl)", _CORRUPT_ADVICE)


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the weights-only unpickler would refuse, read from the pickle without running it."""
    with contextlib.suppress(Exception), numpy_allowed():
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
