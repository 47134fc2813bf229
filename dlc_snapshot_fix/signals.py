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

_stopping = False


def stopping() -> bool:
    """Whether this process was told to stop (work queued before the signal should not start)."""
    return _stopping


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _stopping
    _stopping = True
    # once: a second signal (a scheduler signals every process of the job, Ctrl-C reaches the
    # workers through the terminal, and the main process forwards a stop to its workers) must
    # not interrupt the clean-up of the first
    for each in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(each) is _interrupt:
            signal.signal(each, signal.SIG_IGN)
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def stop_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt in this process, unless someone else handles it already."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _interrupt)


def stop_once() -> None:
    """For a worker process: the first SIGTERM or SIGINT stops it, later ones are ignored."""
    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, _interrupt)
