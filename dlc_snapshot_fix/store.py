"""Keep the original, then replace a snapshot atomically: the only code that writes snapshots.

The order is what makes a crash at any instant harmless:

1. the original's bytes are kept under ``.dlc-snapshot-fix/backups/`` (a hard link to
   the original inode where the file system allows it, so nothing is copied and the
   bytes cannot differ; a full copy, fsynced, elsewhere) and recorded in the manifest;
2. the new snapshot is written to a hidden temp file in the snapshot's own folder and
   fsynced;
3. ``os.replace`` swaps it in under the same name, and the folder is fsynced
   (:mod:`dlc_snapshot_fix.osfiles` says what each of these is on each platform).

Before step 3 the snapshot path still holds the original; after it, the complete new
file. The original inode is never opened for writing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import errno
import hashlib
import io
import json
import os
import secrets
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path, PureWindowsPath
from typing import IO, Any, cast

from dlc_snapshot_fix import __version__, names, osfiles

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """The file's sha256. The whole file is asked of the disk at once (``POSIX_FADV_WILLNEED``): it is read
    while the first chunks are hashed, rather than chunk after chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        osfiles.will_need(stream.fileno(), 0, 0)
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashAhead:
    """The sha256 of the next original to rewrite, read and hashed in a second thread.

    A rewrite waits on the disk twice: reading the original (cold) and writing the new file
    (``fsync``). Hashed ahead, the next original is read while the current file is written.
    A hash is used only if the file's identity (inode, size, mtime) is what it was when the
    hashing started; otherwise, or on any error, the file is hashed again where it is asked for.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dlc-snapshot-fix-hash")
        self._pending: dict[Path, tuple[tuple[int, int, int], concurrent.futures.Future[str]]] = {}

    def start(self, path: Path) -> concurrent.futures.Future[str] | None:
        """Begin hashing ``path`` (a snapshot about to be rewritten, as far as one can tell); the hashing's future."""
        if path not in self._pending:
            with contextlib.suppress(OSError):
                self._pending[path] = (file_identity(path), self._pool.submit(sha256_of, path))
        return self._pending[path][1] if path in self._pending else None

    def sha256_of(self, path: Path) -> str:
        """``path``'s sha256: the one hashed ahead if the file is unchanged since, else hashed now."""
        identity, future = self._pending.pop(path, (None, None))
        if future is not None:
            with contextlib.suppress(OSError):
                digest = future.result()
                if file_identity(path) == identity:
                    return digest
        return sha256_of(path)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


def file_identity(path: Path) -> tuple[int, int, int]:
    """Inode, size and mtime: a replace, an append or an in-place write all change it."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


END_WINDOW = 64 * 1024


def end_sha256(path: Path, size: int) -> str:
    """sha256 of bytes ``[size - 64 KiB, size)``: a torch zip's central directory, which holds every member's CRC."""
    with open(path, "rb") as stream:
        stream.seek(max(0, size - END_WINDOW))
        return hashlib.sha256(stream.read(min(size, END_WINDOW))).hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable (a no-op where folders cannot be opened)."""
    osfiles.flush_dir(folder)


def keep_original(snapshot: Path, backup: Path, sha256: str, *, link: bool = True, then_writing: int = 0) -> str:
    """Keep ``snapshot``'s current bytes at ``backup``; return how (``"hardlink"``, ``"copy"`` or ``"existing"``).

    A hard link where allowed (and ``link``), else a copy that is fsynced and checked
    against ``sha256`` before it takes the backup's name. An existing backup with the
    same content (an earlier, interrupted run) is reused. Before a copy, the space for it
    and for the ``then_writing`` bytes of the new file to follow is checked: a drive that
    cannot hold both refuses before either is written.
    """
    if backup.exists():
        if sha256_of(backup) == sha256:
            return "existing"
        raise FileExistsError(f"{backup} exists with other content; move it away and run again")
    backup.parent.mkdir(parents=True, exist_ok=True)
    method = "copy"
    if link:
        try:
            os.link(snapshot, backup)
            method = "hardlink"
        except OSError:  # any refusal (exFAT and FAT say EINVAL or EPERM, shares EXDEV...): a verified copy instead
            pass
    if method == "copy":
        what = "a copy of the original" + (" and the new file" if then_writing else "")
        ensure_space(backup.parent, snapshot.stat().st_size + then_writing, what)
        partial = names.temp_path(backup, secrets.token_hex(4))
        try:
            with open(snapshot, "rb") as source, open(partial, "xb") as target:
                shutil.copyfileobj(source, target, CHUNK)
                target.flush()
                osfiles.flush_fd(target.fileno())
            if sha256_of(partial) != sha256:
                raise OSError(f"copy of {snapshot} to {partial} does not match the original")
            osfiles.replace(partial, backup)
        finally:
            partial.unlink(missing_ok=True)
    fsync_dir(backup.parent)
    return method


class NotEnoughSpaceError(OSError):
    """Checked before writing: the file system cannot hold what the next step writes."""

    worded = True
    """Its message says what happened in full (:func:`fserrors.meaning` adds only the advice)."""

    def __init__(self, folder: Path, needed: int, free: int, what: str = ""):
        for_what = f" for {what}" if what else ""
        super().__init__(
            errno.ENOSPC,
            f"not enough space in {folder}: {needed / 2**20:.0f} MiB needed{for_what}, {free / 2**20:.0f} MiB free",
        )


def space_needed(size: int) -> int:
    """Room to ask for before writing ``size`` bytes: the bytes plus 1% or 4 MiB of slack for the file system."""
    return size + max(size // 100, 4 << 20)


def ensure_space(folder: Path, size: int, what: str = "") -> None:
    """Refuse before writing ``size`` bytes (``what`` they are, for the message) where they do not fit."""
    free = shutil.disk_usage(folder).free
    if free < space_needed(size):
        raise NotEnoughSpaceError(folder, space_needed(size), free, what)


def ensure_writable(folder: Path) -> None:
    """Fail before keeping a backup when the folder cannot take the new file (read-only mount, permissions)."""
    if not os.access(folder, os.W_OK):
        code = errno.EROFS if osfiles.read_only(folder) else errno.EACCES
        raise OSError(code, f"{os.strerror(code)}: cannot write in {folder}")


def stale_temps(folders: list[Path]) -> list[Path]:
    """Temp files of ours in ``folders``: left by an interrupted run, unless another run is writing now."""
    return [
        entry
        for folder in folders
        for entry in folder.glob(".*" + names.TEMP_SUFFIX)
        if names.is_temp_name(entry.name) and entry.is_file()
    ]


def remove_stale_temps(folders: list[Path]) -> int:
    """Delete temp files an interrupted run left; call only while holding the project's lock."""
    stale = stale_temps(folders)
    for entry in stale:
        entry.unlink(missing_ok=True)
    return len(stale)


def write_temp(
    target: Path, snapshot: dict[str, Any], *, zip_format: bool = True, expected_size: int | None = None
) -> tuple[Path, str]:
    """Write ``snapshot`` with ``torch.save`` to a fsynced temp file beside ``target``; return it and its sha256.

    The temp file gets ``target``'s permission bits (when it exists) and the format asked
    for (zip, or torch's legacy one). Free space for ``expected_size`` (default: the size
    of ``target``) is checked first. On any error the temp file is removed and the error
    raised; ``target`` is never touched.
    """
    import torch  # here, not at the top: reports and manifests are written without torch

    ensure_space(target.parent, target.stat().st_size if expected_size is None else expected_size)
    temp = names.temp_path(target, secrets.token_hex(4))
    try:
        with open(temp, "xb") as stream:
            hashing = _HashingWriter(stream)
            try:
                torch.save(snapshot, cast(IO[bytes], hashing), _use_new_zipfile_serialization=zip_format)
            except RuntimeError as error:
                raise _os_error_behind(error) from error
            stream.flush()
            osfiles.flush_fd(stream.fileno())
        if target.exists():
            with contextlib.suppress(OSError):
                os.chmod(temp, target.stat().st_mode & 0o7777)
        if hashing.position != temp.stat().st_size:  # torch wrote out of order: hash the file instead
            return temp, sha256_of(temp)
        return temp, hashing.digest.hexdigest()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_rezipped(target: Path, plan: Any, new_pickle: bytes, check: Callable[[Path], None]) -> tuple[Path, str]:
    """The rewrite at copy speed (:mod:`dlc_snapshot_fix.rezip`) into a fsynced temp file beside ``target``.

    While the kernel writes the file to disk (``fsync``, in a second thread), this one
    reads it back from memory: its sha256 (returned) and ``check``, which raises if the
    file is not what was meant. Both must finish before the temp file is returned. On any
    error the temp file is removed; ``target`` is never touched.
    """
    from dlc_snapshot_fix import rezip

    head, tail = rezip.build(plan, new_pickle)
    ensure_space(target.parent, len(head) + plan.layout.directory_offset - plan.copy_from + len(tail))
    temp = names.temp_path(target, secrets.token_hex(4))
    try:
        rezip.write(plan, target, temp, head, tail)
        with contextlib.suppress(OSError):
            os.chmod(temp, target.stat().st_mode & 0o7777)
        with concurrent.futures.ThreadPoolExecutor(1) as disk:
            synced = disk.submit(osfiles.flush_path, temp)
            try:
                sha256 = sha256_of(temp)
                check(temp)
            finally:
                synced.result()
        return temp, sha256
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what passes through: the new file's sha256 without reading it again."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.digest = hashlib.sha256()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        written = self.stream.write(data)
        self.digest.update(memoryview(data)[:written])
        self.position += written
        return written

    def flush(self) -> None:
        """Also called when the writer is garbage-collected (Python 3.13: after the file is closed): then a no-op."""
        if not self.stream.closed:
            self.stream.flush()


def write_text_atomically(path: Path, text: str, *, make_folders: bool = True) -> None:
    """A small file (manifest, report) written to a temp file, fsynced, swapped in: whole or not at all."""
    if make_folders:
        path.parent.mkdir(parents=True, exist_ok=True)
    temp = names.temp_path(path, secrets.token_hex(4))
    try:
        with open(temp, "x", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            osfiles.flush_fd(stream.fileno())
        osfiles.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def commit_temp(temp: Path, target: Path) -> None:
    """Swap the finished temp file in under ``target``'s name (atomic) and make the rename durable."""
    try:
        osfiles.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _os_error_behind(error: BaseException) -> BaseException:
    """torch's zip writer reports a full disk as ``RuntimeError: unexpected pos``; surface the OSError behind it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def put_back(backup: Path, target: Path) -> None:
    """Atomically move the kept original from ``backup`` back to ``target``.

    A move, not a link: a hard link left between the two would let a later in-place
    ``torch.save`` to ``target`` (DeepLabCut rewriting a snapshot) change the backup too.
    """
    try:
        osfiles.replace(backup, target)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        temp = names.temp_path(target, secrets.token_hex(4))
        try:
            shutil.copy2(backup, temp)
            with open(temp, "rb+") as stream:
                osfiles.flush_fd(stream.fileno())
            osfiles.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        backup.unlink()
    fsync_dir(target.parent)


@dataclass
class ManifestEntry:
    """One rewrite of one snapshot: enough to find, check and put back the original."""

    path: str
    """The snapshot, relative to the project."""
    backup: str
    """The kept original, relative to the project (for ``append``: the snapshot itself, whose first bytes it is)."""
    sha256_before: str | None
    """The original's sha256 (``None`` for ``append``, which does not read the tensor bytes)."""
    sha256_after: str | None
    backup_method: str
    tool_version: str
    time: str
    change: str
    renamed_from: str | None = None
    """For a rename, the original path (relative to the project); ``path`` is then the new one."""
    original_size: int | None = None
    """``append`` only: the original's size; truncating to it gives back the original."""
    original_end_sha256: str | None = None
    """``append`` only: sha256 of the original's last 64 KiB (its central directory, with every member's CRC)."""
    state: str = "pending"
    """``pending``: original kept, new file not yet written. ``writing``: new file written
    (its sha256 recorded) and being swapped in; either may be at the path. ``done``: swapped
    in and read back. ``restored``: the original is back. A killed run leaves the first two."""


ENTRY_FIELDS = tuple(field.name for field in fields(ManifestEntry))
"""Every field of a manifest entry, in the order they are saved (each a string, a number or ``None``)."""


def _portable(entry: ManifestEntry) -> ManifestEntry:
    """Paths in POSIX form, whichever system wrote them: a project migrated on Windows restores on Linux.

    Manifests are written with ``/``; those written before (on Windows, with ``\\``) are read
    as Windows paths. No name this tool or DeepLabCut gives a project's files holds a backslash.
    """
    for field in ("path", "backup", "renamed_from"):
        value = getattr(entry, field)
        if value is not None and "\\" in value:
            setattr(entry, field, PureWindowsPath(value).as_posix())
    return entry


class ManifestError(RuntimeError):
    """The project's manifest cannot be read; no snapshot is touched until it is repaired."""


class Manifest:
    """The project's record of rewrites, ``.dlc-snapshot-fix/manifest.json``, saved atomically."""

    def __init__(self, project: Path, guard: Callable[[], None] | None = None):
        self.project = project
        self.path = names.manifest_path(project)
        self._guard = guard
        """Called before each save: raises if the project's file system went away (nothing is written then)."""
        self.entries: list[ManifestEntry] = []
        self._texts: dict[int, tuple[ManifestEntry, tuple, str]] = {}
        """Each entry's JSON text as last saved, with the field values it was made from (see :meth:`_text`)."""
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = [_portable(ManifestEntry(**entry)) for entry in data["entries"]]
            except (ValueError, KeyError, TypeError) as error:
                raise ManifestError(
                    f"{self.path}: unreadable ({error}). Nothing was changed; the backups next to it are "
                    "intact. Repair or move the manifest away, then run again"
                ) from error

    def add(
        self,
        snapshot: Path,
        backup: Path,
        sha256_before: str | None,
        backup_method: str,
        change: str,
        renamed_from: Path | None = None,
        original_size: int | None = None,
        original_end_sha256: str | None = None,
        state: str = "pending",
    ) -> ManifestEntry:
        """Record a change about to be made, durably (the journal), before any byte of it is written."""
        entry = ManifestEntry(
            renamed_from=renamed_from.relative_to(self.project).as_posix() if renamed_from else None,
            original_size=original_size,
            original_end_sha256=original_end_sha256,
            path=snapshot.relative_to(self.project).as_posix(),
            backup=backup.relative_to(self.project).as_posix(),
            sha256_before=sha256_before,
            sha256_after=None,
            backup_method=backup_method,
            tool_version=__version__,
            time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            change=change,
            state=state,
        )
        self.entries.append(entry)
        self.save()
        return entry

    def save(self) -> None:
        """Write the manifest in its folder (made by the project's lock, never here: see :class:`osfiles.Volume`)."""
        if self._guard is not None:
            self._guard()
        write_text_atomically(self.path, self._text(), make_folders=False)

    def _text(self) -> str:
        """``json.dumps({"format": 1, "entries": [...]}, indent=2)``, byte for byte, from each entry's text as last
        serialised: a save re-serialises only the entries that changed since (a run saves two or three times per
        snapshot; serialising every entry each time made a project's CPU per snapshot grow with its size)."""
        if not self.entries:
            return json.dumps({"format": 1, "entries": []}, indent=2)
        texts = []
        for entry in self.entries:
            values = tuple(getattr(entry, name) for name in ENTRY_FIELDS)
            kept = self._texts.get(id(entry))
            if kept is None or kept[0] is not entry or kept[1] != values:
                text = textwrap.indent(json.dumps(dict(zip(ENTRY_FIELDS, values, strict=True)), indent=2), "    ")
                kept = self._texts[id(entry)] = (entry, values, text)
            texts.append(kept[2])
        return '{\n  "format": 1,\n  "entries": [\n' + ",\n".join(texts) + "\n  ]\n}"
