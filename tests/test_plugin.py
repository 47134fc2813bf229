"""The plugin, one test per DeepLabCut load path, with the real DeepLabCut 3.0.2.

Each path is run twice on the same rc5-style multi-GPU snapshot: without the plugin it
fails as DeepLabCut does today; with it the call succeeds. The snapshot's bytes never change.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import deeplabcut
import pytest
import torch
from conftest import train_dir_of, train_one_epoch
from deeplabcut.pose_estimation_pytorch.apis import train_network
from deeplabcut.pose_estimation_pytorch.runners import snapshots as dlc_snapshots

from dlc_snapshot_fix import autoload, load_snapshot, plugin
from dlc_snapshot_fix.testing import build_pose_model

pytestmark = pytest.mark.deeplabcut
PREFIX_ERROR = r"Unexpected key\(s\) in state_dict: \"module\."


@pytest.fixture(autouse=True)
def plugin_off():
    plugin.uninstall()
    plugin._warned.clear()
    yield
    plugin.uninstall()


@pytest.fixture
def prefixed(multi_gpu_project: Path):
    """(project, config, train_dir, best snapshot) with the bytes of every snapshot recorded."""
    train_dir = train_dir_of(multi_gpu_project)
    before = {p: p.read_bytes() for p in train_dir.glob("*.pt")}
    yield multi_gpu_project, multi_gpu_project / "config.yaml", train_dir, train_dir / "snapshot-best-001.pt"
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path.name} was modified by loading"


def both_ways(call, error=PREFIX_ERROR):
    """Run ``call`` without the plugin (must fail like DeepLabCut does) and with it (must work)."""
    with pytest.raises(RuntimeError, match=error):
        call()
    with plugin.enabled(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert any(issubclass(w.category, plugin.PrefixedSnapshotWarning) for w in caught)
    return result


def test_evaluate_network(prefixed):
    project, config, _, _ = prefixed
    both_ways(lambda: deeplabcut.evaluate_network(str(config), Shuffles=[1]))
    assert list(project.glob("evaluation-results-pytorch/iteration-0/*/*-results.csv"))


def test_analyze_videos(prefixed):
    project, config, _, _ = prefixed
    video = project / "videos" / "dots.mp4"
    both_ways(lambda: deeplabcut.analyze_videos(str(config), [str(video)], shuffle=1, device="cpu"))
    assert list((project / "videos").glob("dots*.h5"))


def test_analyze_images(prefixed):
    project, config, _, _ = prefixed
    images = project / "labeled-data" / "dots"
    predictions = both_ways(lambda: deeplabcut.analyze_images(str(config), str(images), shuffle=1, device="cpu"))
    assert len(predictions) == len(list(images.glob("*.png")))


@contextlib.contextmanager
def set_aside(train_dir: Path) -> Iterator[Path]:
    """Move the snapshots out of ``train/`` while training writes new ones there; yield the best one.

    Training saves ``snapshot-001.pt`` in place: without this it would overwrite the
    prefixed snapshot the test loads from. The new (clean) files are returned to the caller
    inside the block, and the prefixed ones are put back afterwards.
    """
    aside = train_dir.parent / "set-aside"
    aside.mkdir()
    for old in train_dir.glob("*.pt"):
        shutil.move(old, aside / old.name)
    try:
        yield aside / "snapshot-best-001.pt"
    finally:
        for new in train_dir.glob("*.pt"):
            new.unlink()
        for old in aside.glob("*.pt"):
            shutil.move(old, train_dir / old.name)
        aside.rmdir()


def assert_clean_snapshots_written(train_dir: Path) -> None:
    written = sorted(train_dir.glob("snapshot-*.pt"))
    assert written, "training wrote no snapshot"
    for path in written:
        assert not any(k.startswith("module.") for k in load_snapshot(path)["model"])


@pytest.mark.parametrize("load_head_weights", [True, False])
def test_resume_training_and_new_snapshots_are_clean(prefixed, load_head_weights: bool):
    _, config, train_dir, _ = prefixed
    with set_aside(train_dir) as resume_from:

        def resume():
            train_network(
                str(config),
                shuffle=1,
                epochs=1,
                batch_size=1,
                device="cpu",
                snapshot_path=str(resume_from),
                load_head_weights=load_head_weights,
            )

        both_ways(resume, error=PREFIX_ERROR if load_head_weights else r"Missing key\(s\)")
        assert_clean_snapshots_written(train_dir)


def test_weight_init_from_a_prefixed_snapshot(prefixed):
    _, config, train_dir, _ = prefixed
    with set_aside(train_dir) as source:
        weight_init = {"snapshot_path": str(source), "with_decoder": False, "memory_replay": False}

        def train_from_weight_init():
            train_one_epoch(config.parent, pytorch_cfg_updates={"train_settings.weight_init": weight_init})

        both_ways(train_from_weight_init, error=r"Missing key\(s\) in state_dict")
        assert_clean_snapshots_written(train_dir)


def test_detector_weight_init_from_a_prefixed_snapshot(tmp_path: Path):
    """SSDLite: the one DeepLabCut detector that builds here without downloading weights."""
    from deeplabcut.core.weight_init import WeightInitialization
    from deeplabcut.pose_estimation_pytorch.models.detectors import DETECTORS

    config = {"type": "SSDLite", "pretrained_from_imagenet": False}
    detector = DETECTORS.build(dict(config), pretrained=False)
    path = tmp_path / "snapshot-detector-best-010.pt"
    torch.save({"metadata": {"epoch": 10}, "model": torch.nn.DataParallel(detector).state_dict()}, path)
    before = path.read_bytes()
    weight_init = WeightInitialization(snapshot_path=None, detector_snapshot_path=path)  # (3.0.0 requires both)

    with pytest.raises(RuntimeError, match=PREFIX_ERROR):
        DETECTORS.build(dict(config), weight_init=weight_init, pretrained=False)
    with plugin.enabled(), pytest.warns(plugin.PrefixedSnapshotWarning):
        loaded = DETECTORS.build(dict(config), weight_init=weight_init, pretrained=False)
    for key, tensor in detector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor)
    assert path.read_bytes() == before


def test_export_model_writes_a_clean_exported_file(prefixed):
    project, config, train_dir, _ = prefixed
    deeplabcut.export_model(str(config), shuffle=1, make_tar=False)
    (exported,) = project.glob("exported-models-pytorch/*/*.pt")
    model = build_pose_model(train_dir / "pytorch_config.yaml")
    # trust: this test made the file; DeepLabCut 3.0.0 and 3.0.1 pickle their enums and a PosixPath in its config
    with pytest.raises(RuntimeError, match=PREFIX_ERROR):  # what DeepLabCut-Live would meet
        model.load_state_dict(load_snapshot(exported, trust=True)["pose"], strict=True)

    with plugin.enabled(), pytest.warns(plugin.PrefixedSnapshotWarning, match="snapshot-best-001.pt"):
        deeplabcut.export_model(str(config), shuffle=1, make_tar=False, overwrite=True)
    model.load_state_dict(load_snapshot(exported, trust=True)["pose"], strict=True)


def test_the_snapshot_manager_saves_clean_snapshots_whatever_wrapped_the_model(tmp_path: Path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    wrapped = torch.nn.DataParallel(torch.nn.DataParallel(model))
    manager = dlc_snapshots.TorchSnapshotManager("snapshot", tmp_path, save_epochs=1)
    with plugin.enabled():
        manager.update(1, {"metadata": {"metrics": {}}, "model": wrapped.state_dict()}, last=True)
    saved = load_snapshot(tmp_path / "snapshot-001.pt")["model"]
    assert list(saved) == list(model.state_dict())
    assert saved._metadata == model.state_dict()._metadata


def test_each_prefixed_file_is_reported_once_per_process(prefixed):
    _, config, _, best = prefixed
    with plugin.enabled(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            deeplabcut.evaluate_network(str(config), Shuffles=[1])
    ours = [w for w in caught if issubclass(w.category, plugin.PrefixedSnapshotWarning)]
    assert len(ours) == 1
    assert str(best) in str(ours[0].message) and "dlc-snapshot-fix '" in str(ours[0].message)


def test_uninstall_restores_every_patched_object_exactly():
    from deeplabcut.pose_estimation_pytorch import runners
    from deeplabcut.pose_estimation_pytorch.apis import export
    from deeplabcut.pose_estimation_pytorch.models import model as model_module
    from deeplabcut.pose_estimation_pytorch.models.detectors import base as detector_base
    from deeplabcut.pose_estimation_pytorch.runners import base, train

    owners = (runners, base, train, export, model_module, detector_base, dlc_snapshots.TorchSnapshotManager)
    before = {(id(o), name): value for o in owners for name, value in vars(o).items()}
    plugin.install()
    plugin.install()  # idempotent
    assert base.attempt_snapshot_load is not before[(id(base), "attempt_snapshot_load")]
    assert train.attempt_snapshot_load is base.attempt_snapshot_load
    assert model_module.torch is not torch and model_module.torch.load is not torch.load
    plugin.uninstall()
    after = {(id(o), name): value for o in owners for name, value in vars(o).items()}
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)


def test_a_missing_hook_point_is_a_clear_error_and_patches_nothing(monkeypatch: pytest.MonkeyPatch):
    from deeplabcut.pose_estimation_pytorch.runners import base, train

    original = base.attempt_snapshot_load
    monkeypatch.delattr(train, "attempt_snapshot_load")
    version = re.escape(deeplabcut.__version__)
    with pytest.raises(plugin.PluginError, match=rf"deeplabcut {version} has no hook point .*runners\.train"):
        plugin.install()
    assert not plugin.is_installed()
    assert base.attempt_snapshot_load is original


def test_environment_wide_switch_loads_prefixed_snapshots_in_a_new_process(
    prefixed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _, config, _, _ = prefixed
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    monkeypatch.setattr(autoload, "pth_path", lambda: site_dir / autoload.PTH_NAME)
    script = (
        f"import site; site.addsitedir({str(site_dir)!r}); import deeplabcut; "
        f"deeplabcut.evaluate_network({str(config)!r}, Shuffles=[1])"
    )

    def run(env_extra=None):
        env = {**__import__("os").environ, **(env_extra or {})}
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)

    autoload.enable()
    assert autoload.is_enabled()
    enabled = run()
    assert enabled.returncode == 0, enabled.stderr[-2000:]
    assert "PrefixedSnapshotWarning" in enabled.stderr
    assert run({"DLC_SNAPSHOT_FIX_PLUGIN": "0"}).returncode != 0
    autoload.disable()
    disabled = run()
    assert disabled.returncode != 0 and "Unexpected key(s)" in disabled.stderr


def test_an_untested_deeplabcut_version_is_loud(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(deeplabcut, "__version__", "3.0.9")
    with pytest.warns(plugin.UntestedDeepLabCutWarning, match="not 3.0.9"):
        plugin.install()
    plugin.uninstall()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", plugin.UntestedDeepLabCutWarning)
        plugin.install()  # a tested version: silent
    plugin.uninstall()
