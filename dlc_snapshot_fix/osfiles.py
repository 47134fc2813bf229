"""Every call into the operating system that reads or writes a snapshot, and what it does on each platform.

The rest of the package asks for what it needs (a positional read, a durable flush, an
atomic rename); this module knows how each operating system gives it:

================  =====================================  ==============================================
call              Linux and macOS                        Windows
================  =====================================  ==============================================
``open_fd``       ``os.open``, close-on-exec             ``os.open`` with ``O_BINARY`` (else the C
                                                         runtime opens in text mode: LF becomes CRLF
                                                         on write, a 0x1A byte ends a read) and
                                                         ``O_NOINHERIT``
``pread``         ``os.pread``                           there is none: ``lseek`` + ``read`` under a
                                                         lock (the fd's offset is shared)
``flush_fd``      ``fsync``; on macOS ``F_FULLFSYNC``     ``os.fsync`` (``_commit``, i.e.
                  (``fsync`` there stops at the drive's  ``FlushFileBuffers``), which needs a handle
                  cache: not durable), ``fsync`` where    opened for writing
                  the file system refuses it
``flush_path``    opens read-only, flushes               opens read-write, flushes
``flush_dir``     opens the folder, flushes (a rename     nothing: folders cannot be opened this way;
                  is durable once its folder is)         NTFS journals the rename itself
``replace``       ``os.replace``                         ``os.replace``, retried for up to ~2 s while
                                                         another process (antivirus, the search
                                                         indexer) briefly holds either file, as pip
                                                         and SQLite do
``read_only``     ``statvfs`` ``ST_RDONLY``              unknown (``None``): the caller says "cannot
                                                         write" without naming why
``will_need``     Linux: ``posix_fadvise``; macOS none   none
``openable_by_``  Linux: ``/proc/self/fd/N`` where a     the path (Windows names are always valid
``torch``         name is not valid UTF-8 (``LC_ALL=C``)  Unicode)
``too_long_for_`` ``None``                               a path of 260 characters or more, unless
``windows``                                              ``LongPathsEnabled`` is set
``Volume``        ``st_dev`` of the project folder,       ``st_dev``: the volume's serial number
                  checked before each write (a share
                  that went away leaves a local folder)
``copy_range``    Linux: ``copy_file_range`` (btrfs and  read and write through this process
                  xfs clone block-aligned ranges);
                  macOS: read and write
``shared_bytes``  Linux: ``FS_IOC_FIEMAP``'s shared       ``None`` (not asked)
                  extents; macOS ``None``
================  =====================================  ==============================================

What every platform shares: a file is replaced only by ``replace`` and only after this
process has closed (and unmapped) it; a copy of a range goes through the kernel where it
can (``copy_file_range``) and through ``pread``/``write`` where it cannot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

WINDOWS = sys.platform == "win32"
_BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_CLOEXEC", 0)
_SEEK_LOCK = threading.Lock()
REPLACE_RETRY_S = 2.0
"""How long ``replace`` keeps retrying a sharing violation on Windows before the error stands."""
_SHARING_VIOLATIONS = {5, 32, 33}  # ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION


def open_fd(path: Path | str, flags: int, mode: int = 0o666) -> int:
    """``os.open`` in binary mode on every platform (Windows' default is text)."""
    return os.open(path, flags | _BINARY, mode)


def pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` of ``fd``, without moving a position anyone relies on."""
    positional = getattr(os, "pread", None)  # looked up per call: absent on Windows (and in the tests' Windows mode)
    if positional is not None:
        return positional(fd, size, offset)
    with _SEEK_LOCK:  # the fd's position is shared: no other thread of ours may move it in between
        os.lseek(fd, offset, os.SEEK_SET)
        chunks, wanted = [], size
        while wanted > 0:
            chunk = os.read(fd, wanted)
            if not chunk:
                break
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks)


def flush_fd(fd: int) -> None:
    """Make what was written through ``fd`` durable (``fd`` must be writable on Windows)."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)  # the flush that reaches the disk, not only its cache
            return
        except OSError:  # a file system that does not support it (some network mounts): fsync is the best there
            pass
    os.fsync(fd)


def will_need(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading a range now (Linux ``posix_fadvise``; a no-op where there is none)."""
    fadvise = getattr(os, "posix_fadvise", None)  # looked up per call, as ``pread``
    if fadvise is not None:
        fadvise(fd, offset, length, getattr(os, "POSIX_FADV_WILLNEED", 3))


def flush_path(path: Path | str) -> None:
    """``flush_fd`` on a file by name: opened read-write where the platform's flush needs it."""
    fd = open_fd(path, os.O_RDWR if WINDOWS else os.O_RDONLY)
    try:
        flush_fd(fd)
    finally:
        os.close(fd)


def flush_dir(folder: Path | str) -> None:
    """Make a rename or link in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    if WINDOWS:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        flush_fd(fd)
    except OSError:  # some file systems refuse to flush a folder: the rename is as durable as they make it
        pass
    finally:
        os.close(fd)


def replace(source: Path | str, target: Path | str) -> None:
    """``os.replace``; on Windows retried briefly while another process holds either file."""
    deadline = time.monotonic() + REPLACE_RETRY_S
    delay = 0.01
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError as error:
            sharing = getattr(error, "winerror", None) in _SHARING_VIOLATIONS
            if not (WINDOWS and sharing) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def truncate_fd(fd: int, size: int, path: Path | str) -> None:
    """``os.ftruncate``; on Windows a refusal because a process maps the file says so (the C runtime says EINVAL)."""
    try:
        os.ftruncate(fd, size)
    except OSError as error:
        if not (WINDOWS and error.errno == errno.EINVAL and getattr(error, "winerror", None) is None):
            raise
        raise OSError(error.errno, USER_MAPPED_FILE, os.fspath(path), USER_MAPPED_FILE_WINERROR) from error


USER_MAPPED_FILE_WINERROR = 1224
USER_MAPPED_FILE = "The requested operation cannot be performed on a file with a user-mapped section open"
"""Windows' words for ERROR_USER_MAPPED_FILE, which its C runtime reports to ``ftruncate`` as a bare EINVAL."""


def read_only(folder: Path | str) -> bool | None:
    """Whether ``folder``'s file system is mounted read-only; ``None`` where the platform cannot say."""
    statvfs = getattr(os, "statvfs", None)
    if statvfs is None:
        return None
    try:
        return bool(statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
    except OSError:
        return None


CLONE_BLOCK = 4096
"""The block size copy-on-write file systems share (btrfs, xfs, APFS; ReFS's small clusters)."""


def copy_range(source: int, target: int, offset: int, count: int, chunk: int = 1 << 20) -> None:
    """``count`` bytes from ``offset`` of ``source`` to where ``target`` stands: in the kernel where it can.

    The kernel clones whole blocks instead of copying them (btrfs, xfs: reflinks) where both
    offsets are on a block boundary: so the first call goes only up to ``source``'s next
    boundary, and the rest is cloned if ``target`` stands at the same offset modulo
    :data:`CLONE_BLOCK` (the caller's layout sees to that).
    """
    done, kernel = 0, getattr(os, "copy_file_range", None)  # Linux only
    while done < count:
        if kernel is not None:
            step = min(count - done, 1 << 30)
            if done == 0 and offset % CLONE_BLOCK:
                step = min(step, CLONE_BLOCK - offset % CLONE_BLOCK)
            try:
                copied = kernel(source, target, step, offset + done)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel = None  # a file system (or kernel) without it: through this process instead
                continue
        else:
            data = pread(source, min(chunk, count - done), offset + done)
            write_all(target, data)
            copied = len(data)
        if copied == 0:
            raise OSError(errno.EIO, "the original ended before the range to copy")
        done += copied


def write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to ``fd`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def openable_by_torch(path: Path | str) -> Iterator[str]:
    """A name torch's C++ zip reader can open for ``path`` (and memory-map): the path itself, or else the
    ``/proc/self/fd`` name of an open descriptor.

    torch passes a file name to C++ as UTF-8. Under ``LC_ALL=C`` (cron, containers, cluster
    nodes) Python decodes a folder named ``实验`` into surrogates, which UTF-8 cannot encode: torch
    then fails on a valid snapshot. Linux names the same file by its descriptor; Windows and
    macOS names are always valid Unicode, so this only arises where ``/proc`` exists.
    """
    name = os.fspath(path)
    try:
        name.encode("utf-8")
        needs_descriptor = False
    except UnicodeEncodeError:
        needs_descriptor = os.path.isdir("/proc/self/fd")
    if not needs_descriptor:
        yield name
        return
    fd = os.open(name, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


WINDOWS_MAX_PATH = 260
"""Windows' limit on a path (with its terminating NUL), unless long paths are enabled for the machine."""


def too_long_for_windows(*paths: Path) -> tuple[Path, int] | None:
    """The first of ``paths`` Windows could not create, and its length; ``None`` elsewhere or when all fit."""
    if not WINDOWS or _long_paths_enabled():
        return None
    for path in paths:
        length = len(os.path.abspath(path))
        if length >= WINDOWS_MAX_PATH:
            return path, length
    return None


def _long_paths_enabled() -> bool:
    """Windows 10+ with ``LongPathsEnabled`` set (Python declares itself long-path aware)."""
    if sys.platform != "win32":
        return False
    import winreg

    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return bool(winreg.QueryValueEx(key, "LongPathsEnabled")[0])
    except OSError:
        return False


class FileSystemGoneError(RuntimeError):
    """The folder a run writes in is no longer on the file system it was found on (a share went away)."""

    def __init__(self, folder: Path, why: str, left_behind: str = ""):
        super().__init__(
            f"the drive or share holding {folder} went away ({why}); nothing was written there since. "
            f"{left_behind}Run again when it is back: finished snapshots are not redone"
        )


class Volume:
    """The file system a folder was found on, to check before each write that it still is.

    A share that goes away mid-run (unmounted, its connection lost) leaves its mount point
    behind as an ordinary folder of the local disk: a write that created folders there would
    land on the wrong drive. The identity is the device number (``st_dev``: on Windows the
    volume's serial number); each FUSE mount gets a new one, so a share mounted again is
    another volume too.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.device = os.stat(self.folder).st_dev

    def gone(self) -> str | None:
        """Why the folder is no longer on its file system (``None`` while it is)."""
        try:
            device = os.stat(self.folder).st_dev
        except OSError as error:
            return error.strerror or str(error)
        return None if device == self.device else "another file system is mounted there now"

    def check(self, left_behind: str = "") -> None:
        """Raise :class:`FileSystemGoneError` if the folder's file system went away (``left_behind``: what
        a write in hand may have left there, in a sentence)."""
        why = self.gone()
        if why is not None:
            raise FileSystemGoneError(self.folder, why, left_behind)


_FIEMAP = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC, _FIEMAP_EXTENT_LAST, _FIEMAP_EXTENT_SHARED = 0x1, 0x1, 0x2000


def shared_bytes(path: Path | str) -> int | None:
    """How many of the file's bytes share blocks with another file (a reflink clone); ``None`` where the
    platform cannot tell (Linux asks ``FS_IOC_FIEMAP``; other systems, and file systems without it, do not)."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl

    shared, start, batch = 0, 0, 256
    with open(path, "rb") as stream:
        while True:
            request = bytearray(_FIEMAP.pack(start, 2**64 - 1 - start, _FIEMAP_FLAG_SYNC, 0, batch, 0))
            request += bytes(_FIEMAP_EXTENT.size * batch)
            try:
                fcntl.ioctl(stream.fileno(), _FS_IOC_FIEMAP, request)
            except OSError:
                return None
            mapped = _FIEMAP.unpack_from(request)[3]
            if mapped == 0:
                return shared
            for index in range(mapped):
                logical, _, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    request, _FIEMAP.size + index * _FIEMAP_EXTENT.size
                )
                shared += length if flags & _FIEMAP_EXTENT_SHARED else 0
                start = logical + length
                if flags & _FIEMAP_EXTENT_LAST:
                    return shared
