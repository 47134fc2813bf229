"""Starting the tool in a child process and killing it with all its workers, on POSIX and Windows alike.

POSIX: the child leads a new session, so ``killpg`` reaches its pool workers too. Windows has
no process groups a signal reaches and no SIGKILL: the child is put in a job object, and
``TerminateJobObject`` ends it and every process it started since (what ``kill -9`` of a
session is on Linux). No ``preexec_fn``: Windows has none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

KILLED_EXIT_CODE = 137
"""The exit code a job object's termination gives on Windows (POSIX reports ``-SIGKILL``)."""


class Started(subprocess.Popen):
    """A ``Popen`` that can be killed with everything it started (:meth:`kill_tree`)."""

    _job: Any = None

    def kill_tree(self) -> None:
        if sys.platform == "win32":
            import ctypes

            ctypes.WinDLL("kernel32").TerminateJobObject(ctypes.c_void_p(self._job), KILLED_EXIT_CODE)
        else:
            os.killpg(self.pid, signal.SIGKILL)

    def killed(self) -> bool:
        """Whether :meth:`kill_tree` (not the process itself) ended it."""
        return self.returncode == (KILLED_EXIT_CODE if sys.platform == "win32" else -signal.SIGKILL)


def start(command: list[Any], **popen: Any) -> Started:
    """``Popen(command)`` in its own session (POSIX) or job object (Windows)."""
    if sys.platform != "win32":
        return Started(command, start_new_session=True, **popen)
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateJobObjectW.restype = wintypes.HANDLE
    kernel32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
    job = kernel32.CreateJobObjectW(None, None)
    if not job:
        raise ctypes.WinError(ctypes.get_last_error())
    process = Started(command, **popen)
    # the child imports for seconds before it starts a worker: assigned now, every worker is in the job too
    if not kernel32.AssignProcessToJobObject(job, int(process._handle)):  # type: ignore[attr-defined]
        raise ctypes.WinError(ctypes.get_last_error())
    process._job = job
    return process
