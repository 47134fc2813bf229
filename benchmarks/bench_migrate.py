"""Benchmark: dlc-snapshot-fix's two methods against the common script and plain ``cp``, in one run.

Builds a synthetic archive of DeepLabCut-sized snapshots (the ResNet-50 pose model's key
set and shapes from ``sample_project``, saved as a two-GPU 3.0.0rc5 run did, ~95 MB each),
then, each on a fresh copy with the page cache dropped (or, where that is not allowed,
warmed) the same way, times to durable completion (``os.sync`` included):

- ``append``:  this tool's fast path (kilobytes appended, undo = truncate)
- ``rewrite``: this tool's conventional path (hard-link backup, temp file, fsync, replace, read-back)
- ``common``:  the usual script: ``shutil.copy`` backup, full ``torch.load``, ``k.replace``, ``torch.save``
- ``cp``:      ``cp`` of the same bytes
- ``check``:   this tool's check-only pass, against ``load``: a full ``torch.load`` of every snapshot

Each runs in its own process, which reports bytes written (``wchar``) and peak RSS minus
its RSS right after ``import torch``. Ratios are against baselines measured in the same run.

    python benchmarks/bench_migrate.py --count 8 [--big-gb 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = "dlc-models-pytorch/iteration-0/benchNov22-trainset95shuffle1/train"

WORKER = r"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import torch
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
def wchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("wchar")).split()[1])
mode, root = sys.argv[1], Path(sys.argv[2])
projects = sorted(p.parent for p in root.glob("*/config.yaml"))
snapshots = sorted(root.glob("*/dlc-models-pytorch/*/*/train/*.pt"))
import dlc_snapshot_fix
from dlc_snapshot_fix import migrate_project
base_rss, base_w = status("VmRSS:"), wchar()
start = time.perf_counter()
if mode in ("append", "rewrite"):
    for project in projects:
        report = migrate_project(project, method=mode, check_model=False)
        assert all(r.status.value == "fixed" for r in report.results), [r.describe() for r in report.results]
elif mode == "check":
    for project in projects:
        report = migrate_project(project, write=False, method="append", check_model=False)
        assert all(r.status.value == "needs fix" for r in report.results)
elif mode == "load":
    for path in snapshots:
        torch.load(path, map_location="cpu", weights_only=True)
elif mode == "common":
    for path in snapshots:
        shutil.copy(path, str(path) + ".bak")
        snapshot = torch.load(path, map_location="cpu", weights_only=True)
        snapshot["model"] = {k.replace("module.", ""): v for k, v in snapshot["model"].items()}
        torch.save(snapshot, path)
elif mode == "cp":
    for path in snapshots:
        subprocess.run(["cp", str(path), str(path) + ".copy"], check=True)
os.sync()
seconds = time.perf_counter() - start
peak = status("VmHWM:")  # this process image's own peak (ru_maxrss would include the parent's, across exec)
written = wchar() - base_w
if mode == "cp":
    written = sum(p.stat().st_size for p in snapshots)
print(json.dumps({"seconds": seconds, "written": written, "peak_minus_torch": peak - base_rss,
                  "torch_rss": base_rss, "files": len(snapshots)}))
"""


def project_skeleton(project: Path) -> Path:
    """A project's config files, once: sample_project's, as DeepLabCut wrote them (reading them is a cost too)."""
    if not (project / "config.yaml").exists():
        (project / TRAIN).mkdir(parents=True)
        sample = REPO / "sample_project"
        shutil.copyfile(sample / "config.yaml", project / "config.yaml")
        shutil.copyfile(
            next(sample.glob("dlc-models-pytorch/*/*/train/pytorch_config.yaml")),
            project / TRAIN / "pytorch_config.yaml",
        )
    return project


def pose_config(net_type: str, folder: Path) -> Path:
    """sample_project's ``pytorch_config.yaml``, or DeepLabCut's own for another ``net_type`` (for its project)."""
    if net_type == "resnet_50":
        return next((REPO / "sample_project").glob("dlc-models-pytorch/*/*/train/pytorch_config.yaml"))
    from deeplabcut.pose_estimation_pytorch.config.make_pose_config import make_pytorch_pose_config
    from deeplabcut.utils.auxiliaryfunctions import read_config

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pytorch_config.yaml"
    project = read_config(str(REPO / "sample_project" / "config.yaml"))
    make_pytorch_pose_config(project, config, net_type=net_type, save=True)
    return config


def make_template(root: Path, count: int, big_gb: float, per_project: int = 4, net_type: str = "resnet_50") -> int:
    """``count`` snapshots of ``net_type`` (DeepLabCut's pose model, saved through DataParallel), ``per_project``
    to a project (and one of ``big_gb`` GB); the snapshot size."""
    import torch

    from dlc_snapshot_fix.testing import build_pose_model

    config = pose_config(net_type, root / ".config")
    state = torch.nn.DataParallel(build_pose_model(config)).state_dict()
    first = None
    for i in range(count):
        project = project_skeleton(root / f"project-{i // per_project:03d}")
        target = project / TRAIN / f"snapshot-{10 * (i % per_project + 1):03d}.pt"
        if first is None:
            torch.save({"metadata": {"epoch": 50, "metrics": {"test.rmse": 3.2}}, "model": state}, target)
            first = target
        else:
            shutil.copyfile(first, target)
    if big_gb:
        project = project_skeleton(root / "project-big")
        big = dict(state)
        floats = int(big_gb * 2**30 / 4 / 16)
        for j in range(16):
            big[f"module.heads.extra.{j}.weight"] = torch.zeros(floats)
        torch.save({"metadata": {"epoch": 1}, "model": big}, project / TRAIN / "snapshot-001.pt")
    return first.stat().st_size if first else 0


def settle_cache() -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError:
        return "not dropped (no permission): warm for every mode"


def run_mode(mode: str, template: Path, scratch: Path) -> dict:
    work = scratch / mode
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    cache = settle_cache()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(work)], capture_output=True, text=True, env=env, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["cache"] = cache
    shutil.rmtree(work)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="snapshots of ~95 MB")
    parser.add_argument("--big-gb", type=float, default=0.0, help="also a snapshot of this many GB (memory check)")
    parser.add_argument("--per-project", type=int, default=4, help="snapshots per project (DeepLabCut keeps 5)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch_name:
        scratch = Path(scratch_name)
        template = scratch / "template"
        size = make_template(template, args.count, 0, args.per_project)
        results = {
            mode: run_mode(mode, template, scratch) for mode in ("cp", "common", "rewrite", "append", "load", "check")
        }
        if args.big_gb:
            big_template = scratch / "big"
            make_template(big_template, 0, args.big_gb)
            for mode in ("rewrite", "append"):
                results[f"{mode} {args.big_gb:g} GB"] = run_mode(mode, big_template, scratch)
    files = args.count
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"{files} snapshots of {size / 1e6:.1f} MB ({args.per_project} per project), "
        f"page cache: {results['cp']['cache']}"
    )
    print(f"{'mode':<16}{'seconds':>9}{'per file (s)':>14}{'written/file':>16}{'peak RSS - torch':>18}")
    for mode, r in results.items():
        n = r["files"] or 1
        print(
            f"{mode:<16}{r['seconds']:>9.3f}{r['seconds'] / n:>14.4f}{r['written'] / n / 1e3:>13.1f} KB"
            f"{r['peak_minus_torch'] / 2**20:>15.1f} MiB"
        )
    t = {mode: r["seconds"] for mode, r in results.items()}
    print("ratios (higher is better for this tool):")
    print(f"  cp / append        = {t['cp'] / t['append']:8.1f}   (target >= 10)")
    print(f"  common / append    = {t['common'] / t['append']:8.1f}   (target >= 100)")
    print(f"  common / rewrite   = {t['common'] / t['rewrite']:8.1f}   (target >= 2)")
    print(f"  load / check       = {t['load'] / t['check']:8.1f}   (target >= 50)")
    print(f"  torch import RSS   = {results['append']['torch_rss'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
