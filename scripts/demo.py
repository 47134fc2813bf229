"""The README's first command: break the sample project as a two-GPU rc5 run did, then fix it.

1. Writes snapshots of a DeepLabCut-built model the way DeepLabCut 3.0.0rc5 saved them
   after training on two GPUs (``torch.nn.DataParallel``; every key starts ``module.``).
2. Shows ``deeplabcut.evaluate_network`` failing on them.
3. Runs ``dlc-snapshot-fix PROJECT``.
4. Shows ``deeplabcut.evaluate_network`` succeeding.

Rerunning starts over: it first removes the snapshots, backups and evaluation results
an earlier demo run left in the project (and nothing else).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import deeplabcut

from dlc_snapshot_fix import names
from dlc_snapshot_fix.testing import break_like_two_gpu_rc5


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def reset(project: Path) -> None:
    train_dir = next(project.glob("dlc-models-pytorch/iteration-*/*/train"))
    for leftover in train_dir.glob("*.pt"):
        leftover.unlink()
    for folder in (project / names.TOOL_DIR_NAME, *project.glob("evaluation-results-pytorch")):
        shutil.rmtree(folder, ignore_errors=True)


def evaluate(config: Path) -> bool:
    try:
        deeplabcut.evaluate_network(str(config), Shuffles=[1])
    except RuntimeError as error:
        print("evaluate_network FAILED:", str(error)[:300].replace("\n", " "), "...")
        return False
    results = sorted(config.parent.glob("evaluation-results-pytorch/**/*-results.csv"))
    print("evaluate_network succeeded; results:", *results, sep="\n  ")
    return bool(results)


def main(project: Path) -> int:
    project = project.resolve()
    config = project / "config.yaml"
    reset(project)

    banner("1. Snapshots as DeepLabCut 3.0.0rc5 saved them after a two-GPU run")
    for path in break_like_two_gpu_rc5(project):
        print(f"  {path.relative_to(project)}")

    banner("2. deeplabcut.evaluate_network on them")
    if evaluate(config):
        print("unexpected: DeepLabCut loaded a prefixed snapshot")
        return 1

    banner(f"3. dlc-snapshot-fix {project}")
    fixer = subprocess.run([sys.executable, "-m", "dlc_snapshot_fix", str(project)], check=False)
    if fixer.returncode != 0:
        print(f"dlc-snapshot-fix exited {fixer.returncode}")
        return 1

    banner("4. deeplabcut.evaluate_network again")
    if not evaluate(config):
        return 1
    banner("Done. Undo with: dlc-snapshot-fix restore " + str(project))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "sample_project")))
