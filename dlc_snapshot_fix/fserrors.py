"""What an error from a drive or a share means for the user: a sentence and advice per errno.

Reasons are worded from the errno, not from the step that met it: a full drive, a lost
share and a read-only mount each need their own advice ("check its permissions" is wrong
for all three). The system's own words stay in brackets, so a search for them still works.
On Windows the error's ``winerror`` is read first: Python maps a sharing violation to
``EACCES``, but "check your permissions" is the wrong advice when a viewer holds the file.
"""

from __future__ import annotations

import errno
import os
import stat

_MEANINGS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "the drive is full",
        "Free some space (or move the project), then run again: finished snapshots are not redone",
    ),
    errno.ENOTCONN: ("the share is not connected", "Reconnect or mount it again, then run again"),
    errno.EIO: (
        "the drive or the connection to it failed",
        "Check the drive (or the network), then run again; if the disk is failing, copy the project off it first",
    ),
    errno.EROFS: (
        "the drive is mounted read-only",
        "Mount it writable (or copy the project to a writable drive), then run again",
    ),
    errno.EBUSY: (
        "the file or the drive is busy: another program holds it, or the share refuses the operation",
        "Close the programs that use the project, then run again",
    ),
    errno.EACCES: ("permission denied", "Check that you may read and write the project's folders, then run again"),
    errno.EPERM: (
        "the operation is not permitted here",
        "Check the folders' owner and permissions and the drive's mount options, then run again",
    ),
}
for _name, _meaning in (  # not defined on every platform (Windows has neither)
    ("EDQUOT", ("your disk quota is used up", "Delete some of your files or ask for a larger quota, then run again")),
    (
        "ESTALE",
        ("the share lost track of the file (changed or moved on the server)", "Mount the share again, then run again"),
    ),
):
    if hasattr(errno, _name):
        _MEANINGS[getattr(errno, _name)] = _meaning

_CLOSE_THE_OTHER_PROGRAM = (
    "Close the programs that use the project (DeepLabCut, napari, a file viewer, a sync client) or wait for an "
    "antivirus or indexer scan to end, then run again: finished snapshots are not redone"
)
_WINDOWS_MEANINGS: dict[int, tuple[str, str]] = {  # by ``winerror``
    5: (  # ERROR_ACCESS_DENIED: what a replace or delete of a file another process has open or mapped gets
        "access denied: on Windows this usually means another program has the file open or mapped",
        _CLOSE_THE_OTHER_PROGRAM,
    ),
    32: ("another program is using the file (a sharing violation)", _CLOSE_THE_OTHER_PROGRAM),  # SHARING_VIOLATION
    33: ("another program has locked part of the file", _CLOSE_THE_OTHER_PROGRAM),  # ERROR_LOCK_VIOLATION
    1224: (  # ERROR_USER_MAPPED_FILE (osfiles.truncate_fd names it: the C runtime says only EINVAL)
        "a program has the file memory-mapped (it loaded the snapshot: DeepLabCut, a notebook, a viewer)",
        _CLOSE_THE_OTHER_PROGRAM,
    ),
}
_READ_ONLY_FILE = (
    "the file is marked read-only",
    'Clear its read-only attribute (Properties, or attrib -r "FILE" in a prompt), then run again',
)
_LONG_PATH = (
    "the path is longer than Windows allows (260 characters)",
    "Move the project to a shorter path (such as C:\\dlc\\project), or enable long paths (Windows 10 and later: "
    "the group policy 'Enable Win32 long paths' or the LongPathsEnabled registry value), then run again",
)
WINDOWS_MAX_PATH = 260
_PATH_ERRORS = {3, 206}  # ERROR_PATH_NOT_FOUND, ERROR_FILENAME_EXCED_RANGE: what a too long path gets


def _marked_read_only(path: str) -> bool:
    """Whether ``path`` has Windows' read-only attribute (``False`` wherever that cannot be read)."""
    try:
        attributes = os.stat(path).st_file_attributes  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return bool(attributes & stat.FILE_ATTRIBUTE_READONLY)  # type: ignore[attr-defined]


def _windows_meaning(error: OSError) -> tuple[str, str] | None:
    """The meaning of a Windows error code where it says more than the errno Python maps it to."""
    code = getattr(error, "winerror", None)
    paths = [os.fsdecode(p) for p in (error.filename, error.filename2) if isinstance(p, (str, bytes, os.PathLike))]
    if code == 5 and any(_marked_read_only(p) for p in paths):
        return _READ_ONLY_FILE
    if code in _PATH_ERRORS and any(len(p) >= WINDOWS_MAX_PATH for p in paths):
        return _LONG_PATH
    return _WINDOWS_MEANINGS.get(code) if code is not None else None


def meaning(error: BaseException) -> tuple[str, str | None]:
    """What happened, in words (the system's own in brackets), and the advice for it if the errno has one."""
    if not isinstance(error, OSError):
        return str(error) or type(error).__name__, None
    own_words = error.strerror or str(error)
    known = _windows_meaning(error) or (_MEANINGS.get(error.errno) if error.errno is not None else None)
    if known is None:
        return own_words, None
    what, advice = known
    return (own_words if getattr(error, "worded", False) else f"{what} ({own_words})"), advice


def reason(error: BaseException, failed: str, state: str, otherwise: str) -> str:
    """``"{failed}: {what happened}; {state}. {advice}"``; ``otherwise`` is the advice for an errno without one."""
    what, advice = meaning(error)
    return f"{failed}: {what}; {state}. {advice or otherwise}"
