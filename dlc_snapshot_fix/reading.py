"""Read snapshots without ever running code from them.

Two readers. :func:`read_recorded` reads a snapshot as ``torch.load(weights_only=True)``
would, without torch: tensors stay records, and it accepts only what it can prove torch
reads the same way (a pickle exactly as ``torch.save`` writes it, every storage record
where torch looks for it, every tensor inside its storage); anything else it hands to
torch (:class:`~dlc_snapshot_fix.pickled.NotRecordable`). :func:`load_snapshot` is
``torch.load(weights_only=True)`` itself, with a small explicit allow-list: numpy's scalar
and numeric dtype types, because DeepLabCut up to 3.0.0rc5 stored numpy float64 values in
``metadata["metrics"]``. Anything else a pickle asks for is refused with the names of the
offending globals. There is no automatic fallback to unsafe unpickling.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlc_snapshot_fix import fserrors, osfiles

if TYPE_CHECKING:
    from dlc_snapshot_fix.zipappend import ZipLayout

LFS_POINTER_START = b"version https://git-lfs"

NUMPY_SCALAR_NAMES = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
"""The name a pickled numpy scalar asks for: numpy 1.x writes the first, numpy 2.x the second."""
NUMPY_DTYPE_EXCLUDED = {"ObjectDType", "VoidDType", "StrDType", "StringDType", "BytesDType"}


def _numpy_scalar_reconstructor() -> Any:
    """``scalar`` from wherever this numpy keeps it (numpy 2: ``numpy._core``; numpy 1.x: ``numpy.core``)."""
    try:
        from numpy._core.multiarray import scalar  # numpy 2.x (numpy 1.26 has a shim with the same object)
    except ImportError:  # numpy < 1.26
        from numpy.core.multiarray import scalar  # type: ignore[no-redef,attr-defined,unused-ignore]
    return scalar


def _numeric_dtype_classes() -> list[Any]:
    """numpy's numeric dtype classes (``numpy.dtypes``, numpy >= 1.25); none on older numpy."""
    import numpy as np

    dtypes = getattr(np, "dtypes", None)
    if dtypes is None:
        return []
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n not in NUMPY_DTYPE_EXCLUDED]


@functools.cache
def numpy_scalar_globals() -> list[Any]:
    """What a numpy float64 (or int) in a snapshot's metadata needs to unpickle; nothing callable beyond it.

    Built on first use: importing numpy is a cost only files with numpy metadata should pay.
    """
    import numpy as np

    return [
        np.dtype,
        *((_numpy_scalar_reconstructor(), name) for name in NUMPY_SCALAR_NAMES),  # files from either numpy
        *_numeric_dtype_classes(),
    ]


@contextlib.contextmanager
def numpy_allowed() -> Iterator[None]:
    """Allow-list numpy's scalar types for the loads inside, and leave torch's allow-list exactly as it was.

    Not ``torch.serialization.safe_globals``: on exit it removes every global it was
    given, even ones registered before it (DeepLabCut registers ``numpy.dtype``, its
    ``Float64DType`` and ``scalar`` at import), so one load of ours in DeepLabCut's process
    would make DeepLabCut refuse every numpy-metrics snapshot afterwards. This adds only
    what is missing and removes only what it added.
    """
    import torch

    present = set(torch.serialization.get_safe_globals())
    added = [entry for entry in numpy_scalar_globals() if entry not in present]
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
    import torch

    path = Path(path)
    is_zip = check_within_bounds(path)
    mmap = is_zip and _every_local_header_as_miniz_reads_it(path)  # else torch reads it as DeepLabCut does
    try:
        with numpy_allowed(), osfiles.openable_by_torch(path) as name:
            loaded = torch.load(name, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise RefusedSnapshotError(path, unsafe) from error
        detail = _line_with(error, "WeightsUnpickler error") or "its pickle cannot be read"
        raise SnapshotReadError(path, f"damaged or not a torch file ({detail})", _CORRUPT_ADVICE) from error
    except OSError as error:
        raise _unreadable(path, error) from error
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


def _every_local_header_as_miniz_reads_it(path: Path) -> bool:
    """Whether torch's usual reader (not memory-mapped, the one DeepLabCut's loader uses) finds every member.

    That reader (miniz) refuses a member whose local header lacks its signature or whose
    bytes run past the end of the file; the memory-mapped reader does not look, so it loads
    files DeepLabCut cannot. The append's own local-header walk (``zipappend.data_spans``,
    stricter still) answers; where it cannot tell, the answer is no, and torch reads the
    file without a memory map: exactly as DeepLabCut does, at the cost of memory.
    """
    from dlc_snapshot_fix import zipappend

    try:
        spans = zipappend.data_spans(path, zipappend.read_layout(path).records)
        size = path.stat().st_size
    except Exception:  # a layout or header the append's reader does not take: torch's own reader decides
        return False
    return all(start + length <= size for start, length in spans)


def is_zip_snapshot(path: Path) -> bool:
    """Whether ``path`` uses torch's zip format (the default since torch 1.6) rather than the legacy one."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:  # an end record zipfile refuses outright: a zip, if a damaged one
        return True


_CORRUPT_ADVICE = "Copy it again from its source or restore it from a backup"
_OS_ADVICE = "Check the file's permissions and that the disk is mounted, then run again"


def _unreadable(path: Path, error: OSError) -> SnapshotReadError:
    """The file system refused a read: its meaning and advice (a lost share is not a permission problem)."""
    what, advice = fserrors.meaning(error)
    return SnapshotReadError(path, f"cannot be read: {what}", advice or _OS_ADVICE)


def _precheck(path: Path) -> None:
    """Cheap checks that give a better message than torch's for the usual broken files."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(LFS_POINTER_START))
    except OSError as error:
        raise _unreadable(path, error) from error
    if not head:
        raise SnapshotReadError(path, "empty file (0 bytes), probably an interrupted copy", _CORRUPT_ADVICE)
    if head.startswith(LFS_POINTER_START):
        raise SnapshotReadError(
            path, "a git-LFS pointer, not the snapshot itself", "Run `git lfs pull` in that repository first"
        )


MAX_MEMBERS = 20_000
"""torch writes one zip member per storage plus three; a DeepLabCut snapshot with optimizer state has a few thousand."""
MINIZ_FOLDER_BIT = 0x10
"""The MS-DOS folder attribute: miniz (torch's zip reader) takes a member whose external attributes carry it
(or whose name ends in ``/``) for a folder, extracts nothing, and torch keeps the buffer it allocated."""
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
    return _checked_zip(path) is not None


@dataclass
class _CheckedZip:
    """What the bounds check read of a zip, kept for the torch-free reader."""

    members: list[zipfile.ZipInfo]
    pickle_bytes: bytes
    foreign_opcodes: set[str]
    """Opcodes torch's weights-only unpickler does not run (it refuses the file on them)."""
    recorded: tuple[Any, list[str]] | None
    not_recorded: str = ""


def _checked_zip(path: Path, written_here: bytes | None = None) -> _CheckedZip | None:
    _precheck(path)
    try:
        if not zipfile.is_zipfile(path):  # (raises, not False, for a zip64 end record spanning disks)
            return None
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_not_torchscript(path, [m.filename for m in members])
            _check_layout(path, members, os.path.getsize(path))  # before anything below reads a member
            _check_members(path, [m.filename for m in members])
            pickle_member = next(m for m in members if m.filename.rsplit("/", 1)[-1] == "data.pkl")
            pickle_bytes = archive.read(pickle_member)
            foreign = set() if pickle_bytes == written_here else _check_pickle_opcodes(path, pickle_bytes)
            recorded, why_not = _check_pickle_objects(path, pickle_bytes)
    except (zipfile.BadZipFile, OSError, ValueError, StopIteration, EOFError, RuntimeError) as error:
        raise SnapshotReadError(path, f"damaged or not a torch file ({_first_line(error)})", _CORRUPT_ADVICE) from error
    return _CheckedZip(members, pickle_bytes, foreign, recorded, why_not)


@dataclass(frozen=True)
class RecordedSnapshot:
    """A snapshot read without torch: tensors as records, with the file's pickle and directory."""

    snapshot: Any
    storage_order: list[str]
    pickle: bytes
    layout: ZipLayout


def read_recorded(path: Path, *, written_here: bytes | None = None) -> RecordedSnapshot:
    """Read ``path`` as ``torch.load(weights_only=True)`` reads it, without torch and without tensor data.

    Refuses (:class:`SnapshotReadError`) what the bounds check refuses, as
    :func:`load_snapshot` does. Accepts only a file it can prove torch reads the same way:
    a ``data.pkl`` of the opcodes torch's weights-only unpickler runs, holding globals it
    allows, exactly as ``torch.save`` writes it; the records torch reads beside it
    (``version``, ``byteorder``, ``.storage_alignment``) as torch writes them; every
    storage a stored record where torch looks for it (``<archive>/data/<key>``, its local
    header intact, its bytes inside the file, exactly as long as the storage); every tensor
    inside its storage. Anything else raises
    :class:`~dlc_snapshot_fix.pickled.NotRecordable`: torch's own loader must judge it.
    ``written_here``: the ``data.pkl`` this tool just wrote (pickled from what it read):
    found byte for byte, it is neither scanned nor pickled again to prove it is what a
    pickler writes (it is that); it is still unpickled, to compare with what was meant.
    """
    from dlc_snapshot_fix import pickled, zipappend

    path = Path(path)
    checked = _checked_zip(path, written_here)
    if checked is None:
        raise pickled.NotRecordable("torch's legacy (not zip) format")
    if checked.foreign_opcodes:
        raise pickled.NotRecordable(f"pickle opcodes {', '.join(sorted(checked.foreign_opcodes))}")
    if checked.recorded is None:
        raise pickled.NotRecordable(checked.not_recorded)
    snapshot, order = checked.recorded
    if checked.pickle_bytes != written_here:
        pickled.require_canonical(snapshot, order, checked.pickle_bytes)
    try:
        layout = zipappend.read_layout(path)
        _check_torch_records(path, layout, checked, snapshot)
    except zipappend.NotAppendable as error:
        raise pickled.NotRecordable(str(error)) from error
    except OSError as error:
        raise _unreadable(path, error) from error
    return RecordedSnapshot(snapshot, order, checked.pickle_bytes, layout)


TORCH_OPCODES = frozenset(
    [
        "GLOBAL",
        "NEWOBJ",
        "REDUCE",
        "BUILD",
        "APPEND",
        "APPENDS",
        "SETITEM",
        "SETITEMS",
        "MARK",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "NONE",
        "NEWFALSE",
        "NEWTRUE",
        "EMPTY_TUPLE",
        "EMPTY_LIST",
        "EMPTY_DICT",
        "EMPTY_SET",
        "BININT",
        "BININT1",
        "BININT2",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINSTRING",
        "BINPERSID",
        "BINGET",
        "LONG_BINGET",
        "BINPUT",
        "LONG_BINPUT",
        "LONG1",
        "PROTO",
        "STOP",
    ]
)
"""The opcodes ``torch._weights_only_unpickler`` runs; it refuses a pickle with any other."""
TORCH_FORMAT_VERSIONS = (b"1", b"2", b"3", b"1\n", b"2\n", b"3\n")
"""``version`` records torch has written (``3\n`` since torch 1.6); another is torch's to judge."""
MAX_INT64 = 2**63 - 1
SERIAL = ".data/serialization_id"


def _check_torch_records(path: Path, layout: ZipLayout, checked: _CheckedZip, snapshot: Any) -> None:
    """The zip around the pickle, as torch reads it: see :func:`read_recorded`."""
    from dlc_snapshot_fix import pickled, zipappend

    if [(r.name, r.header_offset) for r in layout.records] != [(m.filename, m.header_offset) for m in checked.members]:
        raise pickled.NotRecordable("Python's zipfile and this reader see different members")
    if not all(record.plain for record in layout.records):
        raise pickled.NotRecordable("a member compressed, encrypted or on another disk")
    root = layout.records[0].name.split("/", 1)[0]  # torch's archive name: the first member's folder
    by_name = {r.name: r for r in layout.records}
    if any(not name.startswith(f"{root}/") for name in by_name) or f"{root}/data.pkl" not in by_name:
        raise pickled.NotRecordable("members outside the archive's one folder")
    torch_reads = [f"{root}/{n}" for n in ("version", ".data/version", "byteorder", ".storage_alignment", SERIAL)]
    if any(by_name[name].size > 64 for name in torch_reads if name in by_name):
        raise pickled.NotRecordable("a record torch reads beside the pickle is longer than torch writes it")
    small = {
        name.split("/", 1)[1]: zipappend.read_member(path, layout, by_name[name])
        for name in torch_reads
        if name in by_name
    }
    version = small.get(".data/version", small.get("version"))
    if version not in TORCH_FORMAT_VERSIONS:
        raise pickled.NotRecordable(f"format version {version!r}")
    if small.get("byteorder", b"little") != b"little":
        raise pickled.NotRecordable(f"byte order {small.get('byteorder')!r}")
    if not re.fullmatch(rb"[0-9]{1,8}", small.get(".storage_alignment", b"64")):
        raise pickled.NotRecordable(f"storage alignment {small.get('.storage_alignment')!r}")
    if not re.fullmatch(rb"[0-9]{0,64}", small.get(SERIAL, b"")):  # torch.load decodes it as text
        raise pickled.NotRecordable(f"serialization id {small.get(SERIAL)!r}")
    storages = _checked_tensors(pickled.records_in(snapshot))
    wanted = {f"{root}/data/{key}": storage for key, storage in storages.items()}
    missing = sorted(set(wanted) - set(by_name))
    if missing:
        raise pickled.NotRecordable(f"no record {missing[0]} for a storage its pickle names")
    with open(path, "rb") as stream:
        if stream.read(4) != struct.pack("<I", zipappend.LOCAL_SIG):
            raise pickled.NotRecordable("it does not start with a zip local header (torch.load checks that first)")
    spans = dict(zip(by_name, zipappend.data_spans(path, layout.records), strict=True))  # every local header
    if any(start + length > layout.size for start, length in spans.values()):
        raise pickled.NotRecordable("a record runs past the end of the file")
    for name, storage in wanted.items():
        if spans[name][1] != storage.numel * storage.storage_type.itemsize:
            raise pickled.NotRecordable(f"record {name} does not hold its storage's {storage.numel} elements")


def _checked_tensors(records: list[Any]) -> dict[str, Any]:
    """Each storage once (by key), after checking every tensor as ``_rebuild_tensor_v2`` and ``set_`` would."""
    from dlc_snapshot_fix import pickled

    storages: dict[str, Any] = {}
    for record in records:
        args = record.args
        if len(args) != 6:
            raise pickled.NotRecordable("a tensor with tensor metadata")
        storage, offset, size, stride, requires_grad, hooks = args
        first = storages.setdefault(storage.key, storage)
        if (first.storage_type, first.numel) != (storage.storage_type, storage.numel):
            raise pickled.NotRecordable(f"storage {storage.key} named with two types or lengths")
        if not (
            _whole(offset)
            and type(size) is tuple
            and type(stride) is tuple
            and len(size) == len(stride) <= 64
            and all(map(_whole, size))
            and all(map(_whole, stride))
            and requires_grad is False
            and type(hooks) is OrderedDict
            and not hooks
            and not vars(hooks)
        ):
            raise pickled.NotRecordable(f"a tensor torch.save does not write: {args[1:]!r}")
        if 0 in size:
            inside = offset <= storage.numel
        else:
            inside = offset + sum((n - 1) * step for n, step in zip(size, stride, strict=True)) < storage.numel
        if not inside:
            raise pickled.NotRecordable(f"a tensor outside its storage {storage.key}")
    return storages


def _whole(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_INT64


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
        if member.external_attr & MINIZ_FOLDER_BIT or member.filename.endswith("/"):
            raise _beyond(
                path,
                f"member {member.filename!r} is marked as a folder in the zip directory",
                "torch's reader (DeepLabCut's too) reads no bytes for a folder: it would use uninitialized memory "
                "in place of that member, silently",
            )
        if member.header_offset < end or member.header_offset + member.compress_size > size:
            raise _beyond(path, f"member {member.filename!r} overlaps another or runs past the end of the file")
        end = member.header_offset + member.compress_size
        if member.filename.endswith("data.pkl") and member.file_size > MAX_PICKLE_BYTES:
            raise _beyond(path, f"its data.pkl declares {member.file_size} bytes, over {MAX_PICKLE_BYTES}")


MEMO_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _opcode_table() -> dict[int, tuple[str, int | None]]:
    """Opcode byte -> (name, argument width) for :data:`TORCH_OPCODES`.

    Width -1 or -4: a length of that many bytes, then the data; 0: GLOBAL's two lines.
    """
    widths = {"uint1": 1, "uint2": 2, "int4": 4, "uint4": 4, "float8": 8, "string1": -1, "long1": -1}
    widths |= {"unicodestring4": -4, "stringnl_noescape_pair": 0}
    table: dict[int, tuple[str, int | None]] = {}
    for opcode in pickletools.opcodes:
        if opcode.name in TORCH_OPCODES:
            width = widths[opcode.arg.name] if opcode.arg is not None else None
            table[ord(opcode.code)] = (opcode.name, width)
    return table


_OPCODES = _opcode_table()


def _only_torch_opcodes(data: bytes) -> bool:
    """The quick scan: only opcodes torch's unpickler runs, memo indices within the pickle, ending in ``STOP``.

    A tenth of the time of ``pickletools.genops``; anything else (``False``) gets the full
    scan, which says what is wrong.
    """
    position, table, memo_names = 0, _OPCODES, MEMO_OPCODES
    try:
        while True:
            name, width = table[data[position]]
            position += 1
            if width is None:
                if name == "STOP":
                    return True
            elif width > 0:
                if name in memo_names and int.from_bytes(data[position : position + width], "little") > len(data):
                    return False
                position += width
            elif width < 0:
                position += -width + int.from_bytes(data[position : position - width], "little")
            else:
                position = data.index(b"\n", data.index(b"\n", position) + 1) + 1
    except (KeyError, IndexError, ValueError):  # an opcode torch does not run, a cut-short or unterminated pickle
        return False


def _check_pickle_opcodes(path: Path, data: bytes) -> set[str]:
    """Only opcodes of pickle protocol 2 (what ``torch.save`` writes), and memo indices a pickle of this size can use.

    No sets, frames or out-of-band buffers; and since Python's unpickler sizes its memo
    by the largest index it is given, a 6-byte ``LONG_BINPUT`` of 72 million would take
    over 1 GiB (found by the fuzz suite): torch.save numbers its memo from 0, one per object.
    Returns the opcodes torch's weights-only unpickler does not run (it refuses them).
    """
    if _only_torch_opcodes(data):
        return set()
    names = set()
    for opcode, argument, _ in pickletools.genops(data):
        names.add(opcode.name)
        if opcode.proto > 2:
            raise _beyond(
                path, f"its data.pkl uses pickle opcode {opcode.name} (protocol {opcode.proto}); torch.save writes 2"
            )
        if opcode.name in MEMO_OPCODES and not 0 <= int(argument or 0) <= len(data):
            raise _beyond(path, f"its data.pkl uses memo index {argument}, beyond any pickle of {len(data)} bytes")
    return names - TORCH_OPCODES


def _check_pickle_objects(path: Path, data: bytes) -> tuple[tuple[Any, list[str]] | None, str]:
    """Unpickle with the recording reader first: what could crash numpy or torch in C is refused before them.

    Returns what it read (tensors as records, storage order), or ``None`` and why not.
    """
    from dlc_snapshot_fix import pickled  # (pickled builds on this module's allow-list)

    try:
        return pickled.loads(data), ""
    except pickled.NeverWritten as error:
        raise _beyond(path, f"its data.pkl holds {error}", "numpy would crash the process reading it") from error
    except pickled.NotRecordable as error:
        return None, str(error)  # something only torch's own loader reads (or refuses): it decides next


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
        import torch

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
