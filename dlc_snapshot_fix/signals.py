"""SIGTERM stops a run as Ctrl-C does.

Schedulers end jobs with SIGTERM (``scancel``, a time limit, preemption), then SIGKILL after
a grace time. Python's default for SIGTERM is to die on the spot, skipping the clean-up a
Ctrl-C gets: the shard report is never written and a temp file is left. Raising
:class:`KeyboardInterrupt` instead takes the path Ctrl-C takes: the snapshot being written
keeps its original (or has its new version already), the report is written as far as it got.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

_stopped_by = ""
"""The name of the signal that told this process to stop ("" until one did)."""
_stop_event: Any = None
"""A pool worker's: set by the main process to stop it between snapshots (on every platform)."""


def stopping() -> bool:
    """Whether this process was told to stop.

    Work queued before the signal should not start, and an error raised while the signal was
    handled is the stop, not a failure of the file: torch turns an interrupt raised inside its
    C++ writer into ``RuntimeError: unexpected pos``, which a fence would otherwise report as
    that snapshot's failure and go on to the next.
    """
    if not _stopped_by and _stop_event is not None and _stop_event.is_set():
        _note_stop(signal.SIGTERM, None)  # told by the main process: as if by SIGTERM
    return bool(_stopped_by)


def interrupted() -> KeyboardInterrupt:
    """The interrupt to raise where a signal's own was lost (see :func:`stopping`)."""
    return KeyboardInterrupt(f"stopped by signal {_stopped_by}")


def _note_stop(signum: int, frame: FrameType | None) -> None:
    global _stopped_by
    _stopped_by = signal.Signals(signum).name


def _interrupt(signum: int, frame: FrameType | None) -> None:
    _note_stop(signum, frame)
    # once: a second SIGTERM (a scheduler signals every process of the job) must not
    # interrupt the clean-up of the first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise interrupted()


def _interrupt_each_time(signum: int, frame: FrameType | None) -> None:
    _note_stop(signum, frame)
    raise interrupted()


def stop_on_signals() -> None:
    """In the main process: SIGTERM stops the run once, as Ctrl-C does; both are remembered (:func:`stopping`).

    Handlers someone else installed are left alone. Ctrl-C still interrupts each time it is
    pressed (a second press cuts a slow clean-up short, as a user expects).
    """
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt_each_time)


def stop_between_snapshots(stop_event: Any = None) -> None:
    """For a pool worker: SIGTERM and SIGINT are only remembered; the worker stops before its next snapshot.

    ``stop_event`` (a ``multiprocessing`` Event) is how the main process says "stop" on every
    platform: a signal sent to a worker on Windows is ``TerminateProcess``, which would kill it
    mid-write, so the main process never sends one.

    Not an interrupt at an arbitrary point: with workers interrupted anywhere, a run hung once
    after SIGTERM in a matrix run (most likely an interrupt while a worker wrote its result
    into the pool's pipe: half a message there, and the main process waits for the rest
    forever). Stopping at a snapshot boundary also finishes the snapshot in hand.
    """
    global _stop_event
    _stop_event = stop_event
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, _note_stop)
