"""One result type per snapshot, made by the code that does the work, rendered here.

The migration code fills :class:`SnapshotResult` and :class:`ProjectReport`; this
module turns them into what a person reads (a short table and a summary) and what a
script reads (JSON). The CLI only chooses between them.
"""

from __future__ import annotations

import enum
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the CLI imports this module before it knows it needs torch
    from dlc_snapshot_fix.discover import SkippedPath
    from dlc_snapshot_fix.transforms import StrippedEntry
    from dlc_snapshot_fix.verify import ModelCheck


class Status(str, enum.Enum):
    FIXED = "fixed"
    CLEAN = "already clean"
    NEEDS_FIX = "needs fix"
    RESTORED = "restored"
    NOTHING_TO_RESTORE = "nothing to restore"
    SKIPPED = "skipped"
    FAILED = "failed"


class ExitCode(enum.IntEnum):
    """The command's exit codes (documented in docs/fixing.md)."""

    OK = 0
    NEEDS_MIGRATION = 1
    """``--check`` only: at least one snapshot still has a wrapper prefix."""
    USAGE = 2
    """Bad arguments, or the path is not a readable DeepLabCut project."""
    PROBLEMS = 3
    """At least one snapshot failed, or does not load into its model."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C or SIGTERM (a scheduler's cancel, time limit or preemption); run again to finish."""


@dataclass
class SnapshotResult:
    path: Path
    role: str
    status: Status
    reason: str = ""
    stripped: list[StrippedEntry] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    """Every change made (or, for ``needs fix``, to be made), in words."""
    renamed_to: Path | None = None
    hints: list[str] = field(default_factory=list)
    """What DeepLabCut will still fail on, with the option that fixes it."""
    notes: list[str] = field(default_factory=list)
    """Worth knowing, not a failure (numpy metadata DeepLabCut reads but other loaders refuse)."""
    model_checks: dict[str, ModelCheck] = field(default_factory=dict)
    size: int | None = None
    sha256_before: str | None = None
    sha256_after: str | None = None
    backup: Path | None = None
    extra_backup: Path | None = None
    """The copy made in ``--backup-dir``, if one was asked for."""
    method: str | None = None
    """How a changed snapshot is (or, for ``needs fix``, will be) written: ``append`` or ``rewrite``."""
    method_note: str | None = None
    """Why ``--method append`` was asked and this snapshot takes (or will take) the rewrite."""
    kept_by: str | None = None
    """How the original was kept: ``hard link``, ``copy`` (a drive that cannot link: its full size again),
    ``earlier backup`` (an interrupted run's), or ``append`` (its bytes are the file's start)."""
    new_bytes: int | None = None
    """New space the change took on the drive: the new file (and the copy of the original), or the appended tail."""
    seconds: float = 0.0

    @property
    def fits_model(self) -> bool:
        return all(check.fits for check in self.model_checks.values())

    @property
    def ok(self) -> bool:
        return self.status != Status.FAILED and self.fits_model and not self.hints

    def verdict_word(self) -> str:
        """DeepLabCut's verdict in a word or two ("" where none was asked for); --verbose says why it is missing."""
        checks = [check for check in self.model_checks.values() if check.status != "skipped"]
        if not checks:
            asked = any(check.reason != NOT_REQUESTED for check in self.model_checks.values())
            return "DeepLabCut: not checked" if asked else ""
        if any(check.status == "refused" for check in checks):
            return "DeepLabCut: refuses it"
        if any(check.status == "mismatch" for check in checks):
            return "DeepLabCut: does not fit its model"
        return "DeepLabCut: loads"

    def short(self) -> str:
        """The default line's words: what changed (the why left out), DeepLabCut's verdict in a word."""
        verb = "would be " if self.status == Status.NEEDS_FIX else ""
        parts = [f"{verb}{_WHY_IN_BRACKETS.sub('', change)}" for change in self.changes]
        if self.method_note and self.status in (Status.NEEDS_FIX, Status.FIXED):
            parts.append(f"{verb}rewritten, not appended")
        if word := self.verdict_word():
            parts.append(word)
        return "; ".join(parts)

    def describe(self) -> str:
        """The full explanation: what was (or would be) changed and why, notes, then how the model check went."""
        parts = []
        if self.reason:
            parts.append(self.reason)
        for change in self.changes:
            parts.append(f"would be {change}" if self.status == Status.NEEDS_FIX else change)
        if self.method_note and self.status in (Status.NEEDS_FIX, Status.FIXED):
            verb = "would be rewritten" if self.status == Status.NEEDS_FIX else "rewritten"
            parts.append(f"{verb}, not appended: {self.method_note}")
        parts += self.hints
        parts += self.notes
        for entry, check in self.model_checks.items():
            text = check.summary()
            if check.status == "mismatch":
                text = f"does not load into its model: {text}"
            if text:
                parts.append(text if len(self.model_checks) == 1 else f"{entry}: {text}")
        return "; ".join(parts)


NOT_REQUESTED = "model check not requested"
"""The reason of a verdict left out on purpose (--no-model-check): the default line then says nothing of it."""

_WHY_IN_BRACKETS = re.compile(r" \((?=[A-Za-z]).*\)$")
"""A change's closing explanation in brackets (``... made plain numbers (DeepLabCut refuses them: ...)``);
counts in brackets (``(163 keys)``) stay."""


@dataclass
class ProjectReport:
    project: Path
    action: str
    results: list[SnapshotResult] = field(default_factory=list)
    skipped: list[SkippedPath] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(result.status == status for result in self.results)

    def exit_code(self, check: bool = False) -> ExitCode:
        if self.problems or any(not r.ok for r in self.results) or any(s.problem for s in self.skipped):
            return ExitCode.PROBLEMS
        if check and self.count(Status.NEEDS_FIX):
            return ExitCode.NEEDS_MIGRATION
        return ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "project": str(self.project),
            "action": self.action,
            "snapshots": [
                {
                    "path": str(r.path),
                    "role": r.role,
                    "status": r.status.value,
                    "reason": r.reason,
                    "changes": r.changes,
                    "method": r.method,
                    "method_note": r.method_note,
                    "kept_by": r.kept_by,
                    "new_bytes": r.new_bytes,
                    "renamed_to": str(r.renamed_to) if r.renamed_to else None,
                    "hints": r.hints,
                    "notes": r.notes,
                    "stripped": [
                        {"entry": s.entry, "prefixes": list(s.prefixes), "keys": s.key_count} for s in r.stripped
                    ],
                    "model_check": {
                        entry: {
                            "status": c.status,
                            "reason": c.reason,
                            "missing": c.missing,
                            "unexpected": c.unexpected,
                            "shape_mismatches": [
                                {"key": k, "snapshot": list(s), "model": list(m)} for k, s, m in c.shape_mismatches
                            ],
                        }
                        for entry, c in r.model_checks.items()
                    },
                    "size": r.size,
                    "sha256_before": r.sha256_before,
                    "sha256_after": r.sha256_after,
                    "backup": str(r.backup) if r.backup else None,
                    "extra_backup": str(r.extra_backup) if r.extra_backup else None,
                    "seconds": round(r.seconds, 3),
                }
                for r in self.results
            ],
            "skipped": [{"path": str(s.path), "reason": s.reason, "problem": s.problem} for s in self.skipped],
            "warnings": self.warnings,
            "problems": self.problems,
            "summary": {status.value: self.count(status) for status in Status if self.count(status)},
        }

    def render_lines(self, verbose: bool = False) -> list[tuple[str, str | None]]:
        """Text lines for a terminal, each with a colour name (or ``None``).

        By default one short line per snapshot (status, what changed, DeepLabCut's verdict in a
        word), and below it the full reason only where the user has something to do; ``verbose``:
        every snapshot's full explanation (notes, why each change, how the verdict was reached).
        """
        colours = {
            Status.FIXED: "green",
            Status.RESTORED: "green",
            Status.CLEAN: None,
            Status.NOTHING_TO_RESTORE: None,
            Status.NEEDS_FIX: "yellow",
            Status.SKIPPED: "yellow",
            Status.FAILED: "red",
        }
        lines: list[tuple[str, str | None]] = [(f"{self.action}: {self.project}", None)]
        lines += [(f"  problem: {p}", "red") for p in self.problems]
        lines += [(f"  warning: {w}", "yellow") for w in self.warnings]
        for result in self.results:
            colour = colours[result.status] if result.fits_model and not result.hints else "red"
            short = "" if verbose else result.short()
            text = f"  {result.status.value:<14} {self._relative(result.path)}"
            lines.append((f"{text}  {short}" if short else text, colour))
            if (verbose or not result.ok) and (detail := result.describe()):  # not ok: something to do
                lines.append((f"  {'':<14}   {detail}", None))
        for skipped in self.skipped:
            colour = "red" if skipped.problem else "yellow"
            lines.append((f"  {'skipped':<14} {self._relative(skipped.path)}: {skipped.reason}", colour))
        counts = ", ".join(f"{self.count(status)} {status.value}" for status in Status if self.count(status)) or (
            "nothing to restore" if self.action == "restore" else "no snapshots found"
        )
        if self.skipped:
            counts += f", {len(self.skipped)} paths skipped"
        misfits = sum(not r.fits_model for r in self.results)
        if misfits:
            counts += f", {misfits} not loading into their model"
        lines.append((f"summary: {counts}{backup_cost(self.results)}", None))
        return lines

    def _relative(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.project))
        except ValueError:
            return str(path)


def backup_cost(results: Iterable[SnapshotResult]) -> str:
    """``"; originals kept: 2 by hard link, 1 by copy; 310 MiB of new space"`` (empty if nothing was written)."""
    kept: dict[str, int] = {}
    new_bytes = 0
    for result in results:
        if result.kept_by is not None and result.status == Status.FIXED:
            kept[result.kept_by] = kept.get(result.kept_by, 0) + 1
            new_bytes += result.new_bytes or 0
    if not kept:
        return ""
    ways = ", ".join(f"{count} by {way}" for way, count in sorted(kept.items()))
    space = f"{new_bytes / 2**20:.1f} MiB" if new_bytes >= 2**20 else f"{new_bytes / 2**10:.1f} KiB"
    return f"; originals kept: {ways}; {space} of new space"


def show_tracebacks() -> None:
    """``--debug``: each failure's traceback on stderr (failures are reported either way, without one).

    Called in the main process, and in each pool worker started while it is on: a worker
    started by ``spawn`` or ``forkserver`` inherits no logging set-up.
    """
    package = logging.getLogger("dlc_snapshot_fix")
    if any(getattr(handler, "dlc_snapshot_fix_debug", False) for handler in package.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("debug: %(name)s: %(message)s"))
    handler.dlc_snapshot_fix_debug = True  # type: ignore[attr-defined]
    package.addHandler(handler)
    package.setLevel(logging.DEBUG)


def tracebacks_shown() -> bool:
    """Whether ``--debug`` is on in this process (pool workers are told at their start)."""
    return logging.getLogger("dlc_snapshot_fix").isEnabledFor(logging.DEBUG)
