"""Shared fixtures: small snapshots and project trees built in memory, no DeepLabCut needed."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, settings

settings.register_profile(  # `--hypothesis-profile slow-host`: Wine runs every call several times slower
    "slow-host", suppress_health_check=[HealthCheck.too_slow], deadline=None
)

TRAIN = "dlc-models-pytorch/iteration-0/testNov22-trainset80shuffle1/train"
SAMPLE = Path(__file__).parents[1] / "sample_project"
SAMPLE_MADE_BY = ("3.0.2", 2)
"""The DeepLabCut and the numpy major that made sample_project (scripts/make_sample_project.py)."""

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # DeepLabCut must never wait for a hub here
# Model signatures are kept in the user's cache folder: the tests keep theirs apart (and begin with none).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dlc-snapshot-fix-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

if importlib.util.find_spec("deeplabcut") is None:  # a torch-only cell of the matrix (scripts/matrix.sh)
    collect_ignore = [
        "test_deeplabcut.py",
        "test_diagnose_adapt.py",
        "test_filesystems.py",  # its archive is the zoo's, which DeepLabCut builds
        "test_plugin.py",
        "test_signature_deeplabcut.py",
        "test_verdicts.py",
        "test_vintage.py",
        "test_zoo.py",
    ]
    print("conftest: deeplabcut is not installed: its modules are not collected, its tests not run")
os.environ.setdefault("MPLBACKEND", "Agg")


def _symlinks_work() -> bool:
    """Whether this process can make a symbolic link (a probe: made, then looked at)."""
    folder = Path(tempfile.mkdtemp(prefix="dlc-snapshot-fix-symlink-"))
    try:
        (folder / "link").symlink_to(folder / "target")
        return (folder / "link").is_symlink()
    except OSError:
        return False
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _held_locks_set_errno() -> bool:
    """Whether a lock another handle holds makes ``msvcrt.locking`` fail with an errno, as Windows' C runtime does
    (EACCES) and filelock 3.x needs to tell "held" from "broken". Wine 8.0's fails with errno 0."""
    if sys.platform != "win32":
        return True
    import msvcrt

    folder = Path(tempfile.mkdtemp(prefix="dlc-snapshot-fix-lock-"))
    holder = os.open(folder / "probe", os.O_RDWR | os.O_CREAT)
    other = os.open(folder / "probe", os.O_RDWR)
    try:
        msvcrt.locking(holder, msvcrt.LK_NBLCK, 1)
        msvcrt.locking(other, msvcrt.LK_NBLCK, 1)
        return False  # both took it: no lock works here
    except OSError as error:
        return error.errno != 0
    finally:
        os.close(other)
        os.close(holder)
        shutil.rmtree(folder, ignore_errors=True)


SYMLINKS_WORK = _symlinks_work()
HELD_LOCKS_SET_ERRNO = _held_locks_set_errno()
needs_symlinks = pytest.mark.skipif(
    not SYMLINKS_WORK,
    reason="no symbolic links here (Wine 8.0 gap: it reports making one and makes nothing; "
    "Windows itself needs Developer Mode or an administrator)",
)


class TinyPose(torch.nn.Module):
    """Small, but with DeepLabCut-like names: a backbone, a head, a BatchNorm (buffers)."""

    def __init__(self, keypoints: int = 2):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.heads = torch.nn.ModuleDict({"bodypart": torch.nn.Conv2d(4, keypoints, 1)})


def wrapped_state_dict(model: torch.nn.Module, *wrappers: str) -> OrderedDict:
    """``model``'s state dict as saved through wrappers, outermost first (``"dp"`` or ``"compile"``)."""
    for wrapper in reversed(wrappers):
        if wrapper == "dp":
            model = torch.nn.DataParallel(model)
        else:
            shell = torch.nn.Module()
            shell._orig_mod = model  # what torch.compile's OptimizedModule holds
            model = shell
    return model.state_dict()


WITH_START_METHOD = (  # the CLI, its pool workers started as on Windows and macOS (spawn) or Python 3.14 (forkserver)
    "import multiprocessing, sys; multiprocessing.set_start_method(sys.argv[1]); "
    "from dlc_snapshot_fix.cli import main; main(sys.argv[2:], prog_name='dlc-snapshot-fix')"
)
"""``python -c WITH_START_METHOD METHOD ARGS...``: the CLI with its pool's start method chosen."""


def save_snapshot(path: Path, state_dict, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"metadata": {"epoch": 3, "metrics": {"test.rmse": 2.0}}, "model": state_dict, **extra}, path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DeepLabCut project skeleton (config files only) in a folder whose name has a space."""
    return make_project(tmp_path / "my project")


def make_project(root: Path, train: str = TRAIN) -> Path:
    """Config files of a bottom-up PyTorch project at ``root`` (no model section: no model check)."""
    (root / train).mkdir(parents=True)
    (root / "config.yaml").write_text(
        yaml.safe_dump({"Task": "test", "project_path": str(root), "engine": "pytorch", "iteration": 0})
    )
    (root / train / "pytorch_config.yaml").write_text(yaml.safe_dump({"method": "bu", "net_type": "tiny"}))
    return root


def train_dir_of(project: Path) -> Path:
    return next(project.glob("dlc-models-pytorch/iteration-0/*/train"))


def sample_project_copy(destination: Path) -> Path:
    """sample_project at ``destination`` without snapshots or results, as this DeepLabCut and numpy can use it.

    sample_project was made by DeepLabCut 3.0.2 with numpy 2; under another version the same
    project is made by that version's own functions (3.0.0 cannot read some of 3.0.2's config
    keys), and so it is under numpy 1 (the Windows run): DeepLabCut's training-set pickles name
    numpy 2's modules (numpy._core), which numpy 1 cannot import.
    """
    import deeplabcut
    import numpy

    from dlc_snapshot_fix.testing import copy_project, make_sample_project

    if (deeplabcut.__version__, int(numpy.__version__.split(".")[0])) == SAMPLE_MADE_BY:
        ignore = shutil.ignore_patterns("*.pt", ".dlc-snapshot-fix", "evaluation-results*")
        return copy_project(SAMPLE, destination, ignore=ignore)
    return make_sample_project(destination)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sample_project (or its twin, made here: ``sample_project_copy``) after one real epoch of training,
    with DeepLabCut's own clean snapshots."""
    from dlc_snapshot_fix.testing import build_pose_model

    project = sample_project_copy(tmp_path_factory.mktemp("dlc") / "sample project")
    train_dir = next(project.glob("dlc-models-pytorch/iteration-0/*/train"))
    random_init = project / "random-init.pt"  # outside train/: DeepLabCut must not list it
    torch.save({"model": build_pose_model(train_dir / "pytorch_config.yaml").state_dict()}, random_init)
    train_one_epoch(project, snapshot_path=random_init)
    return project


def train_one_epoch(project: Path, **options) -> None:
    """One epoch of DeepLabCut's real training on the CPU (about 20 s for these tiny projects)."""
    import deeplabcut

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    deeplabcut.train_network(str(project / "config.yaml"), shuffle=1, epochs=1, batch_size=1, device="cpu", **options)


@pytest.fixture
def multi_gpu_project(trained_project: Path, tmp_path: Path) -> Path:
    """A fresh copy whose snapshots are what DeepLabCut 3.0.0rc5 saved after a two-GPU run."""
    from dlc_snapshot_fix.testing import build_pose_model, copy_project, rewrap_as_dataparallel

    project = copy_project(trained_project, tmp_path / "project")
    train_dir = next(project.glob("dlc-models-pytorch/iteration-0/*/train"))
    trained = train_dir / "snapshot-001.pt"
    assert trained.is_file(), "DeepLabCut's training wrote no snapshot-001.pt"
    best = train_dir / "snapshot-best-001.pt"  # what DeepLabCut names the best epoch when it has metrics
    shutil.copyfile(trained, best)
    model = build_pose_model(train_dir / "pytorch_config.yaml")
    for path in (trained, best):
        rewrap_as_dataparallel(path, model)
    return project


@pytest.fixture(scope="session")
def three_bodypart_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real project like sample_project, but with a third bodypart ("mid")."""
    from dlc_snapshot_fix.testing import make_sample_project

    return make_sample_project(tmp_path_factory.mktemp("three") / "three bodyparts", ("head", "tail", "mid"))


@pytest.fixture(scope="session")
def seeded_torch_hub(tmp_path_factory: pytest.TempPathFactory):
    """torchvision's ImageNet backbones as files in a torch hub cache: DeepLabCut's Faster R-CNN builds as it does
    for a user (FrozenBatchNorm2d, weights loaded), without a download."""
    import torchvision
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights

    home = tmp_path_factory.mktemp("torch-home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for weights, build in (
        (MobileNet_V3_Large_Weights.IMAGENET1K_V1, torchvision.models.mobilenet_v3_large),
        (ResNet50_Weights.IMAGENET1K_V1, torchvision.models.resnet50),
    ):
        torch.save(build(weights=None).state_dict(), checkpoints / weights.url.rsplit("/", 1)[1])
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCH_HOME", str(home))
    yield home
    patch.undo()
