"""What an error from a drive or a share means for the user: a sentence and advice per errno.

Reasons are worded from the errno, not from the step that met it: a full drive, a lost
share and a read-only mount each need their own advice ("check its permissions" is wrong
for all three). The system's own words stay in brackets, so a search for them still works.
"""

from __future__ import annotations

import errno

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


def meaning(error: BaseException) -> tuple[str, str | None]:
    """What happened, in words (the system's own in brackets), and the advice for it if the errno has one."""
    if not isinstance(error, OSError):
        return str(error) or type(error).__name__, None
    own_words = error.strerror or str(error)
    known = _MEANINGS.get(error.errno) if error.errno is not None else None
    if known is None:
        return own_words, None
    what, advice = known
    return (own_words if getattr(error, "worded", False) else f"{what} ({own_words})"), advice


def reason(error: BaseException, failed: str, state: str, otherwise: str) -> str:
    """``"{failed}: {what happened}; {state}. {advice}"``; ``otherwise`` is the advice for an errno without one."""
    what, advice = meaning(error)
    return f"{failed}: {what}; {state}. {advice or otherwise}"
