"""Write tests/data/vintage/<release>.tar.xz: a tiny project trained by a DeepLabCut pre-release's own code.

Run it with the interpreter of a venv that holds that release and the torch of its day, e.g.::

    python3.11 -m venv /tmp/rc2 && /tmp/rc2/bin/pip install deeplabcut==3.0.0rc2 torch==2.3.1 torchvision==0.18.1
    PYTHONPATH=. /tmp/rc2/bin/python scripts/make_vintage_fixtures.py --optimizer-state no

The project is the sample project's recipe (20 frames of moving dots, two bodyparts, a
ResNet-50 shuffle) made by that release's ``create_new_project`` / ``create_training_dataset``,
then trained for two epochs by its ``apis.train.train(..., gpus=[0, 1])``: rc2-rc5's
``train_network`` never read ``runner.gpus`` (DeepLabCut issue #2744), so a lab's multi-GPU
snapshots came from this call. Two things differ from a lab's GPU run, neither in what is saved:
``DataParallel.cuda()`` is a no-op (no GPU here; without CUDA DataParallel is a pass-through that
saves the same ``module.`` keys) and the backbone starts from random weights (no ImageNet download).

To keep the fixture a few hundred KB, every tensor storage is then zeroed in place (CRC-32s
updated): the pickle (keys, metadata, optimizer state, as that release's numpy pickled them),
the record names and order, the alignment and the file size are the release's, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

DATA = Path(__file__).parents[1] / "tests" / "data" / "vintage"


def zero_storages(path: Path) -> int:
    """Zero every ``data/<n>`` record of a torch zip in place, fixing its CRC-32s; returns bytes zeroed."""
    with zipfile.ZipFile(path) as archive:
        records = {i.filename: i for i in archive.infolist() if i.filename.split("/")[-2:-1] == ["data"]}
        central, count = archive.start_dir, len(archive.infolist())
    crcs = {}
    with open(path, "r+b") as stream:
        for name, info in records.items():
            assert info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size, name
            stream.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", stream.read(4))
            start = info.header_offset + 30 + name_length + extra_length
            stream.seek(start)
            stream.write(bytes(info.file_size))
            crcs[name] = struct.pack("<I", zlib.crc32(bytes(info.file_size)))
            stream.seek(info.header_offset + 14)
            stream.write(crcs[name])
            if info.flag_bits & 0x08:  # a data descriptor follows the data: its CRC first, after a signature
                stream.seek(start + info.file_size)
                signed = stream.read(4) == b"PK\x07\x08"
                stream.seek(start + info.file_size + (4 if signed else 0))
                stream.write(crcs[name])
        offset = central
        for _ in range(count):  # the central directory: each entry's CRC-32 is at +16
            stream.seek(offset)
            entry = stream.read(46)
            assert entry[:4] == b"PK\x01\x02", (path, offset)
            name_length, extra_length, comment_length = struct.unpack("<HHH", entry[28:34])
            name = stream.read(name_length).decode()
            if name in crcs:
                stream.seek(offset + 16)
                stream.write(crcs[name])
            offset += 46 + name_length + extra_length + comment_length
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None, path
    return sum(info.file_size for info in records.values())


def train_like_a_lab(project: Path, optimizer_state: bool) -> None:
    """Two epochs of the release's own training loop with ``gpus=[0, 1]``."""
    import torch
    from deeplabcut.pose_estimation_pytorch.apis.train import train
    from deeplabcut.pose_estimation_pytorch.data import DLCLoader
    from deeplabcut.pose_estimation_pytorch.models.model import PoseModel
    from deeplabcut.pose_estimation_pytorch.task import Task

    torch.manual_seed(0)
    torch.nn.DataParallel.cuda = lambda self, *args, **kwargs: self  # no GPU here; nothing saved changes
    build = PoseModel.build  # a staticmethod in every 3.0 pre-release: (cfg, weight_init, pretrained_backbone)

    def build_without_download(cfg, weight_init=None, pretrained_backbone=False):
        return build(cfg, weight_init=weight_init, pretrained_backbone=False)

    PoseModel.build = staticmethod(build_without_download)
    loader = DLCLoader(config=str(project / "config.yaml"), shuffle=1)
    config = loader.model_cfg
    config["train_settings"].update(epochs=2, batch_size=2, dataloader_workers=0, display_iters=1)
    config["runner"]["snapshots"].update(save_epochs=1, max_snapshots=5, save_optimizer_state=optimizer_state)
    train(loader, run_config=config, task=Task.BOTTOM_UP, device="cpu", gpus=[0, 1])


def main() -> None:
    import deeplabcut
    import numpy
    import torch

    from dlc_snapshot_fix.testing import make_sample_project

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer-state", choices=("yes", "no"), default="no")
    arguments = parser.parse_args()
    release = deeplabcut.__version__.removeprefix("3.0.0")
    with tempfile.TemporaryDirectory() as scratch:
        project = make_sample_project(Path(scratch) / f"vintage-{release}")
        train_like_a_lab(project, arguments.optimizer_state == "yes")
        snapshots = sorted(project.rglob("snapshot*.pt"))
        zeroed = sum(zero_storages(path) for path in snapshots)
        (project / "MADE_BY.txt").write_text(
            f"deeplabcut {deeplabcut.__version__}, torch {torch.__version__}, numpy {numpy.__version__}: "
            f"apis.train.train(gpus=[0, 1]), 2 epochs; {zeroed} bytes of tensor storage zeroed afterwards\n"
        )
        for folder in ("videos", "labeled-data-backup"):
            shutil.rmtree(project / folder, ignore_errors=True)
        DATA.mkdir(parents=True, exist_ok=True)
        target = DATA / f"{release}.tar.xz"
        with tarfile.open(target, "w:xz", preset=9) as archive:
            archive.add(project, arcname=project.name)
    print(f"wrote {target} ({target.stat().st_size} bytes): {[p.name for p in snapshots]}")


if __name__ == "__main__":
    main()
