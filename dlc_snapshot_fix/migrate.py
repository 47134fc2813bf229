"""The data path for one project: discover → inspect → transform → store → verify → report.

``migrate_project`` and ``restore_project`` are the public API; the CLI calls nothing
else. A snapshot that cannot be handled is reported as failed, unchanged, and the
others are still processed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock

from dlc_snapshot_fix import names, store, transforms
from dlc_snapshot_fix.discover import ProjectInventory, SnapshotFile, discover_project
from dlc_snapshot_fix.reading import SnapshotReadError, is_zip_snapshot, load_snapshot
from dlc_snapshot_fix.report import ProjectReport, SnapshotResult, Status
from dlc_snapshot_fix.verify import ModelChecker, compare_snapshots

LOCK_TIMEOUT_S = 0
"""Another run holding the project's lock makes this one stop at once rather than wait."""


class ProjectBusyError(RuntimeError):
    """Another dlc-snapshot-fix run is writing this project."""


def migrate_project(
    path: Path,
    *,
    write: bool = True,
    check_model: bool = True,
    trust: bool = False,
    on_result: Callable[[SnapshotResult], None] | None = None,
) -> ProjectReport:
    """Strip wrapper prefixes from every snapshot of the project at ``path``.

    With ``write=False`` nothing is written (no lock, no manifest, no backup) and
    snapshots that need work are reported as ``needs fix``. With ``check_model`` each
    state dict is checked against the model its ``pytorch_config.yaml`` describes,
    when deeplabcut is installed. ``trust=True`` unpickles without the allow-list
    (only for files the user vouches for: it can run code).
    """
    inventory = discover_project(path)
    report = _new_report(inventory, "migrate" if write else "check")
    checker = ModelChecker(enabled=check_model)
    with contextlib.ExitStack() as cleanup:
        writer = _ProjectWriter(inventory, report, cleanup) if write else None
        for snapshot_file in inventory.snapshots:
            _record(report, _migrate_one(snapshot_file, inventory.project, writer, checker, trust), on_result)
    return report


class _ProjectWriter:
    """Takes the project's lock and opens its manifest the first time a snapshot needs writing.

    Lazily, so that a run with nothing to do writes nothing at all (not even a lock file).
    """

    def __init__(self, inventory: ProjectInventory, report: ProjectReport, cleanup: contextlib.ExitStack):
        self.inventory = inventory
        self.report = report
        self._cleanup = cleanup
        self._manifest: store.Manifest | None = None

    def manifest(self) -> store.Manifest:
        if self._manifest is None:
            project = self.inventory.project
            self._cleanup.enter_context(_project_lock(project))
            self._manifest = store.Manifest(project)
            folders = [*self.inventory.model_folders, *_folders_below(names.tool_dir(project))]
            if removed := store.remove_stale_temps(folders):
                self.report.warnings.append(f"removed {removed} temp file(s) left by an interrupted run")
        return self._manifest


def _folders_below(root: Path) -> list[Path]:
    return [root, *(p for p in root.rglob("*") if p.is_dir())] if root.is_dir() else []


def restore_project(path: Path, *, on_result: Callable[[SnapshotResult], None] | None = None) -> ProjectReport:
    """Put back, byte for byte, every original this tool replaced in the project at ``path``."""
    inventory = discover_project(path)
    report = _new_report(inventory, "restore")
    report.skipped = []
    if not names.manifest_path(inventory.project).exists():
        return report
    with _project_lock(inventory.project):
        manifest = store.Manifest(inventory.project)
        latest = {entry.path: entry for entry in manifest.entries}
        for entry in latest.values():
            _record(report, _restore_one(inventory.project, manifest, entry), on_result)
    return report


def _new_report(inventory: ProjectInventory, action: str) -> ProjectReport:
    return ProjectReport(
        project=inventory.project,
        action=action,
        skipped=list(inventory.skipped),
        warnings=list(inventory.warnings),
        problems=list(inventory.problems),
    )


def _record(report: ProjectReport, result: SnapshotResult, on_result: Callable[[SnapshotResult], None] | None) -> None:
    report.results.append(result)
    if on_result is not None:
        on_result(result)


@contextlib.contextmanager
def _project_lock(project: Path) -> Iterator[None]:
    """Hold the project's lock for a writing run, or stop at once if another run holds it."""
    lock_file = names.lock_path(project)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(lock_file, timeout=LOCK_TIMEOUT_S):
            yield
    except filelock.Timeout as error:
        raise ProjectBusyError(
            f"{project}: another dlc-snapshot-fix run holds {lock_file}; wait for it to finish, then run again"
        ) from error


def _migrate_one(
    snapshot_file: SnapshotFile,
    project: Path,
    writer: _ProjectWriter | None,
    checker: ModelChecker,
    trust: bool,
) -> SnapshotResult:
    started = time.perf_counter()
    path = snapshot_file.path
    result = SnapshotResult(path=path, role=snapshot_file.role, status=Status.CLEAN)
    try:
        result.size = path.stat().st_size
        fixed, result.stripped = _inspect(snapshot_file, trust)
        if result.stripped and writer is not None:
            manifest = writer.manifest()
            # read again under the lock: another run may have rewritten it since
            fixed, result.stripped = _inspect(snapshot_file, trust)
    except (SnapshotReadError, transforms.SnapshotFormatError, OSError) as error:
        result.status = Status.FAILED
        result.reason = _failure_reason(error)
        result.seconds = time.perf_counter() - started
        return result
    for entry in transforms.present_entries(fixed, snapshot_file.state_dict_entries):
        result.model_checks[entry] = checker.check(snapshot_file, fixed, entry)
    if result.stripped:
        result.status = Status.NEEDS_FIX
        if writer is not None:
            _rewrite(result, project, manifest, fixed, trust)
    result.seconds = time.perf_counter() - started
    return result


def _inspect(snapshot_file: SnapshotFile, trust: bool) -> tuple[dict, list[transforms.StrippedEntry]]:
    snapshot = load_snapshot(snapshot_file.path, trust=trust)
    return transforms.strip_wrapper_prefixes(snapshot, snapshot_file.state_dict_entries)


def _rewrite(result: SnapshotResult, project: Path, manifest: store.Manifest, fixed: dict, trust: bool) -> None:
    """Backup, atomic replace, read-back; on a read-back difference the original goes back."""
    path = result.path
    change = "; ".join(f"{s.entry}: stripped {'+'.join(s.prefixes)}" for s in result.stripped)
    try:
        store.ensure_writable(path.parent)
        result.sha256_before = store.sha256_of(path)
        backup = names.backup_path(project, path, result.sha256_before)
        method = store.keep_original(path, backup, result.sha256_before)
        entry = manifest.add(path, backup, result.sha256_before, method, change)
        result.backup = backup
        temp, result.sha256_after = store.write_temp(path, fixed, zip_format=is_zip_snapshot(path))
        # record what is about to be at the path before it is there, so restore can recognise it after a crash
        entry.sha256_after, entry.state = result.sha256_after, "writing"
        try:
            manifest.save()
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        store.commit_temp(temp, path)
    except Exception as error:  # the snapshot path still holds the original: report, and go on
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        result.status = Status.FAILED
        result.reason = f"could not write ({detail}); the snapshot is unchanged. Fix that, run again"
        return
    try:
        differences = compare_snapshots(fixed, load_snapshot(path, trust=trust))
    except SnapshotReadError as error:
        differences = [f"the new file does not read back: {error.problem}"]
    if differences:
        store.put_back(backup, path)
        entry.state = "restored"
        manifest.save()
        result.status = Status.FAILED
        result.reason = f"read-back differed ({differences[0]}); the original was put back"
        return
    entry.state = "done"
    manifest.save()
    result.status = Status.FIXED


def _restore_one(project: Path, manifest: store.Manifest, entry: store.ManifestEntry) -> SnapshotResult:
    started = time.perf_counter()
    path = project / entry.path
    backup = project / entry.backup
    result = SnapshotResult(path=path, role="snapshot", status=Status.NOTHING_TO_RESTORE, backup=backup)
    result.sha256_before = entry.sha256_before
    if entry.state == "restored":
        result.reason = "already restored"
        return result
    current = store.sha256_of(path) if path.exists() else None
    if current == entry.sha256_before:
        result.reason = "already holds its original bytes"
    elif not backup.is_file():
        result.status = Status.FAILED
        result.reason = f"backup {backup} is missing; cannot restore"
    elif current not in (entry.sha256_after, None):
        result.status = Status.FAILED
        result.reason = (
            f"changed since this tool rewrote it (sha256 differs); not restored. The original is still at {backup}"
        )
    elif store.sha256_of(backup) != entry.sha256_before:
        result.status = Status.FAILED
        result.reason = f"backup {backup} does not match the recorded sha256; not restored"
    else:
        store.put_back(backup, path)
        result.status = Status.RESTORED
        result.sha256_after = store.sha256_of(path)
    if result.status != Status.FAILED:
        entry.state = "restored"
        manifest.save()
    result.seconds = time.perf_counter() - started
    return result


def _failure_reason(error: Exception) -> str:
    if isinstance(error, SnapshotReadError):
        return f"{error.problem}. {error.advice}"
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or error}). Check its permissions, then run again"
    return f"{error}. The file is left as it is"
