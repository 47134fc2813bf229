"""Create ``sample_project/``: a tiny, real DeepLabCut 3 project (run once by a maintainer).

The project is made with DeepLabCut's own functions so that every file in it is what
DeepLabCut writes: a 20-frame 64x64 video of two moving dots, two bodyparts, frames
labelled from the known dot positions, and a bottom-up ``resnet_50`` training dataset.
No snapshot is written here; ``scripts/demo.py`` makes them.

Usage: ``python scripts/make_sample_project.py [DESTINATION]`` (default ``sample_project``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import cv2
import numpy as np
import pandas as pd

FRAMES, SIZE = 20, 64
BODYPARTS = ("head", "tail")


def dot_positions(frame: int) -> dict[str, tuple[float, float]]:
    """Where each bodypart's dot is drawn in ``frame``: the ground truth for labels."""
    return {
        "head": (12.0 + 2.0 * frame, 20.0 + frame),
        "tail": (50.0 - frame, 44.0 - 0.5 * frame),
    }


def write_video(path: Path) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (SIZE, SIZE))
    for frame in range(FRAMES):
        image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        for colour, (x, y) in zip(((0, 0, 255), (0, 255, 0)), dot_positions(frame).values(), strict=True):
            cv2.circle(image, (round(x), round(y)), 4, colour, -1)
        writer.write(image)
    writer.release()


def set_bodyparts(config: Path) -> None:
    from deeplabcut.utils.auxiliaryfunctions import edit_config

    edit_config(str(config), {"bodyparts": list(BODYPARTS), "numframes2pick": 8})


def write_labels(config: Path, scorer: str) -> None:
    """Label every extracted frame with the exact dot positions, as a user would."""
    project = config.parent
    for folder in (project / "labeled-data").iterdir():
        images = sorted(folder.glob("img*.png"))
        index = pd.MultiIndex.from_tuples([("labeled-data", folder.name, image.name) for image in images])
        columns = pd.MultiIndex.from_product(
            [[scorer], list(BODYPARTS), ["x", "y"]], names=["scorer", "bodyparts", "coords"]
        )
        rows = []
        for image in images:
            frame = int(image.stem.removeprefix("img"))
            rows.append([c for bp in BODYPARTS for c in dot_positions(frame)[bp]])
        frame_labels = pd.DataFrame(rows, index=index, columns=columns)
        frame_labels.to_hdf(folder / f"CollectedData_{scorer}.h5", key="df_with_missing")
        frame_labels.to_csv(folder / f"CollectedData_{scorer}.csv")


def make_sample_project(destination: Path) -> Path:
    import deeplabcut

    if destination.exists():
        raise SystemExit(f"{destination} exists; remove it first")
    with tempfile.TemporaryDirectory() as scratch:
        video = Path(scratch) / "dots.mp4"
        write_video(video)
        created = deeplabcut.create_new_project(
            "dots", "lab", [str(video)], working_directory=scratch, copy_videos=True
        )
        config = Path(created)
        set_bodyparts(config)
        deeplabcut.extract_frames(str(config), mode="automatic", algo="uniform", userfeedback=False)
        write_labels(config, scorer="lab")
        deeplabcut.create_training_dataset(
            str(config),
            net_type="resnet_50",
            engine=deeplabcut.Engine.PYTORCH,
            userfeedback=False,
        )
        shutil.copytree(config.parent, destination)
    return destination


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "sample_project").resolve()
    print(make_sample_project(target))
