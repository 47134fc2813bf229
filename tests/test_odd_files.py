"""One odd file never stops a run: a real DeepLabCut project with odd files beside its snapshots.

The odd files are named like snapshots (DeepLabCut would try to load them) but hold
something torch.save of a DeepLabCut snapshot never holds. Each run is a whole process,
as a user runs it, and reports its own peak memory above its baseline after imports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import train_dir_of
from oddfiles import declared_string, nested_lists, rezip, snapshot_pickle

from dlc_snapshot_fix import load_snapshot

pytestmark = pytest.mark.deeplabcut

PEAK_BOUND_MIB = 256
MEASURE = """
import sys
import torch, dlc_snapshot_fix.cli  # the imports are the baseline, not the files
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
baseline = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) starts again from here
try:
    dlc_snapshot_fix.cli.main(sys.argv[1:])
except SystemExit as done:
    code = done.code
print(f"PEAK_MIB {(kib('VmHWM') - baseline) / 1024:.1f}", file=sys.stderr)
sys.exit(code)
"""


def run_measured(*args: object) -> tuple[subprocess.CompletedProcess, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, text=True, check=False, timeout=600
    )
    peak = float(done.stderr.rsplit("PEAK_MIB ", 1)[1].split()[0])
    return done, peak


def add_odd_files(train_dir: Path, scratch: Path) -> dict[str, str]:
    """Odd files named like snapshots, each with what it should be reported for."""
    scratch.mkdir()
    base = scratch / "base.pt"
    torch.save({"model": {"module.w": torch.ones(4)}, "metadata": {"epoch": 1}}, base)
    zeros = scratch / "zeros.pt"  # 256 MiB of zeros: DEFLATE makes it a file of ~250 KB
    torch.save({"model": {"module.w": torch.zeros(64 << 20)}, "metadata": {"epoch": 1}}, zeros)
    odd = {
        "snapshot-002.pt": "not a DeepLabCut snapshot dict",
        "snapshot-003.pt": "nested more than",
        "snapshot-004.pt": "is compressed",
        "snapshot-005.pt": "damaged or not a torch file",
        "snapshot-006.pt": "zip members, over",
    }
    torch.save([torch.ones(2), "not a dict"], train_dir / "snapshot-002.pt")
    rezip(base, train_dir / "snapshot-003.pt", pickle=snapshot_pickle(nested_lists(50_000)))
    rezip(zeros, train_dir / "snapshot-004.pt", deflate=("/data/0",))
    rezip(base, train_dir / "snapshot-005.pt", pickle=snapshot_pickle(declared_string(0xFFFFFFF0)))
    rezip(base, train_dir / "snapshot-006.pt", extra_members=50_000)
    zeros.unlink()
    return odd


@pytest.mark.parametrize("method", ["rewrite", "append"])
def test_odd_files_fail_alone_and_the_real_snapshots_are_fixed(multi_gpu_project: Path, tmp_path: Path, method: str):
    train_dir = train_dir_of(multi_gpu_project)
    real = sorted(p.name for p in train_dir.glob("*.pt"))
    odd = add_odd_files(train_dir, tmp_path / "scratch")
    assert (train_dir / "snapshot-004.pt").stat().st_size < 2 << 20  # a small file that would expand to 256 MiB
    before = {name: zlib.crc32((train_dir / name).read_bytes()) for name in odd}

    done, peak = run_measured(multi_gpu_project, "--method", method, "--no-model-check")

    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name, reason in odd.items():
        at = next(i for i, line in enumerate(lines) if line.strip().startswith("failed") and line.endswith(name))
        assert reason in lines[at + 1], (name, lines[at + 1])
        assert zlib.crc32((train_dir / name).read_bytes()) == before[name], f"{name} was written"
    for name in real:
        assert f"fixed          dlc-models-pytorch/iteration-0/{train_dir.parent.name}/train/{name}" in done.stdout
        assert not any(k.startswith("module.") for k in load_snapshot(train_dir / name)["model"])
    assert peak <= PEAK_BOUND_MIB, f"peak RSS {peak} MiB above the baseline"

    # the same files through DeepLabCut's own judgement: the real snapshots load, the odd ones stay failures
    judged = subprocess.run(
        [sys.executable, "-m", "dlc_snapshot_fix", multi_gpu_project, "--check", "--verbose"],
        capture_output=True,
        text=True,
    )
    assert judged.returncode == 3 and "Traceback" not in judged.stdout + judged.stderr
    assert judged.stdout.count("loads it: its snapshot loader reads the file") == len(real), judged.stdout
    inspected = subprocess.run(
        [sys.executable, "-m", "dlc_snapshot_fix", "inspect", multi_gpu_project], capture_output=True, text=True
    )
    assert inspected.returncode == 3 and "Traceback" not in inspected.stdout + inspected.stderr
    assert inspected.stdout.count("  error: ") == len(odd)


def test_the_plugin_leaves_odd_files_to_deeplabcut(multi_gpu_project: Path, tmp_path: Path):
    """Whatever an odd file is, the plugin returns what DeepLabCut's loader gave, untouched."""
    from deeplabcut.pose_estimation_pytorch.runners.base import attempt_snapshot_load

    from dlc_snapshot_fix import plugin

    train_dir = train_dir_of(multi_gpu_project)
    add_odd_files(train_dir, tmp_path / "scratch")
    for name in ("snapshot-002.pt", "snapshot-006.pt"):
        path = train_dir / name
        without = _outcome(lambda p=path: attempt_snapshot_load(p, "cpu"))
        with plugin.enabled():
            from deeplabcut.pose_estimation_pytorch.runners import base

            with_plugin = _outcome(lambda p=path: base.attempt_snapshot_load(p, "cpu"))
        assert type(with_plugin) is type(without), name
    nested = {"model": [1, [2, [3]]], "metadata": None}
    assert plugin.strip_loaded(nested, "x.pt") is nested
    shutil.rmtree(tmp_path / "scratch")


def _outcome(call):
    try:
        return call()
    except Exception as error:  # what DeepLabCut raises is the outcome being compared
        return error
