"""A process that behaves as Windows would for the calls dlc-snapshot-fix makes (used on Linux only).

The names Windows' ``os`` lacks are removed (``pread``, ``copy_file_range``,
``posix_fadvise``, ``statvfs``: ``shutil.disk_usage`` keeps working, as Windows' does), hard
links are refused as exFAT refuses them, and a file this process holds open or memory-maps
cannot be replaced, renamed, truncated or deleted (Windows' sharing rules; ``/proc/self/fd``
and ``/proc/self/maps`` are looked at on each such call). Each refusal is recorded.

In a test process: :func:`shape` with pytest's ``monkeypatch`` (undone after the test). In
every process of a CLI run, pool workers included: ``DLC_SNAPSHOT_FIX_WINDOWS_SHAPE=FILE``
and this folder's ``sitecustomize`` (refusals appended to FILE).
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

Refusal = tuple[str, str, list[str]]


def held_here(path: str | os.PathLike) -> list[str]:
    """How this process holds ``path``: an open descriptor, a memory map (what Windows would not let go)."""
    try:
        target = os.path.realpath(path)
    except OSError:
        return []
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                held.append(f"open as fd {fd}")
        except OSError:
            continue
    with open("/proc/self/maps") as maps:
        if any(line.rstrip("\n").endswith(" " + target) for line in maps):
            held.append("memory-mapped")
    return held


def shape(setattr_: Callable[[Any, str, Any], None], delattr_: Callable[[Any, str], None], refused: Any) -> None:
    """Apply the Windows shape through ``setattr_``/``delattr_``; refusals go to ``refused.append``."""
    from dlc_snapshot_fix import osfiles

    statvfs = os.statvfs

    def disk_usage(path):  # Windows' asks GetDiskFreeSpaceExW, not statvfs: the same answer
        found = statvfs(path)
        total, free = found.f_blocks * found.f_frsize, found.f_bavail * found.f_frsize
        return shutil._ntuple_diskusage(total, total - found.f_bfree * found.f_frsize, free)

    setattr_(shutil, "disk_usage", disk_usage)
    for name in ("pread", "pwrite", "copy_file_range", "posix_fadvise", "statvfs"):
        if hasattr(os, name):
            delattr_(os, name)
    setattr_(osfiles, "WINDOWS", True)

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument (exFAT has no hard links)")

    setattr_(os, "link", no_hard_links)

    def sharing_rules(name, real, checked):
        def call(*args, **kwargs):
            for index in checked:
                held = held_here(args[index])
                if held:
                    refused.append((name, str(args[index]), held))
                    raise PermissionError(errno.EACCES, f"{name}: the file is in use ({', '.join(held)})")
            return real(*args, **kwargs)

        return call

    for name, checked in (("replace", (0, 1)), ("rename", (0, 1)), ("unlink", (0,)), ("remove", (0,))):
        setattr_(os, name, sharing_rules(name, getattr(os, name), checked))
    accessor = getattr(pathlib, "_normal_accessor", None)  # Python 3.10's Path methods call os through this
    if accessor is not None:
        setattr_(accessor, "link", no_hard_links)
        for name in ("replace", "rename", "unlink"):
            setattr_(accessor, name, getattr(os, name))
    setattr_(os, "truncate", sharing_rules("truncate", os.truncate, (0,)))


class RefusalFile:
    """``refused.append`` for a CLI run: one line per refusal, in a file every process appends to."""

    def __init__(self, path: str):
        self.path = path

    def append(self, refusal: Refusal) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(repr(refusal) + "\n")
