"""Make the broken snapshots this tool exists to fix, with the real DeepLabCut.

Used by the demo and the tests, and useful to anyone reproducing a report. Everything
here needs ``deeplabcut``; nothing here is needed to migrate a project.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlc_snapshot_fix import verify
from dlc_snapshot_fix.discover import read_yaml
from dlc_snapshot_fix.reading import load_snapshot


def build_pose_model(pytorch_config: Path) -> torch.nn.Module:
    """Build the pose model a ``pytorch_config.yaml`` describes, as DeepLabCut's inference does."""
    config = read_yaml(Path(pytorch_config))
    return verify.build_pose_model(config["model"])


RC5_METRICS = {"test.rmse": 3.25, "test.rmse_pcutoff": 3.25, "test.mAP": 0.5, "test.mAR": 0.5}
"""What rc5 recorded after evaluating a snapshot (used where the run being imitated recorded none)."""


def rc5_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` as 3.0.0rc5 saved it: every metric a numpy float64 (it stored ``np.mean(...)`` results)."""
    metrics = metadata.get("metrics") or RC5_METRICS
    return {**metadata, "metrics": {name: np.float64(value) for name, value in metrics.items()}}


def save_like_multi_gpu_rc5(path: Path, model: torch.nn.Module, snapshot: dict[str, Any]) -> Path:
    """Save ``snapshot`` with ``model``'s weights as DeepLabCut 3.0.0rc5 did after a two-GPU run.

    rc5's ``TrainingRunner`` wrapped the model in ``torch.nn.DataParallel`` when
    ``runner.gpus`` listed several GPUs and saved ``wrapper.state_dict()``, so every key
    starts with ``module.``. Without CUDA, DataParallel is a pass-through wrapper, so
    the saved keys (and ``_metadata``) are exactly those of a real two-GPU run. Its
    metrics were numpy float64, pickled under the numpy installed here.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")  # never truncate a file that may be memory-mapped
    metadata = rc5_metadata(snapshot.get("metadata") or {})
    torch.save({**snapshot, "metadata": metadata, "model": torch.nn.DataParallel(model).state_dict()}, partial)
    os.replace(partial, path)
    return path


def write_dataparallel_snapshots(
    train_dir: Path, model: torch.nn.Module, epochs: Iterable[int], best_epoch: int | None
) -> list[Path]:
    """Numbered (and one best) rc5-style multi-GPU snapshots of ``model`` in ``train_dir``."""
    written = []
    for epoch in epochs:
        name = f"snapshot-best-{epoch:03d}.pt" if epoch == best_epoch else f"snapshot-{epoch:03d}.pt"
        metadata = {
            "epoch": epoch,
            "metrics": {"test.rmse": 1.5, "test.mAP": 0.5},
            "losses": {"train.total_loss": 0.01},
        }
        written.append(save_like_multi_gpu_rc5(Path(train_dir) / name, model, {"metadata": metadata}))
    return written


def load_in_memory(path: Path) -> dict[str, Any]:
    """``load_snapshot``, its tensors copied out of the file's memory map: the caller can keep it while the file
    is replaced or truncated, which Windows refuses while a process maps it (as a user's DeepLabCut would)."""
    return copy.deepcopy(load_snapshot(path))


def break_like_two_gpu_rc5(project: Path) -> list[Path]:
    """A project's snapshots as a two-GPU 3.0.0rc5 run leaves them: ``snapshot-005.pt`` and ``snapshot-best-010.pt``
    of the model its (first) ``pytorch_config.yaml`` builds, every key ``module.``-prefixed, numpy metrics."""
    train = next(Path(project).glob("dlc-models-pytorch/iteration-*/*/train"))
    return write_dataparallel_snapshots(train, build_pose_model(train / "pytorch_config.yaml"), (5, 10), best_epoch=10)


def rewrap_as_dataparallel(path: Path, model: torch.nn.Module) -> Path:
    """Turn a snapshot DeepLabCut wrote into the one a two-GPU rc5 run would have written.

    Every entry but ``model`` (metadata, optimizer, scheduler) is kept as DeepLabCut wrote it.
    """
    snapshot = load_in_memory(path)  # the file is replaced below
    model.load_state_dict(snapshot["model"], strict=True)
    return save_like_multi_gpu_rc5(path, model, snapshot)


FRAMES, SIZE = 20, 64
BODYPARTS = ("head", "tail")
COLOURS = {"head": (0, 0, 255), "tail": (0, 255, 0), "mid": (255, 0, 0)}


def dot_positions(frame: int) -> dict[str, tuple[float, float]]:
    """Where each bodypart's dot is drawn in ``frame``: the ground truth for labels."""
    head, tail = (12.0 + 2.0 * frame, 20.0 + frame), (50.0 - frame, 44.0 - 0.5 * frame)
    return {"head": head, "tail": tail, "mid": ((head[0] + tail[0]) / 2, (head[1] + tail[1]) / 2 + 6.0)}


def write_video(path: Path, bodyparts: tuple[str, ...]) -> None:
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (SIZE, SIZE))  # type: ignore[attr-defined,unused-ignore]
    for frame in range(FRAMES):
        image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        for bodypart in bodyparts:
            x, y = dot_positions(frame)[bodypart]
            cv2.circle(image, (round(x), round(y)), 4, COLOURS[bodypart], -1)
        writer.write(image)
    writer.release()


INDIVIDUALS = ("mouse1", "mouse2")
"""A multi-animal sample's individuals: the second is the first mirrored through the frame's centre."""


def set_bodyparts(config: Path, bodyparts: tuple[str, ...], multi_animal: bool = False) -> None:
    from deeplabcut.utils.auxiliaryfunctions import edit_config

    if multi_animal:
        edits = {"multianimalbodyparts": list(bodyparts), "individuals": list(INDIVIDUALS), "uniquebodyparts": []}
    else:
        edits = {"bodyparts": list(bodyparts)}
    edit_config(str(config), {**edits, "numframes2pick": 8})


def _individual_position(frame: int, bodypart: str, individual: int) -> tuple[float, float]:
    x, y = dot_positions(frame)[bodypart]
    return (x, y) if individual == 0 else (SIZE - 1 - x, SIZE - 1 - y)


def write_labels(config: Path, scorer: str, bodyparts: tuple[str, ...], multi_animal: bool = False) -> None:
    """Label every extracted frame with the exact dot positions, as a user would."""
    import pandas as pd

    project = config.parent
    individuals = INDIVIDUALS if multi_animal else ("",)
    for folder in (project / "labeled-data").iterdir():
        images = sorted(folder.glob("img*.png"))
        index = pd.MultiIndex.from_tuples([("labeled-data", folder.name, image.name) for image in images])
        if multi_animal:
            columns = pd.MultiIndex.from_product(
                [[scorer], list(individuals), list(bodyparts), ["x", "y"]],
                names=["scorer", "individuals", "bodyparts", "coords"],
            )
        else:
            columns = pd.MultiIndex.from_product(
                [[scorer], list(bodyparts), ["x", "y"]], names=["scorer", "bodyparts", "coords"]
            )
        rows = []
        for image in images:
            frame = int(image.stem.removeprefix("img"))
            rows.append(
                [c for i in range(len(individuals)) for bp in bodyparts for c in _individual_position(frame, bp, i)]
            )
        frame_labels = pd.DataFrame(rows, index=index, columns=columns)
        frame_labels.to_hdf(folder / f"CollectedData_{scorer}.h5", key="df_with_missing")
        frame_labels.to_csv(folder / f"CollectedData_{scorer}.csv")


def copy_project(source: Path, destination: Path, ignore: Any = None) -> Path:
    """Copy a project and point its ``project_path`` at the copy, as a user moving a project must.

    DeepLabCut 3.0.2 repairs a stale ``project_path`` itself; 3.0.0 and 3.0.1 follow it
    back to the original folder (and would evaluate the original's snapshots).
    """
    from deeplabcut.utils.auxiliaryfunctions import edit_config

    shutil.copytree(source, destination, ignore=ignore)
    edit_config(str(destination / "config.yaml"), {"project_path": str(destination)})
    return destination


def make_sample_project(
    destination: Path,
    bodyparts: tuple[str, ...] = BODYPARTS,
    *,
    multi_animal: bool = False,
    net_type: str = "resnet_50",
) -> Path:
    """A tiny real project at ``destination``: DeepLabCut's own files, frames labelled from the known dots.

    ``multi_animal``: two individuals (the second mirrored), DeepLabCut's multi-animal layout.
    """
    import deeplabcut
    from deeplabcut.core.engine import Engine  # where every 3.0 release has it (rc2 exports no deeplabcut.Engine)

    if destination.exists():
        raise SystemExit(f"{destination} exists; remove it first")
    with tempfile.TemporaryDirectory() as scratch:
        video = Path(scratch) / "dots.mp4"
        write_video(video, bodyparts)
        created = deeplabcut.create_new_project(
            "dots", "lab", [str(video)], working_directory=scratch, copy_videos=True, multianimal=multi_animal
        )
        config = Path(created)
        set_bodyparts(config, bodyparts, multi_animal)
        deeplabcut.extract_frames(str(config), mode="automatic", algo="uniform", userfeedback=False)
        write_labels(config, scorer="lab", bodyparts=bodyparts, multi_animal=multi_animal)
        deeplabcut.create_training_dataset(
            str(config),
            net_type=net_type,
            engine=Engine.PYTORCH,
            userfeedback=False,
        )
        copy_project(config.parent, destination)
    return destination
