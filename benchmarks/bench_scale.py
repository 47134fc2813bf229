"""CPU per snapshot as one project grows: whether any per-project cost grows with the number of snapshots.

One project of ``N`` snapshots with DeepLabCut's ResNet-50 key set (sample_project's model, every
tensor one element: the pickle is real-sized, the storages tiny), saved through DataParallel;
each command runs as a whole process on a fresh copy, and its CPU time (user + system, from
``wait4``) is divided by ``N``. The ratio of that figure at the largest ``N`` to the smallest is
what must stay near 1.

    python benchmarks/bench_scale.py [--counts 100,1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_migrate import TRAIN, project_skeleton
from bench_processes import PYTHON, REPO, TOOL

COMMANDS = {
    "check": ["--check", "-q"],
    "append": ["-q", "--method", "append"],
    "rewrite": ["-q", "--method", "rewrite"],
}


def make_project(project: Path, count: int) -> None:
    """In a child process (this one never imports torch): ``count`` tiny ResNet-50-keyed DataParallel snapshots."""
    code = f"""
import shutil, torch
from collections import OrderedDict
from pathlib import Path
from dlc_snapshot_fix.testing import build_pose_model
train = Path({str(project / TRAIN)!r})
model = build_pose_model(train / "pytorch_config.yaml")
state = OrderedDict(("module." + k, v.reshape(-1)[:1].clone()) for k, v in model.state_dict().items())
first = train / "snapshot-001.pt"
torch.save({{"metadata": {{"epoch": 1}}, "model": state}}, first)
for i in range(2, {count} + 1):
    shutil.copyfile(first, train / f"snapshot-{{i:04d}}.pt")
"""
    project_skeleton(project)
    subprocess.run([PYTHON, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def cpu_seconds(command: list[str], env: dict[str, str], accepted: tuple[int, ...] = (0, 1)) -> float:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) not in accepted:
        raise RuntimeError(f"{command}: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--model-check",
        action="store_true",
        help="with DeepLabCut's verdict (signatures cached after the first run); the one-element tensors do not fit "
        "the model, so every verdict is a mismatch (exit 3): the replay's full work, reported per key",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.counts.split(",")]
    per_snapshot: dict[str, dict[int, float]] = {name: {} for name in COMMANDS}
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks", prefix=".bench-") as scratch:
        scratch_path = Path(scratch)
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(scratch_path / "cache")}
        extra = [] if args.model_check else ["--no-model-check"]
        accepted = (0, 1, 3) if args.model_check else (0, 1)
        for count in counts:
            template, work = scratch_path / f"template-{count}", scratch_path / "work"
            make_project(template, count)
            if args.model_check:  # the signature built once, before anything is measured (the cache warm)
                cpu_seconds([*TOOL, str(template), "--check", "-q"], env, accepted)
            for name, flags in COMMANDS.items():
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(work, ignore_errors=True)
                    shutil.copytree(template, work)
                    runs.append(cpu_seconds([*TOOL, str(work), *flags, *extra], env, accepted) / count)
                per_snapshot[name][count] = statistics.median(runs)
                print(f"  {name}, {count} snapshots: {1000 * per_snapshot[name][count]:.2f} ms CPU each", flush=True)
            shutil.rmtree(template)
    low, high = counts[0], counts[-1]
    print(f"\n| command | CPU per snapshot, {low} | {high} | ratio |\n| --- | --- | --- | --- |")
    for name, figures in per_snapshot.items():
        ratio = figures[high] / figures[low]
        print(f"| {name} | {1000 * figures[low]:.2f} ms | {1000 * figures[high]:.2f} ms | {ratio:.2f}x |")

if __name__ == "__main__":
    main()
