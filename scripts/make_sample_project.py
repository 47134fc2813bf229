"""Create ``sample_project/``: a tiny, real DeepLabCut 3 project (run once by a maintainer).

The project is made with DeepLabCut's own functions so that every file in it is what
DeepLabCut writes: a 20-frame 64x64 video of moving dots, two bodyparts, frames
labelled from the known dot positions, and a bottom-up ``resnet_50`` training dataset.
No snapshot is written here; ``scripts/demo.py`` makes them.

Usage: ``python scripts/make_sample_project.py [DESTINATION]`` (default ``sample_project``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

from dlc_snapshot_fix.testing import make_sample_project

if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "sample_project").resolve()
    print(make_sample_project(target))
