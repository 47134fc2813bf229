"""The drives lab archives live on, really mounted: ext4, btrfs, xfs, exFAT (FUSE) and sshfs (a share).

An archive of DataParallel ResNet-50 (GroupNorm and BatchNorm), HRNet-w32 and a top-down
RTMPose with its SSDLite detector, from the zoo (tests/zoo.py), is migrated on each with the
archive default (append where it can, rewrite where it cannot) and ``--jobs 2``, checked,
run again, restored, and rewritten once more with ``--method rewrite``. On exFAT and sshfs a
run is killed (``kill -9``) at several points; on sshfs the share is unmounted mid-run; an
exFAT drive too small for the backup refuses before writing. DeepLabCut's model check is
skipped here: its verdict does not depend on the drive, and the other suites judge it.

Mounting needs root, loop devices, /dev/fuse and Debian's exfat-fuse, exfatprogs, btrfs-progs,
xfsprogs, sshfs and openssh-server (``.ci/run`` installs them). Without them these tests are
skipped with a loud reason, except where ``DLC_REQUIRE_FILESYSTEMS=1`` (CI): there they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mounts as mounting
import pytest
import torch
import zoo
from conftest import TRAIN, TinyPose, make_project, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import names

pytestmark = pytest.mark.filesystems

ARCHIVE = {"gn": "resnet_50", "bn": "resnet_50_batchnorm", "hrnet": "hrnet_w32", "top-down": "rtmpose_s_ssdlite"}
"""Project name -> zoo member: what a lab's archive holds (the top-down one has its detector snapshot too)."""


@pytest.fixture(scope="module")
def mounts(tmp_path_factory: pytest.TempPathFactory):
    lacking = mounting.missing()
    if lacking:
        reason = (
            f"cannot mount real file systems here (missing {', '.join(lacking)}): the file-system tests do NOT run. "
            f"As root: {mounting.INSTALL}"
        )
        if os.environ.get("DLC_REQUIRE_FILESYSTEMS") == "1":
            pytest.fail(reason)
        print(f"\n*** {reason} ***", file=sys.stderr)
        pytest.skip(reason)
    mounted = mounting.Mounts(tmp_path_factory.mktemp("mounts"))
    yield mounted
    mounted.close()


_SHA256: dict[Path, str] = {}


def sha256(path: Path) -> str:
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def original_sha256(original: Path) -> str:
    if original not in _SHA256:
        _SHA256[original] = sha256(original)
    return _SHA256[original]


def lay_out_archive(root: Path, projects: dict[str, str] = ARCHIVE) -> dict[Path, Path]:
    """Projects copied from the zoo below ``root``; each snapshot with its original (in the zoo's cache)."""
    zoo_root = zoo.cached_zoo()
    originals = {}
    for name, member_name in projects.items():
        member = next(m for m in zoo.MEMBERS if m.name == member_name)
        source_project = zoo_root / zoo.PROJECTS[member.multi_animal]
        source = zoo.train_dir(zoo_root, member).parent  # the shuffle's folder
        project = root / "lab A" / name
        target = project / source.relative_to(source_project)
        shutil.copytree(source, target, copy_function=shutil.copyfile)  # exFAT has no permission bits to copy
        shutil.copyfile(source_project / "config.yaml", project / "config.yaml")
        for snapshot in sorted(target.glob("train/*.pt")):
            originals[snapshot] = source / snapshot.relative_to(target)
    return originals


def state_of(snapshot: Path, original: Path, mmap: bool = False) -> str:
    """``original`` (its bytes, or what loads as them: an append cut short leaves the original's end record
    where torch finds it) or ``migrated`` (the same tensors under unwrapped keys); anything else fails.

    Loaded without a memory map unless asked: a map a failed assertion keeps alive (in its traceback)
    would hold the drive busy and keep it from being unmounted.
    """
    if sha256(snapshot) == original_sha256(original):
        return "original"
    loaded = torch.load(snapshot, map_location="cpu", weights_only=False, mmap=mmap)["model"]
    wrapped = torch.load(original, map_location="cpu", weights_only=False)["model"]
    unwrapped = {key.removeprefix("module."): tensor for key, tensor in wrapped.items()}
    expected, state = (wrapped, "original") if list(loaded) == list(wrapped) else (unwrapped, "migrated")
    assert list(loaded) == list(expected), f"{snapshot}: neither the original's keys nor them unwrapped"
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor) and loaded[key].dtype == tensor.dtype, f"{snapshot}: {key}"
    del loaded
    return state


def cli(*args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if names.is_temp_name(path.name)]


def what_is_there(root: Path, *, but_locks: bool = False) -> dict[str, tuple[int, int] | bytes]:
    """Every file's size and mtime, and every manifest's bytes: a run that changes nothing leaves this alike.
    ``but_locks``: leave out the projects' lock files (a run that took the lock and refused leaves it)."""
    found: dict[str, tuple[int, int] | bytes] = {}
    for path in sorted(root.rglob("*")):
        if but_locks and path.parent.name == names.TOOL_DIR_NAME and path.name == names.lock_path(root).name:
            continue
        if path.is_file():
            stat = path.stat()
            found[str(path)] = path.read_bytes() if path.name == "manifest.json" else (stat.st_size, stat.st_mtime_ns)
    return found


def free_bytes(point: Path) -> int:
    os.sync()
    return shutil.disk_usage(point).free


def projects_of(originals: dict[Path, Path]) -> list[Path]:
    return sorted({next(p for p in snapshot.parents if (p / "config.yaml").is_file()) for snapshot in originals})


def restore_all(originals: dict[Path, Path]) -> None:
    for project in projects_of(originals):
        done = cli("restore", project)
        assert done.returncode == 0, done.stdout + done.stderr
    for snapshot, original in originals.items():
        assert sha256(snapshot) == original_sha256(original), f"{snapshot} is not its original after restore"


@pytest.mark.parametrize("kind", mounting.KINDS)
def test_an_archive_migrates_restores_and_a_second_run_changes_nothing(mounts: mounting.Mounts, kind: str):
    point = mounts.mount(kind)
    archive = point / "archive"
    originals = lay_out_archive(archive)
    try:
        checked = cli("migrate", archive, "--check", "--no-model-check", "--json", "-")
        assert checked.returncode == 1, checked.stderr
        planned = {row["path"]: row["method"] for row in json.loads(checked.stdout)["snapshots"]}
        assert set(planned.values()) == {"append", "rewrite"}  # ResNet-50 GN appends; the larger pickles cannot

        done = cli("migrate", archive, "--jobs", "2", "--no-model-check", "--json", "-")
        assert done.returncode == 0, done.stdout + done.stderr
        rows = json.loads(done.stdout)["snapshots"]
        assert {row["path"]: row["method"] for row in rows} == planned  # --check said what the run did
        assert all(row["status"] == "fixed" for row in rows), rows
        link = "copy" if kind == "exfat" else "hard link"  # exFAT has no hard links: full, verified copies
        assert {row["kept_by"] for row in rows} == {"append", link}
        for snapshot, original in originals.items():  # memory-mapped too: on btrfs and xfs the blocks are clones
            assert state_of(snapshot, original, mmap=True) == "migrated"
        assert temp_files(archive) == []

        clean = cli("migrate", archive, "--check", "--no-model-check")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        before = what_is_there(archive)
        again = cli("migrate", archive, "--jobs", "2", "--no-model-check")
        assert again.returncode == 0, again.stdout + again.stderr
        assert what_is_there(archive) == before  # not a byte, not a manifest, not an mtime

        restore_all(originals)
        gn = archive / "lab A" / "gn"  # the one the archive default appended to: now the full rewrite
        free_before = free_bytes(point)
        rewritten = cli("migrate", gn, "--method", "rewrite", "--no-model-check", "--json", "-")
        assert rewritten.returncode == 0, rewritten.stdout + rewritten.stderr
        report = json.loads(rewritten.stdout)
        row = report["snapshots"][0]
        assert row["kept_by"] == link
        said = [w for w in report["warnings"] if w.startswith("this drive cannot hard-link")]
        assert len(said) == (1 if link == "copy" else 0), report["warnings"]
        if kind in ("btrfs", "xfs"):  # reflinks: the 95 MB file's tensor blocks are the original's, cloned
            assert free_before - free_bytes(point) < 2**20 and row["new_bytes"] < 2**20, (free_before, row)
        else:
            assert row["new_bytes"] >= row["size"] * (2 if link == "copy" else 1) * 0.99
        assert all(state_of(s, o) == "migrated" for s, o in originals.items() if gn in s.parents)
        restore_all({s: o for s, o in originals.items() if gn in s.parents})
        assert temp_files(archive) == []
    finally:
        mounts.unmount(point)


def run_until(args: list[object], moment: Callable[[], bool], timeout: float = 300) -> int | None:
    """Start the CLI; at ``moment`` (polled), ``kill -9`` it. Its exit code if it ended first, else None."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dlc_snapshot_fix", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if moment():
            process.kill()  # SIGKILL; TerminateProcess on Windows
            process.wait()
            return None
        time.sleep(0.005)
    return process.wait(timeout=5)


def _a_temp_file_in(folders: list[Path]) -> Callable[[], bool]:
    """Whether a temp file of ours is anywhere below ``folders`` (a new snapshot, a backup's copy, a manifest)."""
    return lambda: any(
        names.is_temp_name(name) for folder in folders for _, _, files in os.walk(folder) for name in files
    )


def _a_manifest_saying(archive: Path, state: str) -> Callable[[], bool]:
    def seen() -> bool:
        for manifest in archive.glob("lab A/*/.dlc-snapshot-fix/manifest.json"):
            try:
                if f'"state": "{state}"' in manifest.read_text(encoding="utf-8"):
                    return True
            except (OSError, ValueError):
                continue
        return False

    return seen


@pytest.mark.parametrize("kind", ["exfat", "sshfs"])
def test_kill_9_at_each_cut_point_leaves_every_snapshot_whole(mounts: mounting.Mounts, kind: str):
    """``kill -9`` while a backup or a new file is written, while the journal says "pending", once the first
    project is done, and during an append: every snapshot whole, a rerun finishes, restore exact."""
    point = mounts.mount(kind)
    archive = point / "archive"
    projects = {"gn": "resnet_50", "hrnet": "hrnet_w32"}  # sorted: gn first
    rewrite = ["migrate", archive, "--no-model-check", "--method", "rewrite"]
    cut_points: dict[str, tuple[list[object], Callable[[list[Path]], Callable[[], bool]]]] = {
        "a backup or new file is being written": (rewrite, lambda folders: _a_temp_file_in(folders)),
        "the journal says pending": (rewrite, lambda folders: _a_manifest_saying(archive, "pending")),
        "the first project is done": (rewrite, lambda folders: _a_manifest_saying(archive, "done")),
        "an append's journal says writing": (rewrite[:-2], lambda folders: _a_manifest_saying(archive, "writing")),
    }
    try:
        cut = []
        for name, (args, moment) in cut_points.items():
            if archive.exists():
                shutil.rmtree(archive)
            originals = lay_out_archive(archive, projects)
            folders = [archive / "lab A" / project for project in projects]
            if run_until(args, moment(folders)) is None:
                cut.append(name)
            states = {s: state_of(s, o) for s, o in originals.items()}  # each whole: original or migrated
            finished = cli("migrate", archive, "--no-model-check")
            assert finished.returncode == 0, (name, states, finished.stdout + finished.stderr)
            assert all(state_of(s, o) == "migrated" for s, o in originals.items()), name
            assert temp_files(archive) == [], name
            restore_all(originals)
        assert len(cut) >= 3, f"the runs finished before most cut points were reached (cut at: {cut})"
    finally:
        mounts.unmount(point)


def test_the_share_unmounted_mid_run(mounts: mounting.Mounts):
    """``fusermount -uz`` while a snapshot is written: nothing lands on the local disk under the mount point."""
    point = mounts.mount("sshfs")
    archive = point / "archive"
    originals = lay_out_archive(archive, {"bn": "resnet_50_batchnorm", "gn": "resnet_50", "hrnet": "hrnet_w32"})
    train_folders = sorted({s.parent for s in originals})
    process = subprocess.Popen(
        [sys.executable, "-m", "dlc_snapshot_fix", "migrate", str(archive), "--no-model-check", "--method", "rewrite"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    writing = _a_temp_file_in(train_folders)
    while process.poll() is None and not writing():
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it wrote anything"
    mounts.unmount(point, lazy=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 3, output
    assert list(point.iterdir()) == [], "the run wrote onto the local disk under the mount point"
    assert "the drive or share holding" in output and "went away" in output, output
    assert "nothing was written there since" in output and "most failed because" in output, output

    mounts.remount(point)
    states = {s: state_of(s, o) for s, o in originals.items()}
    finished = cli("migrate", archive, "--no-model-check")
    assert finished.returncode == 0, (states, finished.stdout + finished.stderr)
    assert all(state_of(s, o) == "migrated" for s, o in originals.items())
    assert temp_files(archive) == []  # the one the lost write left is removed by this run
    restore_all(originals)
    mounts.unmount(point)


def test_a_full_exfat_drive_refuses_before_writing(mounts: mounting.Mounts):
    """No hard links on exFAT: the backup is a copy. Too little room for it and the new file: refused first."""
    point = mounts.mount("exfat", size_mb=200)  # one ResNet-50 (95 MB) fits; its copy and the new file do not
    archive = point / "archive"
    originals = lay_out_archive(archive, {"gn": "resnet_50"})
    try:
        before = what_is_there(archive, but_locks=True)
        done = cli("migrate", archive, "--method", "rewrite", "--no-model-check")
        assert done.returncode == 3, done.stdout + done.stderr
        failure = next(line for line in done.stdout.splitlines() if line.startswith("failed (1): "))
        assert "not enough space in" in failure and "MiB needed for a copy of the original and the new file" in failure
        assert "MiB free" in failure and "Free some space" in failure
        assert "most failed because could not write: not enough space" in done.stdout
        assert what_is_there(archive, but_locks=True) == before  # nothing written: no backup, temp file, manifest
        assert all(state_of(s, o) == "original" for s, o in originals.items())
    finally:
        mounts.unmount(point)


@pytest.mark.parametrize("kind", ["exfat", "sshfs"])
def test_the_project_lock_keeps_a_second_run_out_on_a_share(mounts: mounting.Mounts, kind: str, tmp_path: Path):
    """Another process holds the project's lock (as a run on another workstation would): this run stays out."""
    point = mounts.mount(kind, size_mb=64)
    try:
        project = make_project(point / "lab A" / "tiny")
        snapshot = save_snapshot(project / TRAIN / "snapshot-001.pt", wrapped_state_dict(TinyPose(), "dp"))
        before = sha256(snapshot)
        names.tool_dir(project).mkdir()
        ready = tmp_path / "holding"
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_THE_LOCK, str(names.lock_path(project)), str(ready)], stdin=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = cli(project, "--no-model-check")
            assert refused.returncode == 2 and "another dlc-snapshot-fix run holds" in refused.stderr, refused.stderr
            assert sha256(snapshot) == before
        finally:
            holder.communicate(b"\n", timeout=30)
        done = cli(project, "--no-model-check")
        assert done.returncode == 0, done.stdout + done.stderr
        assert list(torch.load(snapshot, weights_only=True)["model"]) == list(TinyPose().state_dict())
    finally:
        mounts.unmount(point)


HOLD_THE_LOCK = """
import sys, filelock
from pathlib import Path
with filelock.FileLock(sys.argv[1]):
    Path(sys.argv[2]).touch()
    sys.stdin.readline()
"""
