"""Windows and macOS hosts, seen from this Linux machine.

- A *Windows-shaped* process: the names Windows' ``os`` lacks removed (``pread``,
  ``copy_file_range``, ``posix_fadvise``, ``statvfs``), hard links refused as exFAT refuses
  them, and a file this process holds open or memory-mapped cannot be replaced, truncated or
  deleted (Windows' sharing rules; ``/proc/self/fd`` and ``/proc/self/maps`` are looked at on
  each such call). Migrate (both methods), ``--check``, restore and an archive run must give
  the results and the bytes the normal mode gives.
- Pool workers started by ``spawn`` (Windows, macOS) and ``forkserver`` (Linux from 3.14).
- Consoles in an ANSI code page and ``LC_ALL=C``, a project folder named ``实验-é proj``.
- A manifest written on Windows restores here.
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import windows_shape
from conftest import TRAIN, WITH_START_METHOD, TinyPose, make_project, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot, migrate_project, names, osfiles, restore_project
from dlc_snapshot_fix.verify import compare_snapshots

shaped_from_linux = pytest.mark.skipif(  # where Windows is real (scripts/wine.sh), the real thing is tested instead
    sys.platform != "linux", reason="shapes Linux as Windows or another locale (/proc, glibc's locales)"
)
START_METHODS = [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()]


@pytest.fixture
def windows_shaped(monkeypatch: pytest.MonkeyPatch) -> list[windows_shape.Refusal]:
    """This process, shaped as Windows would be (tests/windows_shape.py); returns the refusals seen."""
    refused: list[windows_shape.Refusal] = []
    windows_shape.shape(monkeypatch.setattr, monkeypatch.delattr, refused)
    return refused


def population(root: Path) -> Path:
    """A project of what labs have: DataParallel with rc5's numpy metrics, compiled + DDP, optimizer state,
    torch's legacy (non-zip) format, and a clean one."""
    project = make_project(root)
    train = project / TRAIN
    torch.manual_seed(0)
    state = wrapped_state_dict(TinyPose(), "dp")
    metadata = {"epoch": 5, "metrics": {"test.rmse": np.float64(2.5)}}
    torch.save({"metadata": metadata, "model": state}, train / "snapshot-005.pt")
    save_snapshot(train / "snapshot-006.pt", wrapped_state_dict(TinyPose(), "compile", "dp"), optimizer={"state": {}})
    legacy = train / "snapshot-007.pt"  # torch's format before 1.6
    torch.save({"metadata": {"epoch": 7}, "model": state}, legacy, _use_new_zipfile_serialization=False)
    save_snapshot(train / "snapshot-008.pt", TinyPose().state_dict())
    return project


def outcome(report) -> list[tuple]:
    return [(r.path.name, r.status.value, tuple(r.changes), r.method, r.ok) for r in report.results]


def snapshot_bytes(project: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((project / TRAIN).glob("*.pt"))}


NORMAL_RUN = """
import json, sys
from pathlib import Path
from dlc_snapshot_fix import migrate_project
report = migrate_project(Path(sys.argv[1]), method=sys.argv[2], write=sys.argv[3] == "write")
print(json.dumps([(r.path.name, r.status.value, r.changes, r.method, r.ok) for r in report.results]))
"""


def normal_outcome(project: Path, method: str, write: bool) -> list[tuple]:
    """The same run in a separate process, as this machine is (the Windows shape is patched into this one)."""
    command = [sys.executable, "-c", NORMAL_RUN, project, method, "write" if write else "check"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return [(a, b, tuple(c), d, e) for a, b, c, d, e in json.loads(done.stdout.splitlines()[-1])]


@shaped_from_linux
@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_a_windows_shaped_process_gets_the_same_results_and_bytes(tmp_path: Path, windows_shaped, method: str):
    normal, shaped = population(tmp_path / "normal"), tmp_path / "windows shaped"
    shutil.copytree(normal, shaped)
    originals = snapshot_bytes(normal)
    expected_check, expected = normal_outcome(normal, method, False), normal_outcome(normal, method, True)
    assert [status for _, status, *_ in expected] == ["fixed", "fixed", "fixed", "already clean"]

    assert outcome(migrate_project(shaped, write=False, method=method)) == expected_check
    report = migrate_project(shaped, method=method)
    assert outcome(report) == expected, [r.describe() for r in report.results]
    assert report.exit_code() == 0
    for name, content in snapshot_bytes(shaped).items():  # the same new files: byte for byte, where torch's
        if zipfile.is_zipfile(io.BytesIO(content)):  # legacy format allows it (it writes object ids as keys)
            assert content == (normal / TRAIN / name).read_bytes(), name
        else:
            assert compare_snapshots(load_snapshot(normal / TRAIN / name), load_snapshot(shaped / TRAIN / name)) == []
    entries = json.loads(names.manifest_path(shaped).read_text(encoding="utf-8"))["entries"]
    assert {e["backup_method"] for e in entries} <= {"copy", "append"}  # no hard link: a verified copy, said so
    assert {r.status.value for r in migrate_project(shaped, method=method).results} == {"already clean"}
    assert {r.status.value for r in restore_project(shaped).results} == {"restored"}
    assert snapshot_bytes(shaped) == originals
    assert windows_shaped == [], f"Windows would have refused: {windows_shaped}"


SHAPED_SITE = """
import os, sys
if os.environ.get("DLC_SNAPSHOT_FIX_WINDOWS_SHAPE"):  # every process of the run: main, and spawned workers
    sys.path.insert(0, {tests!r})
    import windows_shape
    windows_shape.shape(setattr, delattr, windows_shape.RefusalFile(os.environ["DLC_SNAPSHOT_FIX_WINDOWS_SHAPE"]))
"""


@shaped_from_linux
def test_a_windows_shaped_archive_run_with_two_spawned_jobs_matches_the_normal_one(tmp_path: Path):
    """Main process and pool workers shaped as Windows (workers started by spawn, as there): same rows, same
    bytes, nothing held replaced, truncated or deleted in any process."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SHAPED_SITE.format(tests=str(Path(__file__).parent)))
    normal, shaped = tmp_path / "normal", tmp_path / "shaped"
    for name in ("a", "b", "c"):
        population(normal / name)
    shutil.copytree(normal, shaped)
    refusals = tmp_path / "refusals.txt"
    runs = {}
    for root, environment in (
        (normal, dict(os.environ)),
        (shaped, {**os.environ, "PYTHONPATH": str(site), "DLC_SNAPSHOT_FIX_WINDOWS_SHAPE": str(refusals)}),
    ):
        command = [sys.executable, "-c", WITH_START_METHOD, "spawn", root, "--jobs", "2", "--no-model-check"]
        command += ["--json", root / "r.json"]
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = json.loads((root / "r.json").read_text(encoding="utf-8"))["snapshots"]
        runs[root] = sorted((Path(r["path"]).relative_to(root).as_posix(), r["status"], r["method"]) for r in rows)
    assert runs[shaped] == runs[normal]
    assert [status for _, status, _ in runs[normal]].count("fixed") == 9
    assert not refusals.exists(), refusals.read_text()

    def backup_methods(root: Path) -> set[str]:
        manifests = [names.manifest_path(project) for project in root.iterdir() if project.is_dir()]
        return {e["backup_method"] for m in manifests for e in json.loads(m.read_text(encoding="utf-8"))["entries"]}

    assert "hardlink" in backup_methods(normal) and "hardlink" not in backup_methods(shaped)  # workers were shaped
    for path in normal.rglob("snapshot-00[56].pt"):  # zip files: byte for byte
        assert path.read_bytes() == (shaped / path.relative_to(normal)).read_bytes(), path


@shaped_from_linux
def test_the_windows_shape_sees_what_this_process_holds(tmp_path: Path, windows_shaped):
    """The sharing rules above are real: an open file and a torch memory map are both seen and refused."""
    path = save_snapshot(tmp_path / "snapshot-001.pt", TinyPose().state_dict())
    with open(path, "rb"), pytest.raises(PermissionError, match="open as fd"):
        os.replace(tmp_path / "snapshot-001.pt", path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    with pytest.raises(PermissionError, match="memory-mapped"):
        path.unlink()
    del mapped
    path.unlink()
    assert [name for name, _, _ in windows_shaped] == ["replace", "unlink"]


@shaped_from_linux
def test_a_windows_shaped_trusted_run_releases_the_original_before_replacing_it(tmp_path: Path, windows_shaped):
    """``--trust`` reads with torch, memory-mapped: the map must be gone before the original is replaced."""
    project = population(tmp_path / "trusted")
    originals = snapshot_bytes(project)
    report = migrate_project(project, trust=True)
    assert report.exit_code() == 0, [r.describe() for r in report.results]
    assert windows_shaped == [], f"Windows would have refused: {windows_shaped}"
    restore_project(project)
    assert snapshot_bytes(project) == originals


BOOM = """
import os
if os.environ.get("DLC_SNAPSHOT_FIX_TEST_BOOM"):  # every process of the run, spawned workers too, fails one file
    from dlc_snapshot_fix import migrate

    _plan = migrate._plan

    def _boom(snapshot_file, *args, **kwargs):
        if snapshot_file.path.name == "snapshot-005.pt":
            raise RuntimeError("an unexpected error, for the test")
        return _plan(snapshot_file, *args, **kwargs)

    migrate._plan = _boom
"""


@pytest.mark.parametrize("start", START_METHODS)
def test_debug_shows_a_workers_traceback_under_spawn_and_forkserver(tmp_path: Path, start: str):
    """A spawned worker inherits no logging set-up: ``--debug`` must still bring its tracebacks back."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BOOM)
    root = tmp_path / "archive"
    for name in ("a", "b", "c"):
        population(root / name)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "DLC_SNAPSHOT_FIX_TEST_BOOM": "1"}
    command = [sys.executable, "-c", WITH_START_METHOD, start, root, "--jobs", "2", "--no-model-check"]
    quiet = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert quiet.returncode == 3, quiet.stdout + quiet.stderr
    assert "3 failed" in quiet.stdout and "Traceback" not in quiet.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=environment)
    assert debug.returncode == 3
    assert debug.stderr.count("RuntimeError: an unexpected error, for the test") == 3, debug.stderr[-3000:]
    assert "Traceback (most recent call last)" in debug.stderr


CONSOLES = {
    "utf-8": {"PYTHONIOENCODING": "utf-8"},
    "cp1252": {"PYTHONIOENCODING": "cp1252"},  # Windows, Western Europe, output redirected
    "gbk": {"PYTHONIOENCODING": "gbk"},  # Windows, Chinese (cp936)
    "cp437": {"PYTHONIOENCODING": "cp437"},  # a Windows console's OEM code page
    "LC_ALL=C": {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},  # cron, containers
}


def _console_run(project: Path, console: str, *args: object) -> tuple[int, str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING", "PYTHONUTF8"))}
    environment.update(CONSOLES[console])
    command = [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)]
    done = subprocess.run(command, capture_output=True, env=environment, cwd=project.parent)
    return done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")


def _rows(path: Path) -> list[tuple]:
    rows = json.loads(path.read_text(encoding="utf-8"))["snapshots"]
    return [(Path(r["path"]).name, r["status"], tuple(r["changes"]), r["method"]) for r in rows]


@pytest.mark.parametrize(  # on Windows, the code page of Western Europe's redirected output (each run costs seconds)
    "console", ["cp1252"] if sys.platform == "win32" else sorted(CONSOLES)
)
def test_every_command_works_in_any_console_on_a_non_ascii_project(tmp_path: Path, console: str):
    """Same results and exit codes as under UTF-8, no traceback, for ``实验-é proj``, whatever stdout can encode."""
    project = population(tmp_path / "实验-é proj")
    name = project.name  # relative: under LC_ALL=C the process sees the folder's bytes, not its characters
    runs = {
        "check": _console_run(project, console, name, "--check", "--no-model-check", "--json", "check.json"),
        "migrate": _console_run(project, console, name, "--no-model-check", "--json", "migrate.json"),
        "inspect": _console_run(project, console, "inspect", name),
        "archive": _console_run(project, console, ".", "--jobs", "2", "--shard", "1/1", "--no-model-check"),
        "restore": _console_run(project, console, "restore", name),
        "plugin status": _console_run(project, console, "plugin", "status"),
        "help": _console_run(project, console, "--help"),
    }
    for command, (code, out, err) in runs.items():
        assert "Traceback" not in err and "UnicodeEncodeError" not in err, (command, err[-2000:])
        assert code == (1 if command == "check" else 0), (command, code, out[-2000:], err[-2000:])
        assert out.strip() or command in ("check", "migrate"), command
    expected_check = [("snapshot-005.pt", "needs fix"), ("snapshot-006.pt", "needs fix")]
    expected_check += [("snapshot-007.pt", "needs fix"), ("snapshot-008.pt", "already clean")]
    assert [row[:2] for row in _rows(tmp_path / "check.json")] == expected_check
    assert [row[1] for row in _rows(tmp_path / "migrate.json")] == ["fixed", "fixed", "fixed", "already clean"]
    assert "restored" in runs["restore"][1]
    shown = runs["inspect"][1]  # the path shown intact where the console's encoding can, escaped where it cannot
    if console == "utf-8":
        assert "实验-é proj" in shown
    elif console == "gbk":
        assert "\\u5b9e" not in shown  # GBK has these characters: written as they are
    elif console in ("cp1252", "cp437"):
        assert "\\u5b9e\\u9a8c-" in shown, shown[:300]


@pytest.fixture(scope="module")
def cp1252_locale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a Windows machine's ANSI code page, built here (glibc's localedef, no system change)."""
    if shutil.which("localedef") is None:
        pytest.skip("localedef is not installed")
    where = tmp_path_factory.mktemp("locales")
    made = subprocess.run(["localedef", "-i", "en_US", "-f", "CP1252", where / "en_US.CP1252"], capture_output=True)
    if not (where / "en_US.CP1252").is_dir():
        pytest.skip(f"localedef could not build en_US.CP1252: {made.stderr.decode(errors='replace')[-300:]}")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIO"))}
    return {**environment, "LOCPATH": str(where), "LC_ALL": "en_US.CP1252", "LANG": "en_US.CP1252", "PYTHONUTF8": "0"}


DEEPLABCUT_READS = """
import json, sys
from deeplabcut.core.config import read_config_as_dict
from deeplabcut.utils.auxiliaryfunctions import read_config
project, pytorch_config = read_config(sys.argv[1]), read_config_as_dict(sys.argv[2])
print(json.dumps([project["scorer"], pytorch_config["runner"]["snapshot_prefix"]]))
"""


@shaped_from_linux
def test_config_files_deeplabcut_wrote_in_the_ansi_code_page_are_read_as_deeplabcut_reads_them(
    tmp_path: Path, cp1252_locale: dict[str, str]
):
    """DeepLabCut writes config.yaml with a bare open(): cp1252 on a Western European Windows, CRLF, ``José``."""
    project = make_project(tmp_path / "cp1252 project")
    config = project / "config.yaml"
    config.write_bytes(
        "Task: dots\r\nscorer: José\r\nproject_path: C:\\Users\\José\\dots-José-2026-11-29\r\n"
        "engine: pytorch\r\niteration: 0\r\n".encode("cp1252")
    )
    pytorch_config = project / TRAIN / "pytorch_config.yaml"
    pytorch_config.write_bytes(
        "method: bu\r\nnet_type: resnet_50\r\nrunner:\r\n  snapshot_prefix: rtm\r\n"
        "  notes: entraîné par José\r\n".encode("cp1252")
    )
    with pytest.raises(UnicodeDecodeError):
        config.read_text(encoding="utf-8")
    for name in ("rtm-005.pt", "rtm-best-007.pt", "snapshot-003.pt"):  # the custom prefix, and DeepLabCut's own
        save_snapshot(project / TRAIN / name, wrapped_state_dict(TinyPose(), "dp"))
    command = [sys.executable, "-m", "dlc_snapshot_fix", project, "--json", tmp_path / "run.json"]
    done = subprocess.run(command, capture_output=True, encoding="cp1252", env=cp1252_locale)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {Path(r["path"]).name: r["status"] for r in json.loads((tmp_path / "run.json").read_text())["snapshots"]}
    assert rows == {"rtm-005.pt": "fixed", "rtm-best-007.pt": "fixed", "snapshot-003.pt": "fixed"}, rows
    assert "cannot be read" not in done.stdout

    if importlib.util.find_spec("deeplabcut") is not None:  # DeepLabCut, in the same locale, reads the same
        asked = [sys.executable, "-c", DEEPLABCUT_READS, config, pytorch_config]
        deeplabcut = subprocess.run(asked, capture_output=True, encoding="cp1252", env=cp1252_locale)
        assert deeplabcut.returncode == 0, deeplabcut.stderr[-2000:]
        scorer, prefix = json.loads(deeplabcut.stdout.splitlines()[-1])
        assert (scorer, prefix) == ("José", "rtm")


def test_a_project_migrated_on_windows_restores_here(tmp_path: Path):
    """A manifest whose paths Windows wrote (``\\``, as this tool wrote them there before) restores byte-exact;
    manifests are written with ``/`` now, whatever the system."""
    project = population(tmp_path / "from windows")
    originals = snapshot_bytes(project)
    assert migrate_project(project, method="rewrite").exit_code() == 0
    manifest = names.manifest_path(project)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    assert all("\\" not in e["path"] and "/" in e["path"] for e in data["entries"])
    for entry in data["entries"]:
        for field in ("path", "backup"):
            entry[field] = entry[field].replace("/", "\\")
    manifest.write_text(json.dumps(data, indent=2), encoding="utf-8")
    restored = restore_project(project)
    assert {r.status.value for r in restored.results} == {"restored"}, [r.describe() for r in restored.results]
    assert snapshot_bytes(project) == originals


@shaped_from_linux
def test_a_backup_path_windows_could_not_create_fails_that_snapshot_first(tmp_path: Path, windows_shaped):
    """Backups add ~48 characters: a snapshot path Windows accepts can give a backup path it refuses (260 without
    long paths). That snapshot fails before anything is written, naming the fix; the others go on."""
    relative = len("/" + TRAIN + "/snapshot-005.pt")
    project = population(tmp_path / ("lab archive " + "x" * (250 - relative - len(str(tmp_path)) - 13)))
    originals = snapshot_bytes(project)
    assert all(len(str(p)) < osfiles.WINDOWS_MAX_PATH for p in (project / TRAIN).glob("*.pt"))
    report = migrate_project(project, method="rewrite")
    failed = [r for r in report.results if r.status.value == "failed"]
    assert failed and report.exit_code() == 3
    for result in failed:
        assert "over Windows' 260 without long paths" in result.reason and "Enable long paths" in result.reason
        assert "the snapshot is unchanged" in result.reason
    assert snapshot_bytes(project) == originals
    assert not list(names.tool_dir(project).glob("backups/**/*.orig")), "a backup was written"
