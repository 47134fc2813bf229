"""The data path for one project: discover → inspect → transform → store → verify → report.

``migrate_project`` and ``restore_project`` are the public API; the CLI calls nothing
else. A snapshot that cannot be handled is reported as failed, unchanged, and the
others are still processed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dlc_snapshot_fix import (
    fserrors,
    names,
    osfiles,
    pickled,
    rezip,
    signals,
    signature,
    store,
    transforms,
    verify,
    zipappend,
)
from dlc_snapshot_fix.discover import ProjectInventory, SnapshotFile, discover_project
from dlc_snapshot_fix.reading import SnapshotReadError, is_zip_snapshot, load_snapshot, read_recorded
from dlc_snapshot_fix.report import ProjectReport, SnapshotResult, Status
from dlc_snapshot_fix.verify import (
    ModelChecker,
    compare_snapshots,
    records_in,
    same_structure,
    streamed_differences,
)

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 0
"""Another run holding the project's lock makes this one stop at once rather than wait."""


KEPT_BY = {"hardlink": "hard link", "copy": "copy", "existing": "earlier backup"}
"""The manifest's ``backup_method`` in a report's words."""


class ProjectBusyError(RuntimeError):
    """Another dlc-snapshot-fix run is writing this project."""


@dataclass(frozen=True)
class MigrationOptions:
    """What a migration may change beyond the wrapper prefixes (always stripped), and how it reads."""

    check_model: bool = True
    trust: bool = False
    """Unpickle without the allow-list: only for files the user vouches for (it can run code)."""
    fix_metadata: bool | None = None
    """Turn numpy scalars in ``metadata`` (3.0.0rc5 and older) into the same plain numbers: ``None`` where
    DeepLabCut, running with this numpy, would refuse them; ``True`` always; ``False`` never."""
    rename_legacy_best: bool = False
    """Rename ``snapshot-best.pt`` to ``snapshot-best-<epoch>.pt`` (changes DeepLabCut's scorer name)."""
    hash_files: bool = False
    """``append`` only: also compute whole-file sha256 before and after (reads every byte; rewrite always does)."""
    backup_dir: Path | None = None
    """Also keep a full, verified copy of every original here (``<backup_dir>/<project name>/<path>``)."""
    method: str = "rewrite"
    """``rewrite``: keep the original, write a new file, swap it in. ``append``: append a new
    ``data.pkl`` and directory (kilobytes; undo = truncate); falls back to ``rewrite`` where it cannot."""
    deep_check: bool = False
    """DeepLabCut's verdict from its own loader over every byte, instead of from the model's signature."""
    signature_cache: bool = True
    """Keep model signatures in the user's cache folder between runs (``False``: built for this run only)."""

    def model_checker(self, announce: Callable[[str], None] | None = None) -> ModelChecker:
        """The checker these options ask for (its signatures cached unless told not to)."""
        cache = signature.SignatureCache() if self.signature_cache else None
        return ModelChecker(enabled=self.check_model, deep=self.deep_check, cache=cache, announce=announce)


def migrate_project(
    path: Path,
    *,
    write: bool = True,
    options: MigrationOptions | None = None,
    on_result: Callable[[SnapshotResult], None] | None = None,
    volume: osfiles.Volume | None = None,
    announce: Callable[[str], None] | None = None,
    **option_flags: bool,
) -> ProjectReport:
    """Strip wrapper prefixes (and, if asked, apply the legacy clean-ups) in every snapshot at ``path``.

    With ``write=False`` nothing is written (no lock, no manifest, no backup) and
    snapshots that need work are reported as ``needs fix``. Options come as a
    :class:`MigrationOptions` or as its fields by keyword (``check_model=False``).
    ``volume``: the file system the project was found on (default: where it is now); if it
    goes away, the run stops writing there and says so in ``report.problems``. ``announce``
    hears what takes a while before it starts (building DeepLabCut's models for their signatures).
    """
    options = replace(options or MigrationOptions(), **option_flags)  # type: ignore[arg-type]
    inventory = discover_project(path)
    report = _new_report(inventory, "migrate" if write else "check")
    checker = options.model_checker(announce)
    checker.prepare(inventory.snapshots)
    with contextlib.ExitStack() as cleanup:
        writer = (
            _ProjectWriter(inventory, report, cleanup, volume or osfiles.Volume(inventory.project)) if write else None
        )
        try:
            if writer is not None and store.stale_temps(writer.temp_folders()):
                writer.manifest()  # an interrupted run left debris: take the lock and clean it up
            for index, snapshot_file in enumerate(inventory.snapshots):
                if writer is not None:
                    writer.upcoming = (
                        inventory.snapshots[index + 1].path if index + 1 < len(inventory.snapshots) else None
                    )
                _record(report, _migrate_one(snapshot_file, inventory.project, writer, checker, options), on_result)
            if writer is not None:
                writer.finish()
        except osfiles.FileSystemGoneError as gone:
            unfinished = len(inventory.snapshots) - len(report.results)
            report.problems.append(f"{gone} ({unfinished} snapshot(s) not done: the next run looks at them)")
    return report


class _ProjectWriter:
    """Takes the project's lock and opens its manifest the first time a snapshot needs writing.

    Lazily, so that a run with nothing to do writes nothing at all (not even a lock file).
    """

    def __init__(
        self, inventory: ProjectInventory, report: ProjectReport, cleanup: contextlib.ExitStack, volume: osfiles.Volume
    ):
        self.inventory = inventory
        self.report = report
        self._cleanup = cleanup
        self.volume = volume
        self._manifest: store.Manifest | None = None
        self._hashes: store.HashAhead | None = None
        self.upcoming: Path | None = None
        self._copies_announced = False
        """The snapshot after the one in hand: hashed ahead once a rewrite begins (the next likely needs one too)."""

    def sha256_before_rewrite(self, path: Path) -> str:
        """``path``'s sha256 (hashed ahead where it was); then the next snapshot's hashing begins."""
        if self._hashes is None:
            self._hashes = store.HashAhead()
            self._cleanup.callback(self._hashes.close)
        digest = self._hashes.sha256_of(path)
        if self.upcoming is not None:
            self._hashes.start(self.upcoming)
        return digest

    def manifest(self) -> store.Manifest:
        if self._manifest is None:
            project = self.inventory.project
            self.volume.check()
            self._cleanup.enter_context(_project_lock(project))
            self._manifest = store.Manifest(project, guard=self.volume.check)
            if removed := store.remove_stale_temps(self.temp_folders()):
                self.report.warnings.append(f"removed {removed} temp file(s) left by an interrupted run")
            for undone in _finish_interrupted_appends(self._manifest, project):
                self.report.warnings.append(f"undid an interrupted append to {undone}")
        return self._manifest

    def announce_copies(self, path: Path) -> None:
        """The first original this drive could not hard-link: say what copying the rest of them may take."""
        if self._copies_announced:
            return
        self._copies_announced = True
        snapshots = [f.path for f in self.inventory.snapshots]
        rest = snapshots[snapshots.index(path) :] if path in snapshots else [path]
        most = sum(p.stat().st_size for p in rest if p.exists())
        free = shutil.disk_usage(path.parent).free
        self.report.warnings.append(
            f"this drive cannot hard-link: each original is kept as a full, verified copy (up to "
            f"{most / 2**20:.0f} MiB for the {len(rest)} snapshot(s) from {path.name} on; "
            f"{free / 2**20:.0f} MiB free). Each copy and its new file are checked against the free space "
            "before either is written"
        )

    def finish(self) -> None:
        """Save what is left unsaved (entries marked done after their journal was written); never an empty one."""
        if self._manifest is not None and (self._manifest.entries or self._manifest.path.exists()):
            self._manifest.save()

    def temp_folders(self) -> list[Path]:
        """Where a run of ours writes temp files: the snapshot folders and the tool's own folder."""
        return [*self.inventory.model_folders, *_folders_below(names.tool_dir(self.inventory.project))]


def _finish_interrupted_appends(manifest: store.Manifest, project: Path) -> list[str]:
    """Settle appends a killed run left unconfirmed: completed ones are done, partial ones are truncated away."""
    undone = []
    for entry in manifest.entries:
        if entry.backup_method != "append" or entry.state not in ("pending", "writing"):
            continue
        path, size = project / entry.path, entry.original_size or 0
        if not path.is_file() or store.end_sha256(path, size) != entry.original_end_sha256:
            continue  # replaced or changed since: not ours to touch
        if path.stat().st_size == size:
            entry.state = "restored"
        elif zipappend.append_completed(path, size):
            entry.state = "done"
        else:
            zipappend.truncate(path, size)
            entry.state = "restored"
            undone.append(entry.path)
        manifest.save()
    return undone


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
        for entry in reversed(manifest.entries):  # newest first: stacked changes unwind in order
            if entry.state != "restored":
                _record(report, _restore_fenced(inventory.project, manifest, entry), on_result)
    return report


def _restore_fenced(project: Path, manifest: store.Manifest, entry: store.ManifestEntry) -> SnapshotResult:
    """One original put back; whatever goes wrong is that file's failure, and the other files go on."""
    try:
        return _restore_one(project, manifest, entry)
    except Exception as error:
        appended = entry.backup_method == "append"
        result = SnapshotResult(
            path=project / (entry.renamed_from or entry.path), role="snapshot", status=Status.FAILED
        )
        result.backup = None if appended else project / entry.backup
        kept = "inside the file (its first bytes)" if appended else f"at {result.backup}"
        if isinstance(error, OSError):
            result.reason = fserrors.reason(
                error,
                "cannot be restored",
                f"it is left as it was; the original is still kept {kept}",
                "Fix that, then run restore again",
            )
        else:
            result.reason = f"cannot be restored ({type(error).__name__}: {error}); the original is still kept {kept}"
        return result


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
    import filelock  # (imports asyncio: a cost only a writing run pays)

    lock_file = names.lock_path(project)
    lock_file.parent.mkdir(exist_ok=True)  # in the project, never a path to it (its drive may have gone away)
    lock = filelock.FileLock(lock_file, timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout as error:
        raise ProjectBusyError(
            f"{project}: another dlc-snapshot-fix run holds {lock_file}; wait for it to finish, then run again"
        ) from error
    except OSError as error:  # a share that refuses locks (or the lock file): no snapshot of it can be written
        raise ProjectBusyError(
            fserrors.reason(error, f"{project}: cannot take the lock {lock_file}", "nothing was written", "Fix that")
        ) from error
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # a share that went away takes the lock with it: nothing to release
            lock.release()


@dataclass
class _Plan:
    """What one snapshot should become: the new dict, the changes in words, and its (maybe new) path."""

    fixed: dict
    stripped: list[transforms.StrippedEntry]
    changes: list[str]
    destination: Path
    numpy_found: dict[str, list[str]]
    """numpy values left in the snapshot, by top-level entry: whether DeepLabCut reads them is its call."""
    append: zipappend.ZipLayout | None = None
    """For the fast path: the original's layout (the new ``data.pkl`` is :attr:`result_pickle`); ``None`` for a
    full rewrite."""
    expected_records: Any = None
    """For a rewrite of a zip: the result as tensor records, so the read-back can stream instead of map."""
    rezip: rezip.RezipPlan | None = None
    """For a rewrite at copy speed (a zip laid out as torch writes it); ``None``: torch rewrites it."""
    make_pickle: Callable[[], bytes] | None = None
    """Makes the result's ``data.pkl`` where it is known without writing (a recorded pickle)."""
    layout: zipappend.ZipLayout | None = None
    method: str = "rewrite"
    """How the file will be written when it changes: ``append`` or ``rewrite``."""
    method_note: str | None = None
    """Why ``--method append`` was asked and this snapshot takes the rewrite."""
    facts: dict[str, Any] | None = None
    """What the verdict reads of :attr:`fixed` (:func:`signature.facts_only`), kept when torch's rewrite lets go of
    the tensors before the swap."""

    @functools.cached_property
    def result_pickle(self) -> bytes | None:
        """What a check shows DeepLabCut, made on first use: a check without a model check never needs it."""
        return self.make_pickle() if self.make_pickle is not None else None


def _plan(snapshot_file: SnapshotFile, options: MigrationOptions, write: bool) -> _Plan:
    """Read and transform (pure after the read), asking torch only where the work needs it.

    The torch-free reader comes first: what it accepts, torch reads the same way (never
    "fix" what torch cannot open), and a check, an append or a clean snapshot need no more.
    torch loads the file (memory-mapped: no tensor data is read) for a full rewrite (it
    writes with ``torch.save``), an exported model DeepLabCut's model is checked with,
    ``--trust``, and whatever the torch-free reader leaves to torch's judgement.
    """
    recorded, torch_only = None, "--trust reads and writes it with torch"
    if not options.trust:
        try:
            recorded = _recorded_plan(snapshot_file, options, write)
        except pickled.NotRecordable as error:
            torch_only = f"its data.pkl holds what only torch's full load reads ({error})"
    if recorded is not None:
        rewrite = recorded.changes and write and recorded.append is None and recorded.rezip is None
        if not (rewrite or (snapshot_file.role == "exported" and options.check_model)):
            return recorded
        torch_only = recorded.method_note or "an exported model is rewritten by torch, which its model check reads"
    snapshot = load_snapshot(snapshot_file.path, trust=options.trust)
    plan = _transform(snapshot_file, snapshot, options, lambda: verify.numpy_dialect_of(snapshot_file.path))
    if recorded is not None:
        plan.expected_records, plan.make_pickle, plan.layout = recorded.fixed, recorded.make_pickle, recorded.layout
    if plan.changes and options.method == "append":
        plan.method_note = torch_only
    return plan


def _recorded_plan(snapshot_file: SnapshotFile, options: MigrationOptions, write: bool) -> _Plan:
    """The plan from the torch-free reader, tensors as records; the new ``data.pkl`` is made now if it is to be
    written (a pickle that cannot be made then goes to torch), else when a check first needs it."""
    recorded = read_recorded(snapshot_file.path)
    dialect_of = functools.cache(lambda: pickled.numpy_dialect(recorded.pickle))  # walks the pickle: once at most
    plan = _transform(snapshot_file, recorded.snapshot, options, dialect_of)
    plan.layout = recorded.layout
    fixed, order = plan.fixed, recorded.storage_order
    dialect = dialect_of() if plan.numpy_found else None  # numpy values kept: written under the names they had
    if plan.changes and write:  # made now: a pickle that cannot be made sends the snapshot to torch's rewrite
        new_pickle = pickled.dumps(fixed, order, dialect)
        plan.make_pickle = lambda: new_pickle
    elif plan.changes:
        plan.make_pickle = lambda: pickled.dumps(fixed, order, dialect)
    else:
        plan.make_pickle = lambda: recorded.pickle
    fast = options.method == "append" and not (options.rename_legacy_best and snapshot_file.legacy_best)
    if plan.changes and fast:
        plan.method_note = _append_refusal(recorded.layout, plan.result_pickle)
        if plan.method_note is None:
            plan.append = recorded.layout
            plan.method = "append"
    if plan.changes and plan.append is None:
        with contextlib.suppress(rezip.NotRezippable, OSError):
            plan.rezip = rezip.plan(snapshot_file.path, recorded.layout)
            plan.expected_records = plan.fixed
    return plan


def _append_refusal(layout: zipappend.ZipLayout, new_pickle: bytes | None) -> str | None:
    """Why this snapshot takes the rewrite instead of the append, or ``None`` if the append can keep its promise.

    The append is crash-safe only while everything it writes before its end records stays
    within the window in which zip readers find the original end record
    (:data:`zipappend.MAX_TAIL`); a larger pickle (HRNet, DEKR, CTD, a snapshot with
    optimizer state) takes the copy-speed rewrite in the same run.
    """
    assert new_pickle is not None  # a recorded plan always makes its pickle
    body, _ = zipappend.build_tail(layout, new_pickle)
    if len(body) <= zipappend.MAX_TAIL:
        return None
    return (
        f"the new pickle is {_kilobytes(len(new_pickle))}, too large to append safely (with its directory "
        f"{_kilobytes(len(body))}; an append writes at most {_kilobytes(zipappend.MAX_TAIL)}, so that one cut "
        "short leaves the original loadable)"
    )


def _kilobytes(size: int) -> str:
    return f"{size / 1024:,.1f} KiB"


def _transform(
    snapshot_file: SnapshotFile, snapshot: Any, options: MigrationOptions, dialect: Callable[[], str | None]
) -> _Plan:
    """Pure: every change the options ask for, applied to a loaded (or recorded) snapshot.

    ``dialect`` tells the numpy whose names the original's pickle uses: whether DeepLabCut
    refuses numpy metadata depends on it (:func:`verify.deeplabcut_refuses_metadata`). It
    is asked only where ``metadata`` holds numpy values (it reads the whole pickle).
    """
    transforms.check_nesting(snapshot)
    if not isinstance(snapshot, dict):
        raise transforms.SnapshotFormatError(
            f"holds a {type(snapshot).__name__}, not a DeepLabCut snapshot dict. Snapshots are "
            "torch.save({'model': ..., 'metadata': ...}); leave this file alone or move it out of the model folder"
        )
    fixed, stripped = transforms.strip_wrapper_prefixes(snapshot, snapshot_file.state_dict_entries)
    changes = [f"stripped {' + '.join(map(repr, s.prefixes))} from {s.entry!r} ({s.key_count} keys)" for s in stripped]
    numpy_found = transforms.numpy_values(fixed)
    if "metadata" in numpy_found and options.fix_metadata is not False:
        refused = verify.deeplabcut_refuses_metadata(numpy_found["metadata"], dialect())
        if options.fix_metadata or refused:
            fixed, count = transforms.numpy_metadata_to_python(fixed)
            if count:
                why = f" ({refused}; the values are the same)" if refused else ""
                changes.append(f"{count} numpy scalar(s) in 'metadata' made plain numbers{why}")
                numpy_found = transforms.numpy_values(fixed)
    destination = snapshot_file.path
    if options.rename_legacy_best and snapshot_file.legacy_best:
        epoch = transforms.epoch_of(fixed)
        if epoch is None:
            raise transforms.SnapshotFormatError(
                "legacy best snapshot without a whole-number metadata['epoch']; cannot name it. Rename it by hand"
            )
        destination = snapshot_file.path.with_name(names.best_name(snapshot_file.prefix, epoch))
        if destination.exists():
            raise transforms.SnapshotFormatError(f"cannot rename: {destination.name} exists already")
        changes.append(f"renamed to {destination.name} (DeepLabCut's scorer name for it changes)")
    return _Plan(fixed, stripped, changes, destination, numpy_found)


def _migrate_one(
    snapshot_file: SnapshotFile,
    project: Path,
    writer: _ProjectWriter | None,
    checker: ModelChecker,
    options: MigrationOptions,
) -> SnapshotResult:
    """One snapshot, fenced: whatever goes wrong becomes this snapshot's failure, and the run goes on."""
    if signals.stopping():  # a pool worker told to stop: between two snapshots is where it stops
        raise signals.interrupted()
    started = time.perf_counter()
    result = SnapshotResult(path=snapshot_file.path, role=snapshot_file.role, status=Status.CLEAN)
    before = _identity_or_none(snapshot_file.path)
    try:
        _migrate_fenced(result, snapshot_file, project, writer, checker, options)
    except (ProjectBusyError, store.ManifestError, osfiles.FileSystemGoneError):
        raise  # about the whole project, not this file: the caller stops the project
    except Exception as error:
        logger.debug("%s: unexpected error", snapshot_file.path, exc_info=True)
        changed = _identity_or_none(snapshot_file.path) != before
        result.reason = _unexpected_reason(error, changed)
        result.status = Status.FAILED
    if signals.stopping():  # the file is settled (original, or new and verified); torch may have eaten the interrupt
        raise signals.interrupted()
    result.seconds = time.perf_counter() - started
    return result


def _migrate_fenced(
    result: SnapshotResult,
    snapshot_file: SnapshotFile,
    project: Path,
    writer: _ProjectWriter | None,
    checker: ModelChecker,
    options: MigrationOptions,
) -> None:
    """read → transform → (back up, write, read back) → ask DeepLabCut; errors the steps expect become reasons."""
    path = snapshot_file.path
    try:
        seen = store.file_identity(path)
        result.size = path.stat().st_size
        plan = _plan(snapshot_file, options, write=writer is not None)
        if plan.changes and writer is not None:
            writer.manifest()  # the lock, before looking again
            if store.file_identity(path) != seen:  # another run rewrote it before we held the lock: look again
                plan = _plan(snapshot_file, options, write=True)
    except (SnapshotReadError, transforms.SnapshotFormatError, OSError) as error:
        result.status = Status.FAILED
        result.reason = _failure_reason(error)
        return
    result.stripped, result.changes = plan.stripped, plan.changes
    if plan.changes:
        result.method, result.method_note = plan.method, plan.method_note
    entries = transforms.present_entries(plan.fixed, snapshot_file.state_dict_entries)
    if snapshot_file.role == "exported":  # DeepLabCut-Live loads these, not DeepLabCut's runners: check in memory
        for entry in entries:
            result.model_checks[entry] = _judged(checker, snapshot_file, plan, entry, options) or checker.check(
                snapshot_file, plan.fixed, entry
            )
    if plan.changes:
        result.status = Status.NEEDS_FIX
        if writer is not None:
            _copy_elsewhere(result, project, options.backup_dir)
        if writer is not None and result.status != Status.FAILED:
            if plan.append is not None:
                _append(result, writer, plan, options.hash_files)
            else:
                _rewrite(result, writer, plan, options.trust)
    if result.status == Status.FAILED or snapshot_file.role == "exported":
        return
    for entry in entries:  # DeepLabCut's verdict on the file as it is now (or, for a check, as it will be)
        if (judged := _judged(checker, snapshot_file, plan, entry, options)) is not None:
            result.model_checks[entry] = judged  # plan.fixed is what the file holds, or will hold
        elif result.status in (Status.CLEAN, Status.FIXED):
            result.model_checks[entry] = checker.check(snapshot_file, None, entry, source=plan.destination)
        elif writer is None and checker.enabled and (planned_tail := _planned_tail(plan)) is not None:
            opener = verify.joined_opener(path, planned_tail)
            result.model_checks[entry] = checker.check(snapshot_file, None, entry, source=opener)
        else:  # a pickle only a full load reads: DeepLabCut reads the file as it is, the keys are the planned ones
            result.model_checks[entry] = checker.check(snapshot_file, plan.fixed, entry, source=path)
    dialect = pickled.numpy_dialect(plan.result_pickle) if plan.numpy_found and plan.result_pickle else None
    hint, note = verify.judge_numpy_values(plan.numpy_found, result.model_checks.values(), dialect)
    result.hints += [hint] if hint else []
    result.notes += [note] if note else []


def _judged(
    checker: ModelChecker, snapshot_file: SnapshotFile, plan: _Plan, entry: str, options: MigrationOptions
) -> verify.ModelCheck | None:
    """DeepLabCut's verdict from the model's signature, or ``None`` where its full load must judge.

    The plan was read under weights-only rules (the torch-free reader or torch's weights-only
    load), which the signature verdict builds on; ``--trust`` reads without them.
    """
    snapshot = plan.facts if plan.facts is not None else plan.fixed
    if options.trust or not isinstance(snapshot, dict) or entry not in snapshot:
        return None  # (a plan whose tensors were let go without their facts: the full load judges the file)
    if not _dense_tensors_only(snapshot):
        return None
    return checker.judge(snapshot_file, snapshot, entry)


def _dense_tensors_only(snapshot: dict) -> bool:
    """Whether every loaded tensor in the snapshot's state dicts is a plain dense one: the replay knows no other
    kind, so a sparse or subclassed tensor (which only torch's full load reads) is left to DeepLabCut's full load."""
    torch = sys.modules.get("torch")
    if torch is None:
        return True
    return all(
        value.layout == torch.strided and type(value) in (torch.Tensor, torch.nn.Parameter)
        for state_dict in snapshot.values()
        if isinstance(state_dict, dict)
        for value in state_dict.values()
        if isinstance(value, torch.Tensor)
    )


def _planned_tail(plan: _Plan) -> bytes | None:
    """What an append would add: the file DeepLabCut is asked about in a check, without writing it."""
    try:
        if plan.layout is None or plan.result_pickle is None:
            return None
    except pickled.NotRecordable:  # a pickle only a full load reads
        return None
    body, end = zipappend.build_tail(plan.layout, plan.result_pickle)
    return body + end


def _rewrite(result: SnapshotResult, writer: _ProjectWriter, plan: _Plan, trust: bool) -> None:
    """Backup, atomic write, read-back; on a read-back difference the original goes back."""
    path, destination = result.path, plan.destination
    project, manifest = writer.inventory.project, writer.manifest()
    try:
        writer.volume.check()
        store.ensure_writable(path.parent)
        result.sha256_before = result.sha256_before or writer.sha256_before_rewrite(path)  # (--backup-dir: hashed)
        backup = names.backup_path(project, path, result.sha256_before)
        _fits_windows_paths(backup, names.temp_path(destination, "0" * 8))
        method = store.keep_original(path, backup, result.sha256_before, then_writing=result.size or 0)
        result.kept_by = KEPT_BY[method]
        if method == "copy":
            writer.announce_copies(path)
        renamed_from = path if destination != path else None
        entry = manifest.add(destination, backup, result.sha256_before, method, "; ".join(plan.changes), renamed_from)
        result.backup = backup
        if plan.rezip is not None:
            assert plan.result_pickle is not None  # a copy-speed rewrite is planned from a recorded pickle
            temp, result.sha256_after = store.write_rezipped(
                path, plan.rezip, plan.result_pickle, lambda written: _check_rezipped(written, plan)
            )
        else:
            temp, result.sha256_after = store.write_temp(path, plan.fixed, zip_format=is_zip_snapshot(path))
            differences = _read_back_before_the_swap(temp, backup, plan, trust)
            if differences:
                temp.unlink(missing_ok=True)
                result.status = Status.FAILED
                result.reason = f"read-back differed ({differences[0]}); the snapshot is unchanged"
                return
        # record what is about to be at the path before it is there, so restore can recognise it after a crash
        entry.sha256_after, entry.state = result.sha256_after, "writing"
        try:
            manifest.save()
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        store.commit_temp(temp, destination)
        if renamed_from is not None:
            path.unlink()  # its bytes are the backup's
            store.fsync_dir(path.parent)
            result.renamed_to = destination
    except osfiles.FileSystemGoneError:
        raise
    except Exception as error:  # the snapshot path still holds the original: report, and go on
        _stop_if_gone(writer.volume, path.parent)
        result.status = Status.FAILED
        result.reason = fserrors.reason(
            error, "could not write", "the snapshot is unchanged", "Fix that, then run again"
        )
        return
    # proven before it replaced the original (_check_rezipped, _read_back_before_the_swap); the same inode since
    entry.state = "done"
    manifest.save()
    result.status = Status.FIXED
    with contextlib.suppress(OSError):  # blocks a copy-on-write file system cloned from the original cost nothing
        written = destination.stat().st_size - (osfiles.shared_bytes(destination) or 0)
        result.new_bytes = written + (result.size or 0 if method == "copy" else 0)


def _fits_windows_paths(*paths: Path) -> None:
    """Before anything is written: a backup or temp path Windows cannot create is this snapshot's failure."""
    too_long = osfiles.too_long_for_windows(*paths)
    if too_long is not None:
        path, length = too_long
        raise OSError(
            errno.ENAMETOOLONG,
            f"{path} would be {length} characters, over Windows' {osfiles.WINDOWS_MAX_PATH} without long paths. "
            "Enable long paths (LongPathsEnabled, an administrator's registry setting), or move the project "
            "closer to the drive's root",
        )


def _read_back_before_the_swap(written: Path, backup: Path, plan: _Plan, trust: bool) -> list[str]:
    """What torch wrote, read back before it replaces the original; then every map of either file let go.

    Windows refuses to replace (or rename over) a file a process still maps, and torch maps
    what it loads here; so the original's tensors (``plan.fixed``) and the read-back are
    released before :func:`store.commit_temp`. One snapshot in memory at most.
    """
    if isinstance(plan.fixed, dict) and _dense_tensors_only(plan.fixed):
        plan.facts = signature.facts_only(plan.fixed)  # for the verdict after the swap
    try:
        if plan.expected_records is not None:
            plan.fixed = {}
            gc.collect()
            return streamed_differences(backup, written, plan.expected_records)
        reread = load_snapshot(written, trust=trust)  # torch's legacy format, or a pickle only a full load reads
        try:
            return compare_snapshots(plan.fixed, reread)
        finally:
            del reread
            plan.fixed = {}
            gc.collect()
    except Exception as error:  # whatever keeps the result from being proven leaves the original in place
        return [f"the new file does not read back: {type(error).__name__}: {error}"]


def _check_rezipped(written: Path, plan: _Plan) -> None:
    """A rewrite at copy speed, before it replaces anything: each record against its CRC, the new pickle,
    then the file read as torch will read it, to the snapshot meant."""
    assert plan.rezip is not None and plan.result_pickle is not None
    rezip.read_back(written, plan.rezip.layout, plan.result_pickle)
    reread = read_recorded(written, written_here=plan.result_pickle)
    if reread.storage_order != _storage_order(plan.expected_records) or not same_structure(
        plan.expected_records, reread.snapshot
    ):
        raise rezip.ReadBackError("it does not read as the snapshot meant")


def _copy_elsewhere(result: SnapshotResult, project: Path, backup_dir: Path | None) -> None:
    """``--backup-dir``: a full copy of the original outside the project, verified, before anything is written."""
    if backup_dir is None:
        return
    target = Path(backup_dir) / project.name / result.path.relative_to(project)
    try:
        sha = store.sha256_of(result.path)
        store.keep_original(result.path, target, sha, link=False)
    except Exception as error:
        result.status = Status.FAILED
        result.reason = fserrors.reason(
            error, "could not copy it to the backup folder", "the snapshot is unchanged", "Fix that, then run again"
        )
        return
    result.sha256_before = result.sha256_before or sha
    result.extra_backup = target


def _append(result: SnapshotResult, writer: _ProjectWriter, plan: _Plan, hash_files: bool) -> None:
    """The fast path: journal in the manifest, append, read the new pickle back; on a difference, truncate."""
    assert plan.append is not None and plan.result_pickle is not None
    layout, new_pickle = plan.append, plan.result_pickle
    path, manifest = result.path, writer.manifest()
    try:
        writer.volume.check()
        body, end = zipappend.build_tail(layout, new_pickle)
        store.ensure_space(path.parent, len(body) + len(end))
        if hash_files and result.sha256_before is None:  # (--backup-dir has hashed it already)
            result.sha256_before = store.sha256_of(path)
        entry = manifest.add(
            path,
            path,
            result.sha256_before,
            "append",
            "; ".join(plan.changes),
            original_size=layout.size,
            original_end_sha256=store.end_sha256(path, layout.size),
            state="writing",  # the journal: path, original size and fingerprint, durable before the first byte
        )
        zipappend.append(path, layout.size, body, end)
    except osfiles.FileSystemGoneError:
        raise
    except Exception as error:
        _stop_if_gone(writer.volume, path.parent)
        result.status = Status.FAILED
        result.reason = fserrors.reason(
            error, "could not append", "a partial append is undone by the next run", "Fix that, then run again"
        )
        return
    result.backup = None
    result.kept_by, result.new_bytes = "append", len(body) + len(end)
    problems = _append_read_back(path, layout, new_pickle, plan.fixed)
    if problems:
        zipappend.truncate(path, layout.size)
        entry.state = "restored"
        manifest.save()
        result.status = Status.FAILED
        result.reason = f"read-back differed ({problems[0]}); the append was truncated away"
        return
    if hash_files:
        result.sha256_after = entry.sha256_after = store.sha256_of(path)
    entry.state = "done"  # saved with the next entry or at the end of the project: "writing" is safe meanwhile
    result.status = Status.FIXED


def _append_read_back(path: Path, layout: zipappend.ZipLayout, new_pickle: bytes, expected: dict) -> list[str]:
    """torch does not checksum data.pkl: read it back through the new directory, as torch will, and compare.

    The bytes must be the pickle meant, the directory must list the same members in the
    same order, and the file must read (by the reader as strict as torch's) to the
    expected keys with storages in the original order. The tensor bytes are not read:
    they were never written.
    """
    try:
        new_layout = zipappend.read_layout(path)
        record = new_layout.pickle_record()
        if record.header_offset != layout.size or zipappend.read_member(path, new_layout, record) != new_pickle:
            return ["the directory does not point at the new data.pkl"]
        old_record = layout.pickle_record()
        if [r.raw for r in new_layout.records if r is not record] != [
            r.raw for r in layout.records if r is not old_record
        ]:
            return ["the directory lists other members"]
        reread = read_recorded(path, written_here=new_pickle)
    except Exception as error:  # whatever keeps the result from being proven truncates the append away
        return [f"the appended file does not read back: {type(error).__name__}: {error}"]
    if reread.storage_order != _storage_order(expected):
        return ["storages are referenced in another order"]
    return (
        [] if same_structure(expected, reread.snapshot) else ["the new data.pkl does not parse to the snapshot meant"]
    )


def _storage_order(expected: Any) -> list[str]:
    """The storages of the snapshot meant, in the order its pickle first references them."""
    return list(dict.fromkeys(r.storage.key for r in records_in(expected)))


def _undo(entry: store.ManifestEntry, project: Path) -> None:
    """Put the original back where it was, and remove a renamed copy."""
    original_path = project / (entry.renamed_from or entry.path)
    store.put_back(project / entry.backup, original_path)
    if entry.renamed_from:
        (project / entry.path).unlink(missing_ok=True)
    entry.state = "restored"


def _restore_one(project: Path, manifest: store.Manifest, entry: store.ManifestEntry) -> SnapshotResult:
    started = time.perf_counter()
    path = project / entry.path
    original_path = project / (entry.renamed_from or entry.path)
    backup = project / entry.backup
    result = SnapshotResult(path=original_path, role="snapshot", status=Status.NOTHING_TO_RESTORE, backup=backup)
    result.sha256_before = entry.sha256_before
    if entry.state == "restored":
        result.reason = "already restored"
        return result
    if entry.backup_method == "append":
        _restore_append(result, entry, path)
        if result.status != Status.FAILED:
            entry.state = "restored"
            manifest.save()
        result.seconds = time.perf_counter() - started
        return result
    current = store.sha256_of(path) if path.exists() else None
    original_in_place = original_path.exists() and (
        current == entry.sha256_before if original_path == path else not path.exists()
    )
    if original_in_place:
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
        _undo(entry, project)
        result.status = Status.RESTORED
        result.sha256_after = store.sha256_of(original_path)
    if result.status != Status.FAILED:
        entry.state = "restored"
        manifest.save()
    result.seconds = time.perf_counter() - started
    return result


def _restore_append(result: SnapshotResult, entry: store.ManifestEntry, path: Path) -> None:
    """Undo an append by truncating to the original size, once the original's end is seen intact."""
    size = entry.original_size or 0
    result.backup = None
    if not path.is_file() or path.stat().st_size < size or store.end_sha256(path, size) != entry.original_end_sha256:
        result.status = Status.FAILED
        result.reason = "changed since this tool appended to it (its original part differs); not restored"
    elif path.stat().st_size == size:
        result.reason = "already holds its original bytes"
    else:
        zipappend.truncate(path, size)
        result.status = Status.RESTORED


def _describe(error: Exception) -> str:
    """An OS error's own words ("No space left on device"), else the error's message."""
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _stop_if_gone(volume: osfiles.Volume, folder: Path) -> None:
    """After a failed write: if the drive or share went away, that stops the project (not just this file).

    A temp file of the write may be left on it, where nothing can reach it now: the next
    run removes it (its name matches no snapshot DeepLabCut lists).
    """
    volume.check(f"A temp file of the write in hand may be left in {folder} there: the next run removes it. ")


def _identity_or_none(path: Path) -> tuple[int, int, int] | None:
    try:
        return store.file_identity(path)
    except OSError:
        return None


def _unexpected_reason(error: Exception, changed: bool) -> str:
    """An error no step expected: say what it was, what state the file is in (looked at, not assumed), what next."""
    what = f"{type(error).__name__}: {_describe(error)}" if str(error) else type(error).__name__
    if changed:
        return (
            f"changed, then {what} was raised. The original is kept: "
            "`dlc-snapshot-fix restore PROJECT` puts it back. Run with --debug for the traceback"
        )
    return f"cannot be handled ({what}); the file is left as it is. Run with --debug for the traceback"


def _failure_reason(error: Exception) -> str:
    if isinstance(error, SnapshotReadError):
        return f"{error.problem}. {error.advice}"
    if isinstance(error, OSError):
        return fserrors.reason(
            error, "cannot be read", "the file is left as it is", "Check its permissions, then run again"
        )
    return f"{error}. The file is left as it is"
