"""``dlc-snapshot-fix``: parse arguments, call the Python API, render its report."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from dlc_snapshot_fix import __version__, autoload
from dlc_snapshot_fix.discover import ProjectError, discover_project
from dlc_snapshot_fix.keys import group_by_module
from dlc_snapshot_fix.report import ExitCode, ProjectReport, show_tracebacks
from dlc_snapshot_fix.signals import stop_on_signals

PROGRESS_SAVE_SECONDS = 5.0
"""How often an archive run saves its JSON report while it goes on."""

# Modules that import torch are imported by the commands that use them, so that
# `--help`, `--version` and `plugin status` do not pay seconds for `import torch`.
if TYPE_CHECKING:
    from dlc_snapshot_fix.migrate import MigrationOptions


class DefaultToMigrate(click.Group):
    """``dlc-snapshot-fix PROJECT`` means ``dlc-snapshot-fix migrate PROJECT``; ``--debug`` goes anywhere."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _tolerant_streams()
        if "--debug" in args:
            args = [arg for arg in args if arg != "--debug"]
            show_tracebacks()
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["migrate", *args]
        return super().parse_args(ctx, args)


def _tolerant_streams() -> None:
    """Output that survives any console: what stdout's encoding cannot show is escaped (``\\u5b9e``), never an error.

    A Windows console redirected to a file (or a scheduler's log) writes in the ANSI code page
    (cp1252, cp936/GBK, cp437), a cluster node may run with ``LC_ALL=C``: a path it cannot encode
    must not turn a finished run into a traceback and exit 1. Files the tool writes (reports,
    manifests) are UTF-8 whatever the locale.
    """
    import codecs

    codecs.register_error(_ESCAPING, _escape_unencodable)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "") in ("strict", "surrogateescape"):
            reconfigure(errors=_ESCAPING)


_ESCAPING = "dlc-snapshot-fix-escape"


def _escape_unencodable(error: UnicodeError) -> tuple[str | bytes, int]:
    """``surrogateescape`` for the bytes of an undecodable file name (shown as they are), ``backslashreplace``
    for any other character the console's encoding lacks."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start : error.end]
    if all("\udc80" <= char <= "\udcff" for char in text):
        return bytes(ord(char) - 0xDC00 for char in text), error.end
    return "".join(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}" for char in text), error.end


def _fail(message: object, code: ExitCode) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _write_json(payload: Any, json_path: str | None) -> bool:
    """Write ``payload`` to ``json_path`` (``-``: stdout); True when stdout took it (print nothing else)."""
    if json_path == "-":
        click.echo(json.dumps(payload, indent=2))
        return True
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return False


def _emit(report: ProjectReport, json_path: str | None, quiet: bool, verbose: bool = False) -> None:
    if _write_json(report.to_dict(), json_path):
        return
    lines = report.render_lines(verbose=verbose)
    if quiet:
        lines = lines[-1:]
    for text, colour in lines:
        click.secho(text, fg=colour)


def _run(action, json_path: str | None, quiet: bool, check: bool = False, verbose: bool = False) -> None:
    from dlc_snapshot_fix.migrate import ProjectBusyError
    from dlc_snapshot_fix.store import ManifestError

    try:
        report = action()
    except (ProjectError, ProjectBusyError, ManifestError) as error:
        _fail(error, ExitCode.USAGE)
    except KeyboardInterrupt as stop:
        _fail(
            f"interrupted ({stop or 'Ctrl-C'}): every snapshot holds its original or its migrated version; "
            "run the same command again to finish",
            ExitCode.INTERRUPTED,
        )
    _emit(report, json_path, quiet, verbose)
    sys.exit(report.exit_code(check=check))


def _examples(*commands: str) -> str:
    """The end of a command's --help: commands a user can copy (click keeps the lines after \\b as they are)."""
    return "\b\nExamples:\n" + "\n".join(f"  {command}" for command in commands)


JSON_OPTION = click.option(
    "--json", "json_path", metavar="FILE", help="Also write the report as JSON to FILE ('-': only JSON, to stdout)."
)
QUIET_OPTION = click.option("--quiet", "-q", is_flag=True, help="Print only the summary line.")
VERBOSE_OPTION = click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Explain every snapshot in full (why each change, notes, how DeepLabCut's verdict was reached). "
    "By default: one line each, and the full reason where you have something to do.",
)


@click.group(
    cls=DefaultToMigrate,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_examples(
        "dlc-snapshot-fix ~/projects/mouse-lab-2024-05-01            # fix a project",
        "dlc-snapshot-fix restore ~/projects/mouse-lab-2024-05-01    # undo it",
    ),
)
@click.version_option(__version__, prog_name="dlc-snapshot-fix")
@click.option("--debug", is_flag=True, help="Also print the traceback of every failure (anywhere on the line).")
def main(debug: bool) -> None:
    """Make DeepLabCut 3 snapshots saved from DataParallel/DDP/torch.compile models loadable again.

    dlc-snapshot-fix PROJECT is short for dlc-snapshot-fix migrate PROJECT.

    \b
    Exit codes: 0 all good; 1 --check found snapshots to migrate;
    2 bad arguments or not a readable project; 3 a snapshot failed or
    does not load into its model; 130 stopped by Ctrl-C or SIGTERM (run again).
    """


@main.command(
    epilog=_examples(
        "dlc-snapshot-fix migrate ~/projects/mouse-lab-2024-05-01 --check",
        "dlc-snapshot-fix migrate /data/dlc-archive --jobs 4 --csv report.csv",
    )
)
@click.argument("project", type=click.Path(path_type=Path))
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if any snapshot needs migrating.")
@click.option("--dry-run", is_flag=True, help="Write nothing; show what would change.")
@click.option("--no-model-check", is_flag=True, help="Skip DeepLabCut's verdict (its loader and a strict load).")
@click.option(
    "--deep-check",
    is_flag=True,
    help="DeepLabCut's verdict from its own loader over every byte (slow: run it when tensor bytes themselves are "
    "suspect). By default it comes from the model's signature, reading no tensor byte.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Build DeepLabCut's model signatures for this run only, neither reading nor writing the user's cache.",
)
@click.option(
    "--trust",
    is_flag=True,
    help="Unpickle without the allow-list, for this run only. Can run code from the files: only for your own.",
)
@click.option(
    "--fix-metadata/--keep-numpy-metadata",
    default=None,
    help="numpy scalars in metadata (3.0.0rc5 and older) become the same plain numbers: by default where "
    "DeepLabCut would refuse them (numpy 1 names under numpy 2, say); --fix-metadata: always; "
    "--keep-numpy-metadata: never.",
)
@click.option(
    "--rename-legacy-best",
    is_flag=True,
    help="Also rename the legacy snapshot-best.pt to snapshot-best-<epoch>.pt. DeepLabCut's scorer name changes.",
)
@click.option(
    "--method",
    type=click.Choice(["rewrite", "append"]),
    help="rewrite: new file swapped in, original kept as a backup (default for a project). "
    "append: append a new data.pkl and directory, kilobytes; undo truncates (default for an archive).",
)
@click.option(
    "--backup-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also keep a full, verified copy of every original here (another disk, say) before changing it.",
)
@click.option("--hash", "hash_files", is_flag=True, help="append: also report whole-file sha256 (reads every byte).")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    help="Archive: projects migrated at once. A project's own snapshots go one at a time (BENCHMARKS.md says why).",
)
@click.option(
    "--shard",
    metavar="I/N",
    help="Archive: take only shard I of N (default: the array index of SLURM, SGE, PBS or LSF, if set).",
)
@click.option(
    "--shard-count",
    type=click.IntRange(min=1),
    metavar="N",
    help="Archive: the number of shards, where the scheduler gives only the index (PBS, LSF).",
)
@click.option("--csv", "csv_path", metavar="FILE", help="Archive: also write one CSV row per snapshot to FILE.")
@JSON_OPTION
@QUIET_OPTION
@VERBOSE_OPTION
def migrate(
    project: Path,
    check: bool,
    dry_run: bool,
    no_model_check: bool,
    deep_check: bool,
    no_cache: bool,
    trust: bool,
    fix_metadata: bool | None,
    rename_legacy_best: bool,
    method: str | None,
    backup_dir: Path | None,
    hash_files: bool,
    jobs: int,
    shard: str | None,
    shard_count: int | None,
    csv_path: str | None,
    json_path: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Back up, fix in place and verify every snapshot of PROJECT (a folder or its config.yaml).

    If PROJECT is not a project, every project below it is migrated (a lab archive).
    """
    stop_on_signals()  # first: a scheduler may stop the job while torch is still being imported
    from dlc_snapshot_fix.migrate import MigrationOptions, migrate_project

    write = not (check or dry_run)
    if trust:
        click.secho(
            "WARNING: --trust loads every snapshot with full unpickling: a malicious file can run code "
            "on this machine. Use it only for snapshots you or your lab made.",
            fg="red",
            bold=True,
            err=True,
        )
    if rename_legacy_best:
        click.secho(
            "note: a renamed best snapshot gets a new DeepLabCut scorer name (..._snapshot_best-<epoch>); "
            "analysis files made with the old name keep it.",
            fg="yellow",
            err=True,
        )
    looks_like_a_project = (project / "config.yaml").exists() or (project / "dlc-models-pytorch").exists()
    archive = project.is_dir() and not looks_like_a_project
    options = MigrationOptions(
        check_model=not no_model_check,
        trust=trust,
        fix_metadata=fix_metadata,
        rename_legacy_best=rename_legacy_best,
        method=method or ("append" if archive else "rewrite"),
        hash_files=hash_files,
        backup_dir=backup_dir,
        deep_check=deep_check,
        signature_cache=not no_cache,
    )
    if archive:
        _run_archive(project, jobs, (shard, shard_count), write, options, json_path, csv_path, quiet)
    if jobs > 1:
        click.secho(
            "note: --jobs runs projects of an archive at once; the snapshots of one project go one at a time",
            fg="yellow",
            err=True,
        )
    _run(
        lambda: migrate_project(project, write=write, options=options, announce=_announcer(quiet or json_path == "-")),
        json_path,
        quiet,
        check=check,
        verbose=verbose,
    )


def _run_archive(
    root: Path,
    jobs: int,
    shard_given: tuple[str | None, int | None],
    write: bool,
    options: MigrationOptions,
    json_path: str | None,
    csv_path: str | None,
    quiet: bool,
) -> None:
    """Archive mode: a progress bar on a terminal, one log line per project otherwise.

    With ``--json`` the report is also saved while the run goes on (at most every few
    seconds), so a task killed outright still leaves what it did, marked ``running``.
    """
    from dlc_snapshot_fix.archive import ArchiveReport, Shard, migrate_archive

    try:
        shard = Shard.parse(shard_given[0], count=shard_given[1])
    except ValueError as error:
        _fail(error, ExitCode.USAGE)
    progress = _ArchiveProgress(enabled=sys.stderr.isatty() and not quiet, quiet=quiet)
    last_saved = [time.monotonic()]

    only_json = json_path == "-"  # the report alone on stdout: a file is saved as the run goes on only if named
    quiet = quiet or only_json

    def save_so_far(report: ArchiveReport) -> None:
        if json_path and not only_json and time.monotonic() - last_saved[0] >= PROGRESS_SAVE_SECONDS:
            report.write_json(Path(json_path))
            last_saved[0] = time.monotonic()

    try:
        report = migrate_archive(
            root,
            jobs=jobs,
            shard=shard,
            write=write,
            options=options,
            on_plan=progress.start,
            on_project=progress.done,
            on_progress=save_so_far,
            announce=_announcer(quiet),
        )
    except KeyboardInterrupt:  # while looking for projects, before any was started
        progress.close()
        _fail(f"interrupted before any project was started: nothing changed under {root}", ExitCode.INTERRUPTED)
    progress.close()
    if not report.interrupted and not report.projects and not report.failed_projects and not report.skipped:
        _fail(
            f"no DeepLabCut project (a config.yaml beside dlc-models-pytorch) found in or below {root}", ExitCode.USAGE
        )
    if csv_path:
        report.write_csv(Path(csv_path))
    if only_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        sys.exit(report.exit_code())
    if json_path:
        report.write_json(Path(json_path))
    for skipped in report.skipped:
        if not quiet:
            click.secho(f"skipped {skipped.path}: {skipped.reason}", fg="red" if skipped.problem else "yellow")
    for line in [] if quiet else report.failure_lines():
        click.secho(line, fg="red")
    click.echo(report.summary())
    sys.exit(report.exit_code())


def _announcer(quiet: bool) -> Callable[[str], None] | None:
    """What the run says before a slow step (building DeepLabCut's models), on stderr; nothing when quiet."""
    return None if quiet else lambda message: click.echo(message, err=True)


class _ArchiveProgress:
    """tqdm over bytes of snapshots (files, rate, ETA) on a terminal; plain lines in logs."""

    def __init__(self, enabled: bool, quiet: bool):
        self.enabled, self.quiet = enabled, quiet
        self.bar: Any = None
        self.total_projects = self.finished = self.files = 0

    def start(self, projects: list[Path]) -> None:
        self.total_projects = len(projects)
        if self.enabled:
            from tqdm import tqdm

            total = sum(f.path.stat().st_size for p in projects for f in _quiet_discover(p))
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="snapshots", file=sys.stderr)

    def done(self, project: Path, outcome: Any) -> None:
        self.finished += 1
        if isinstance(outcome, ProjectReport):
            self.files += len(outcome.results)
            summary = outcome.render_lines()[-1][0] + "".join(f"; problem: {p}" for p in outcome.problems)
            size = sum(r.size or 0 for r in outcome.results)
        else:
            summary, size = outcome, 0
        if self.bar is not None:
            self.bar.update(size)
            self.bar.set_postfix(files=self.files, projects=f"{self.finished}/{self.total_projects}")
        elif not self.quiet:
            click.echo(f"[{self.finished}/{self.total_projects}] {project}: {summary}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _quiet_discover(project: Path) -> list:
    try:
        return discover_project(project).snapshots
    except (ProjectError, OSError):
        return []


@main.command(epilog=_examples("dlc-snapshot-fix submit /data/dlc-archive --tasks 16 --partition cpu --time 02:00:00"))
@click.argument("archive", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tasks", type=click.IntRange(min=1), required=True, help="Array tasks: shards of the archive.")
@click.option("--partition", help="sbatch --partition for the tasks and the merge job.")
@click.option("--time", "time_limit", metavar="TIME", help="sbatch --time per task (e.g. 02:00:00).")
@click.option("--mem", help="sbatch --mem per task (e.g. 4G).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=2, show_default=True, help="Also --jobs per task.")
@click.option("--account", help="sbatch --account.")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG", help="Passed to sbatch as is (repeatable).")
@click.option("--method", type=click.Choice(["rewrite", "append"]), default="append", show_default=True)
@click.option("--no-model-check", is_flag=True, help="Tasks skip the model check (no DeepLabCut needed on the nodes).")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Scripts, logs and reports go here (default: ./dlc-snapshot-fix-run-<time>). Reuse it to resubmit.",
)
@click.option("--dry-run", is_flag=True, help="Write and print the scripts; submit nothing.")
def submit(
    archive: Path,
    tasks: int,
    partition: str | None,
    time_limit: str | None,
    mem: str | None,
    cpus_per_task: int,
    account: str | None,
    sbatch_args: tuple[str, ...],
    method: str,
    no_model_check: bool,
    run_dir: Path | None,
    dry_run: bool,
) -> None:
    """Migrate ARCHIVE as a SLURM job array of --tasks shards, then merge their reports in a job of its own.

    The merge job runs after every task has ended (afterany) and exits 0 only when every
    shard reported and every snapshot is migrated. Submit again with the same --run-dir
    to resume after a cancel, a time limit or preemption.
    """
    from dlc_snapshot_fix.slurm import SubmitError, SubmitPlan, default_run_dir, write_scripts
    from dlc_snapshot_fix.slurm import submit as submit_plan

    plan = SubmitPlan(
        archive=archive.absolute(),
        tasks=tasks,
        run_dir=(run_dir or default_run_dir()).absolute(),
        method=method,
        model_check=not no_model_check,
        partition=partition,
        time=time_limit,
        mem=mem,
        cpus_per_task=cpus_per_task,
        account=account,
        sbatch_args=sbatch_args,
    )
    if dry_run:
        written = write_scripts(plan)
        for script in (written.array_script, written.merge_script):
            click.echo(f"# {script}\n{script.read_text(encoding='utf-8')}")
        click.echo(
            f"not submitted (--dry-run). To submit:\n  sbatch --parsable {written.array_script}\n"
            f"  sbatch --dependency=afterany:<array job id> {written.merge_script}"
        )
        return
    try:
        submitted = submit_plan(plan)
    except (SubmitError, OSError) as error:
        _fail(error, ExitCode.USAGE)
    click.echo(f"array job {submitted.array_job}: {tasks} tasks over {plan.archive} ({submitted.array_script})")
    click.echo(f"merge job {submitted.merge_job}: runs after every task has ended ({submitted.merge_script})")
    click.echo(f"logs: {plan.run_dir / 'logs'}")
    click.echo(f"merged report: {plan.merged_json} and {plan.merged_csv}")


@main.command(
    "merge-reports",
    epilog=_examples("dlc-snapshot-fix merge-reports RUN_DIR/reports --expect 16 --json merged.json --csv merged.csv"),
)
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "json_path", metavar="FILE", required=True, help="Write the merged report to FILE.")
@click.option("--csv", "csv_path", metavar="FILE", help="Also write it as CSV.")
@click.option(
    "--expect",
    type=click.IntRange(min=1),
    metavar="N",
    help="The array had N shards: name those that never reported.",
)
def merge_reports_command(reports: tuple[Path, ...], json_path: str, csv_path: str | None, expect: int | None) -> None:
    """Merge the JSON reports of the shards of an array job (files, or folders of them) into one.

    Exit 0 only when every shard reported, finished, and no snapshot failed; 3 otherwise.
    """
    from dlc_snapshot_fix.shards import merge_reports, write_rows_csv
    from dlc_snapshot_fix.store import write_text_atomically

    merged = merge_reports(reports, expected=expect)
    write_text_atomically(Path(json_path), json.dumps(merged, indent=2) + "\n")
    if csv_path:
        write_rows_csv(merged["snapshots"], Path(csv_path))
    for shard in merged["shards"]:
        what = {"running": "killed before it finished", "interrupted": "interrupted"}.get(shard["state"])
        if what is None and shard["failed"]:
            what = f"{shard['failed']} snapshot(s) failed"
        if what is not None:
            click.secho(f"shard {shard['shard']}: {what} ({shard['file']})", fg="red")
    for missing in merged["missing_shards"]:
        click.secho(f"shard {missing}: never reported (no report file)", fg="red")
    for ignored in merged["ignored_reports"]:
        click.secho(f"ignored {ignored['file']}: {ignored['reason']}", fg="red")
    failed = sum(shard["failed"] for shard in merged["shards"])
    shards = ", ".join(shard["shard"] for shard in merged["shards"]) or "none"
    click.echo(
        f"merged {len(merged['shards'])} reports (shards {shards}): {len(merged['snapshots'])} snapshots, "
        f"{failed} failed" + ("" if merged["complete"] else " — NOT COMPLETE, see above; run the missing shards again")
    )
    sys.exit(ExitCode.OK if merged["complete"] else ExitCode.PROBLEMS)


@main.command(epilog=_examples("dlc-snapshot-fix restore ~/projects/mouse-lab-2024-05-01"))
@click.argument("project", type=click.Path(path_type=Path))
@JSON_OPTION
@QUIET_OPTION
def restore(project: Path, json_path: str | None, quiet: bool) -> None:
    """Put back the original bytes of every snapshot this tool rewrote in PROJECT."""
    from dlc_snapshot_fix.migrate import restore_project

    _run(lambda: restore_project(project), json_path, quiet)


@main.command(
    epilog=_examples(
        "dlc-snapshot-fix inspect ~/projects/mouse-lab-2024-05-01",
        "dlc-snapshot-fix inspect old/train/snapshot-best-200.pt --against ~/projects/new-lab-2024-06-01",
    )
)
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--against",
    type=click.Path(exists=True, path_type=Path),
    help="Check against this pytorch_config.yaml, or this project's (default: the snapshot's own).",
)
@click.option("--shuffle", type=int, help="With --against PROJECT: which shuffle's pytorch_config.yaml.")
@JSON_OPTION
def inspect(path: Path, against: Path | None, shuffle: int | None, json_path: str | None) -> None:
    """Explain a snapshot, or every snapshot of a project: contents, prefix, heads, and why it does (not) load.

    Writes nothing. Exit 0 when every snapshot loads into its model, 3 otherwise.
    """
    from dlc_snapshot_fix.diagnose import diagnose

    try:
        diagnoses = diagnose(path, against=against, shuffle=shuffle)
    except ProjectError as error:
        _fail(error, ExitCode.USAGE)
    if not _write_json([d.to_dict() for d in diagnoses], json_path):
        for diagnosis in diagnoses:
            for line in diagnosis.render():
                click.echo(line)
    sys.exit(ExitCode.OK if all(d.fits for d in diagnoses) else ExitCode.PROBLEMS)


@main.command(
    epilog=_examples(
        "dlc-snapshot-fix adapt old/train/snapshot-best-200.pt --target ~/projects/new-lab-2024-06-01 -o init.pt"
    )
)
@click.argument("snapshot", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--target",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The pytorch_config.yaml (or project) of the model to adapt to.",
)
@click.option("--shuffle", type=int, help="With --target PROJECT: which shuffle.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Where to write the new snapshot.")
@click.option("--allow-non-head", is_flag=True, help="Also re-initialise non-head parts that do not fit.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never the source).")
def adapt(
    snapshot: Path, target: Path, shuffle: int | None, output: Path, allow_non_head: bool, overwrite: bool
) -> None:
    """Reuse SNAPSHOT for another model (e.g. after adding bodyparts): keep what fits, re-initialise the rest.

    Use the output as train_settings.weight_init.snapshot_path or as train_network(snapshot_path=...).
    """
    from dlc_snapshot_fix.adapt import AdaptRefusedError, adapt_snapshot
    from dlc_snapshot_fix.diagnose import resolve_pytorch_config
    from dlc_snapshot_fix.reading import SnapshotReadError

    try:
        target_config = resolve_pytorch_config(target, shuffle)
        plan = adapt_snapshot(snapshot, target_config, output, allow_non_head=allow_non_head, overwrite=overwrite)
    except (ProjectError, AdaptRefusedError, FileExistsError, SnapshotReadError, ValueError) as error:
        _fail(error, ExitCode.PROBLEMS)
    except Exception as error:  # an odd source file: say so, no traceback unless --debug
        logging.getLogger("dlc_snapshot_fix").debug("adapt failed", exc_info=True)
        _fail(
            f"{snapshot}: cannot be adapted ({type(error).__name__}: {error}); nothing was written", ExitCode.PROBLEMS
        )
    click.echo(f"wrote {output}: {len(plan.kept)} tensors kept from {snapshot.name}")
    for label, names_ in (("re-initialised", plan.reinitialised), ("dropped from the source", plan.dropped)):
        if names_:
            groups = ", ".join(f"{module}: {n}" for module, n in group_by_module(names_).items())
            click.echo(f"  {label}: {groups}")


@main.group(epilog=_examples("dlc-snapshot-fix plugin enable", "dlc-snapshot-fix plugin status"))
def plugin() -> None:
    """Turn the DeepLabCut plugin on or off for every Python process of this environment.

    \b
    In a script you can edit, prefer:
        from dlc_snapshot_fix import plugin; plugin.install()
    """


@plugin.command(epilog=_examples("dlc-snapshot-fix plugin enable"))
def enable() -> None:
    """Load prefixed snapshots in every DeepLabCut run of this environment (writes a .pth file)."""
    path = autoload.enable()
    click.echo(f"enabled: {path}\nundo with: dlc-snapshot-fix plugin disable")


@plugin.command(epilog=_examples("dlc-snapshot-fix plugin disable"))
def disable() -> None:
    """Remove the .pth file that `enable` wrote."""
    path = autoload.disable()
    click.echo(f"disabled: removed {path}" if path else f"already disabled: no {autoload.pth_path()}")


@plugin.command(epilog=_examples("dlc-snapshot-fix plugin status"))
def status() -> None:
    """Say whether the plugin is enabled for this environment."""
    state = "enabled" if autoload.is_enabled() else "disabled"
    click.echo(f"{state} ({autoload.pth_path()})")
