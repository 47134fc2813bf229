"""Lab archives: find every project below a folder, migrate them in parallel, sharded, resumable.

A storage server or cluster holds hundreds of projects. This module finds them,
picks this shard's share (``--shard I/N``, or the scheduler's array variables), runs
:func:`~dlc_snapshot_fix.migrate.migrate_project` on each in a pool of worker
processes, and collects one row per snapshot. Resuming needs no state of its own: a
rerun finds finished snapshots already clean and leaves them alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlc_snapshot_fix import fserrors, names, osfiles, signals, store
from dlc_snapshot_fix.discover import PYTORCH_MODELS, TENSORFLOW_MODELS, SkippedPath, discover_project, model_roots
from dlc_snapshot_fix.migrate import MigrationOptions, ProjectBusyError, migrate_project
from dlc_snapshot_fix.report import ExitCode, ProjectReport, Status, backup_cost, show_tracebacks, tracebacks_shown
from dlc_snapshot_fix.shards import ROW_FIELDS, Shard, merge_reports, write_rows_csv

__all__ = ["ROW_FIELDS", "ArchiveReport", "Shard", "find_projects", "merge_reports", "migrate_archive"]


def find_projects(root: Path) -> tuple[list[Path], list[SkippedPath]]:
    """Every PyTorch-engine project below ``root``; folders passed over are returned with the reason."""
    root = Path(root).absolute()
    projects: list[Path] = []
    skipped: list[SkippedPath] = []

    def unreadable(error: OSError) -> None:
        what = fserrors.meaning(error)[0]
        skipped.append(SkippedPath(Path(error.filename), f"cannot be read: {what}; not searched", True))

    for current, subdirs, _ in os.walk(root, onerror=unreadable):
        here = Path(current)
        for name in list(subdirs):
            if (here / name).is_symlink():
                subdirs.remove(name)
                loop = not (here / name).exists() or (here / name).resolve() in (
                    here.resolve(),
                    *here.resolve().parents,
                )
                reason = "a symbolic link loop" if loop else "a symbolic link to a folder"
                skipped.append(SkippedPath(here / name, f"{reason}; not followed"))
        # a project: a config.yaml with model folders beside it (or under a model prefix)
        pytorch = (here / "config.yaml").is_file() and model_roots(here, PYTORCH_MODELS)
        if pytorch or ((here / "config.yaml").is_file() and model_roots(here, TENSORFLOW_MODELS)):
            subdirs[:] = []  # a project's own folders hold no other projects
            if pytorch:
                projects.append(here)
            else:
                skipped.append(SkippedPath(here, "TensorFlow-only project: nothing for this tool"))
        else:
            subdirs[:] = [d for d in subdirs if not d.startswith(".") and d != names.TOOL_DIR_NAME]
    return sorted(projects), skipped


@dataclass
class ArchiveReport:
    """Every project's report, plus what was passed over, for one run (or several merged)."""

    root: Path
    shard: str = "1/1"
    projects: list[ProjectReport] = field(default_factory=list)
    skipped: list[SkippedPath] = field(default_factory=list)
    failed_projects: list[tuple[Path, str]] = field(default_factory=list)
    interrupted: bool = False
    finished: bool = False
    """False while the run is going on: a report saved then (and left by a killed task) says ``running``."""

    @property
    def state(self) -> str:
        return "interrupted" if self.interrupted else "finished" if self.finished else "running"

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for report in self.projects:
            for result in report.results:
                rows.append(
                    {
                        "project": str(report.project),
                        "path": str(result.path),
                        "status": result.status.value,
                        "method": result.method,
                        "method_note": result.method_note,
                        "kept_by": result.kept_by,
                        "new_bytes": result.new_bytes,
                        "reason": result.describe(),
                        "size": result.size,
                        "sha256_before": result.sha256_before,
                        "sha256_after": result.sha256_after,
                        "seconds": round(result.seconds, 3),
                    }
                )
        stopped = [(r.project, problem) for r in self.projects for problem in r.problems]
        for project, reason in [*stopped, *self.failed_projects]:  # a project stopped part-way, or never started
            rows.append(
                {"project": str(project), "path": str(project), "status": Status.FAILED.value, "reason": reason}
            )
        return rows

    def exit_code(self) -> ExitCode:
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.failed_projects or any(r.exit_code() == ExitCode.PROBLEMS for r in self.projects):
            return ExitCode.PROBLEMS
        if any(s.problem for s in self.skipped):
            return ExitCode.PROBLEMS
        if any(r.exit_code(check=r.action == "check") == ExitCode.NEEDS_MIGRATION for r in self.projects):
            return ExitCode.NEEDS_MIGRATION  # as for one project: a --check found work to do
        return ExitCode.OK

    def summary(self) -> str:
        rows = self.rows()
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no snapshots"
        methods: dict[str, int] = {}
        for row in rows:
            if row.get("method") and row["status"] in (Status.FIXED.value, Status.NEEDS_FIX.value):
                methods[row["method"]] = methods.get(row["method"], 0) + 1
        if "append" in methods or any(row.get("method_note") for row in rows):  # the append was asked for
            text += f" ({methods.get('append', 0)} by append, {methods.get('rewrite', 0)} by rewrite)"
        text += f", {len(self.skipped)} paths skipped"
        text += backup_cost(result for report in self.projects for result in report.results)
        failures = self.failures()
        if failures:  # the largest cause (every cause is listed above the summary)
            reason, paths = failures[0]
            text += f"; most failed because {reason.split('; ')[0]} ({len(paths)})"
        return f"archive {self.root} (shard {self.shard}): {len(self.projects)} projects, {text}" + (
            " — INTERRUPTED, run again to finish" if self.interrupted else ""
        )

    def failures(self) -> list[tuple[str, list[Path]]]:
        """Each reason a snapshot or project failed, once (its project's path said as ``PROJECT``), with where
        it happened; the most frequent first."""
        by_reason: dict[str, list[Path]] = {}

        def add(project: Path, reason: str, path: Path) -> None:  # the same cause in any project: one reason
            by_reason.setdefault(reason.replace(str(project), "PROJECT"), []).append(path)

        for report in self.projects:
            for problem in report.problems:
                add(report.project, problem, report.project)
            for result in report.results:
                if not result.ok:
                    reason = result.reason if result.status == Status.FAILED and result.reason else result.describe()
                    add(report.project, reason, result.path)
        for project, reason in self.failed_projects:
            add(project, reason, project)
        return sorted(by_reason.items(), key=lambda item: -len(item[1]))

    def failure_lines(self, shown: int = 5) -> list[str]:
        """The failures for a console: each reason once, then up to ``shown`` of the paths it stopped."""
        lines = []
        for reason, paths in self.failures():
            lines.append(f"failed ({len(paths)}): {reason}")
            lines += [f"    {self._relative(path)}" for path in paths[:shown]]
            if len(paths) > shown:
                lines.append(f"    ... and {len(paths) - shown} more (--json or --csv lists them all)")
        return lines

    def _relative(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "shard": self.shard,
            "state": self.state,
            "interrupted": self.interrupted,
            "snapshots": self.rows(),
            "skipped": [{"path": str(s.path), "reason": s.reason, "problem": s.problem} for s in self.skipped],
        }

    def write_json(self, path: Path) -> None:
        """Whole or not at all: a task killed while writing leaves the previous version."""
        store.write_text_atomically(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def write_csv(self, path: Path) -> None:
        write_rows_csv(self.rows(), path)


def _migrate_in_worker(
    project: Path, write: bool, options: MigrationOptions, volume: osfiles.Volume | None
) -> ProjectReport | str:
    """Runs in a worker process; a busy or unreadable project comes back as a reason string.

    ``volume``: the file system the project was found on when the run started. If it went
    away since, that is the reason given (not the missing ``config.yaml`` it causes).
    """
    if signals.stopping():  # queued before this worker was told to stop
        return "skipped: not started: the run was stopped; run again to finish"
    try:
        return migrate_project(project, write=write, options=options, volume=volume)
    except ProjectBusyError as error:
        return f"skipped: {error}"
    except Exception as error:  # one broken project must not stop the archive
        why = volume.gone() if volume is not None else None
        if why is not None:
            return f"failed: {osfiles.FileSystemGoneError(project, why)}"
        return f"failed: {type(error).__name__}: {error}"


def migrate_archive(
    root: Path,
    *,
    jobs: int = 1,
    shard: Shard | None = None,
    write: bool = True,
    options: MigrationOptions | None = None,
    on_plan: Callable[[list[Path]], None] | None = None,
    on_project: Callable[[Path, ProjectReport | str], None] | None = None,
    on_progress: Callable[[ArchiveReport], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> ArchiveReport:
    """Migrate (or check) every project below ``root`` that this shard owns, ``jobs`` at a time.

    ``on_progress`` gets the report after each project (to save it as far as it got). On
    KeyboardInterrupt (Ctrl-C, or SIGTERM after :func:`~dlc_snapshot_fix.signals.stop_on_signals`)
    the workers are told to stop too: each finishes the snapshot it is on and starts no other,
    and the report is marked interrupted. Before any project starts, the signature of every
    model the projects' configs describe is built once and kept (``announce`` hears it), so
    the workers judge by signature without importing DeepLabCut.
    """
    shard = shard or Shard()
    options = options or MigrationOptions()
    root = Path(root).absolute()
    projects, skipped = find_projects(root)
    mine = [p for p in projects if shard.owns(p.relative_to(root).as_posix())]
    report = ArchiveReport(root=root, shard=str(shard), skipped=skipped)
    volumes: dict[Path, osfiles.Volume | None] = dict.fromkeys(mine)
    for project in mine:  # where each project is now: a share that goes away later is told apart from a bad project
        with contextlib.suppress(OSError):
            volumes[project] = osfiles.Volume(project)
    if options.check_model:
        _prepare_signatures(mine, options, announce)
    if on_plan is not None:
        on_plan(mine)

    def record(project: Path, outcome: ProjectReport | str) -> None:
        if isinstance(outcome, ProjectReport):
            report.projects.append(outcome)
        elif outcome.startswith("skipped: "):
            report.skipped.append(SkippedPath(project, outcome.removeprefix("skipped: "), problem=True))
        else:
            report.failed_projects.append((project, outcome.removeprefix("failed: ")))
        if on_project is not None:
            on_project(project, outcome)
        if on_progress is not None:
            on_progress(report)

    if jobs <= 1:
        try:
            for project in mine:
                record(project, _migrate_in_worker(project, write, options, volumes[project]))
        except KeyboardInterrupt:
            report.interrupted = True
    else:
        context = multiprocessing.get_context()
        stop = context.Event()
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_start_worker, initargs=(stop, tracebacks_shown())
        )
        futures: dict[concurrent.futures.Future, Path] = {}
        try:
            for project in mine:
                futures[pool.submit(_migrate_in_worker, project, write, options, volumes[project])] = project
            for future in concurrent.futures.as_completed(futures):
                record(futures[future], future.result())
        except (KeyboardInterrupt, concurrent.futures.process.BrokenProcessPool):
            report.interrupted = True
            stop.set()  # each worker finishes the snapshot in hand and starts no other (Ctrl-C reaches them too)
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            pool.shutdown(wait=True)
    report.finished = not report.interrupted
    report.projects.sort(key=lambda r: r.project)
    return report


def _prepare_signatures(
    projects: list[Path], options: MigrationOptions, announce: Callable[[str], None] | None
) -> None:
    """Every model signature these projects need, built here once for all workers (a project that cannot be read
    is reported when its worker reaches it)."""
    checker = options.model_checker(announce)
    if checker.cache is None:  # nothing would outlive this process: each worker builds its own
        return
    snapshot_files = []
    for project in projects:
        with contextlib.suppress(Exception):
            snapshot_files += discover_project(project).snapshots
    checker.prepare(snapshot_files)


def _start_worker(stop_event: Any, debug: bool) -> None:
    """Each pool worker: stops between snapshots when told (any start method, any platform); ``--debug`` on."""
    signals.stop_between_snapshots(stop_event)
    if debug:
        show_tracebacks()
