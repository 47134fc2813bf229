"""The differential test: the default verdict (from signatures) against the real DeepLabCut, over the whole zoo.

Every zoo architecture and every detector DeepLabCut ships, clean (prefix stripped), then
altered the ways a snapshot can differ from its model. The judge is DeepLabCut itself:
its ``attempt_snapshot_load`` (with the ``load_weights_only`` the config sets) and a strict
``load_state_dict`` into the model its own builders make for inference. torchvision's Faster
R-CNN backbones are built by DeepLabCut's code untouched, from a pre-seeded torch hub
cache (random weights under the names torchvision looks for), so no builder here is the
tool's. The tool's verdict is the default ``--check``'s (``--keep-numpy-metadata``, so the
file judged is the file as it is). One difference is chosen, and tested as such: bytes of
a tensor record altered inside an intact file are seen only by ``--deep-check``.
"""

from __future__ import annotations

import datetime
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zoo

from dlc_snapshot_fix import keys
from dlc_snapshot_fix.migrate import MigrationOptions, migrate_project
from dlc_snapshot_fix.report import Status

pytestmark = pytest.mark.deeplabcut


def deeplabcut_loads(path: Path, pytorch_config: Path, detector: bool) -> bool:
    """DeepLabCut's verdict: its loader, then a strict load into the model its inference builds."""
    from deeplabcut.core.config import read_config_as_dict
    from deeplabcut.pose_estimation_pytorch.models import PoseModel
    from deeplabcut.pose_estimation_pytorch.models.detectors import DETECTORS
    from deeplabcut.pose_estimation_pytorch.runners.base import attempt_snapshot_load

    config = read_config_as_dict(str(pytorch_config))
    section = config["detector"] if detector else config
    try:
        snapshot = attempt_snapshot_load(path, "cpu", section.get("runner", {}).get("load_weights_only"))
        if detector:
            model_config = dict(section["model"])
            model_config["pretrained"] = False  # as apis/utils.py builds it for inference
            model = DETECTORS.build(model_config)
        else:
            model = PoseModel.build(config["model"], pretrained_backbone=False)
        model.load_state_dict(snapshot["model"])
    except Exception:
        return False
    return True


def tool_says_loads(project: Path, path: Path, **options) -> tuple[bool, str]:
    report = migrate_project(project, write=False, options=MigrationOptions(fix_metadata=False, **options))
    result = next(r for r in report.results if r.path == path)
    fits = result.status.value != "failed" and all(c.status == "ok" for c in result.model_checks.values())
    return fits and bool(result.model_checks), result.describe()


def clean_snapshot(path: Path) -> dict:
    snapshot = torch.load(path, map_location="cpu", weights_only=False)
    state = snapshot["model"]
    for prefix in keys.find_wrapper_prefixes(state):
        state = keys.strip_prefix(state, prefix)
    snapshot["model"] = state
    return snapshot


def _without(state: OrderedDict, key: str) -> OrderedDict:
    altered = OrderedDict((k, v) for k, v in state.items() if k != key)
    altered._metadata = state._metadata
    return altered


def _with(state: OrderedDict, key: str, value: torch.Tensor) -> OrderedDict:
    altered = OrderedDict(state)
    altered[key] = value
    altered._metadata = state._metadata
    return altered


def _metadata_dropped(state: OrderedDict) -> OrderedDict:
    return OrderedDict(state)  # a plain copy has no _metadata


def _metadata_at_version_2(state: OrderedDict) -> OrderedDict:
    altered = OrderedDict(state)
    altered._metadata = OrderedDict((name, {**entry, "version": 2}) for name, entry in state._metadata.items())
    return altered


def _last_weight(state: OrderedDict) -> str:
    return next(k for k in reversed(state) if k.endswith("weight") and state[k].ndim >= 1)


def _first_batch_count(state: OrderedDict) -> str | None:
    return next((k for k in state if k.endswith("num_batches_tracked")), None)


def _frozen_running_mean(state: OrderedDict) -> str | None:
    """A running mean whose module keeps no num_batches_tracked (FrozenBatchNorm2d) or, failing that, any."""
    means = [k for k in state if k.endswith("running_mean")]
    frozen = [k for k in means if k.replace("running_mean", "num_batches_tracked") not in state]
    return (frozen or means or [None])[0]


Mutation = Callable[[dict], "dict | None"]


def _state(change: Callable[[OrderedDict], OrderedDict | None]) -> Mutation:
    def mutate(snapshot: dict) -> dict | None:
        changed = change(snapshot["model"])
        return None if changed is None else {**snapshot, "model": changed}

    return mutate


def _metadata(value: object) -> Mutation:
    return lambda snapshot: {**snapshot, "metadata": {**snapshot["metadata"], "metrics": {"test.rmse": value}}}


MUTATIONS: dict[str, Mutation] = {
    "clean": lambda snapshot: snapshot,
    "a key missing": _state(lambda s: _without(s, next(iter(s)))),
    "a key unexpected": _state(lambda s: _with(s, "heads.extra.weight", torch.zeros(2))),
    "a head for another bodypart count": _state(
        lambda s: _with(s, _last_weight(s), torch.zeros(s[_last_weight(s)].shape[0] + 1, *s[_last_weight(s)].shape[1:]))
    ),
    "a dtype changed": _state(lambda s: _with(s, _last_weight(s), s[_last_weight(s)].double())),
    "num_batches_tracked missing": _state(lambda s: _without(s, k) if (k := _first_batch_count(s)) else None),
    "num_batches_tracked missing, no _metadata": _state(
        lambda s: _metadata_dropped(_without(s, k)) if (k := _first_batch_count(s)) else None
    ),
    "num_batches_tracked extra": _state(
        lambda s: (
            _with(s, k.replace("running_mean", "num_batches_tracked"), torch.tensor(3))
            if (k := _frozen_running_mean(s))
            else None
        )
    ),
    "_metadata missing": _state(_metadata_dropped),
    # as saved by a model whose every module is at version 2: a BatchNorm2d then needs its num_batches_tracked,
    # a FrozenBatchNorm2d never (what tells the structure DeepLabCut's Faster R-CNN infers with from another)
    "_metadata at version 2": _state(_metadata_at_version_2),
    "numpy float64 metrics": _metadata(np.float64(2.5)),
    "numpy float32 metrics": _metadata(np.float32(2.5)),
    "a global DeepLabCut's loader refuses": _metadata(datetime.date(2024, 1, 1)),
}


def zoo_cases() -> list[tuple[str, str]]:
    cases = []
    for member in zoo.MEMBERS:
        for role in ("pose", "detector") if member.detector else ("pose",):
            cases.append((member.name, role))
    return cases


def lay_out(tmp_path: Path, member: zoo.Member, role: str, snapshot: dict, weights_only: bool | None = None):
    """A project holding only this snapshot beside its pytorch_config.yaml (as DeepLabCut wrote it)."""
    root = zoo.cached_zoo()
    project = tmp_path / "project"
    if project.exists():
        shutil.rmtree(project)
    source = zoo.train_dir(root, member)
    train = project / source.relative_to(root / zoo.PROJECTS[member.multi_animal])
    train.mkdir(parents=True)
    shutil.copy(root / zoo.PROJECTS[member.multi_animal] / "config.yaml", project / "config.yaml")
    config = yaml.safe_load((source / "pytorch_config.yaml").read_text())
    if weights_only is not None:
        section = config["detector"] if role == "detector" else config
        section.setdefault("runner", {})["load_weights_only"] = weights_only
    (train / "pytorch_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    name = (zoo.detector_snapshot if role == "detector" else zoo.pose_snapshot)(root, member).name
    path = train / name
    torch.save(snapshot, path)
    return project, path


@pytest.mark.parametrize(("member_name", "role"), zoo_cases())
def test_the_default_verdict_is_deeplabcuts_on_every_model_and_mutation(
    member_name: str, role: str, tmp_path: Path, seeded_torch_hub: Path
):
    member = next(m for m in zoo.MEMBERS if m.name == member_name)
    root = zoo.cached_zoo()
    original = zoo.detector_snapshot(root, member) if role == "detector" else zoo.pose_snapshot(root, member)
    base = clean_snapshot(original)
    disagreements = []
    judged = 0
    for name, mutate in MUTATIONS.items():
        snapshot = mutate(base)
        if snapshot is None:  # (a model without that kind of entry)
            continue
        project, path = lay_out(tmp_path, member, role, snapshot)
        expected = deeplabcut_loads(path, path.parent / "pytorch_config.yaml", role == "detector")
        said, words = tool_says_loads(project, path)
        judged += 1
        if said != expected:
            disagreements.append(f"{name}: DeepLabCut {'loads' if expected else 'refuses'}, the tool said: {words}")
        if name == "clean":
            assert expected, f"{member_name} {role}: DeepLabCut refuses the clean snapshot"
    assert judged >= 9 and not disagreements, "\n".join(disagreements)


def test_load_weights_only_false_is_honoured_as_deeplabcut_honours_it(tmp_path: Path, seeded_torch_hub: Path):
    """numpy float32 metrics: refused under DeepLabCut's default, read when the config says load_weights_only: false."""
    member = next(m for m in zoo.MEMBERS if m.name == "resnet_50")
    snapshot = MUTATIONS["numpy float32 metrics"](clean_snapshot(zoo.pose_snapshot(zoo.cached_zoo(), member)))
    for weights_only in (True, False):
        project, path = lay_out(tmp_path, member, "pose", snapshot, weights_only=weights_only)
        expected = deeplabcut_loads(path, path.parent / "pytorch_config.yaml", detector=False)
        assert expected is (not weights_only)
        assert tool_says_loads(project, path)[0] is expected


def test_altered_tensor_bytes_are_seen_by_the_deep_check_only(tmp_path: Path, seeded_torch_hub: Path):
    """The documented choice: the signature verdict reads no tensor byte, so a record whose bytes were altered
    inside an intact zip (its CRC no longer matching) gets what the structure says; --deep-check, DeepLabCut's word."""
    member = next(m for m in zoo.MEMBERS if m.name == "resnet_50")
    project, path = lay_out(tmp_path, member, "pose", clean_snapshot(zoo.pose_snapshot(zoo.cached_zoo(), member)))
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 64)
    with open(path, "r+b") as stream:
        stream.seek(record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + 8)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0xFF]))
    expected = deeplabcut_loads(path, path.parent / "pytorch_config.yaml", detector=False)
    said, words = tool_says_loads(project, path)
    deep, deep_words = tool_says_loads(project, path, deep_check=True)
    assert said, words  # the structure is intact: the signature verdict says it loads
    assert deep is expected, deep_words  # the deep check says what DeepLabCut says


@pytest.mark.parametrize("release", ["rc2", "rc5", "rc6"])
def test_the_default_verdict_is_deeplabcuts_on_the_vintage_snapshots_and_their_mutations(
    release: str, tmp_path: Path, seeded_torch_hub: Path
):
    """What the pre-releases really saved (their torch's _metadata, rc2's numpy-1 metrics kept as they are, rc5 and
    rc6's optimizer state), migrated by the tool, then judged as saved and altered, by DeepLabCut and by the tool."""
    from test_vintage import unpacked

    project = unpacked(release, tmp_path / "vintage")
    migrated = migrate_project(project, options=MigrationOptions(fix_metadata=False, check_model=False))
    assert {r.status for r in migrated.results} <= {Status.FIXED, Status.CLEAN}, [
        r.describe() for r in migrated.results
    ]
    disagreements, judged = [], 0
    for path in sorted(project.rglob("snapshot-*.pt")):
        config, detector = path.parent / "pytorch_config.yaml", "detector" in path.name
        saved = path.read_bytes()
        cases: dict[str, dict | None] = {"as migrated": None}
        base = clean_snapshot(path)
        cases.update((name, mutate(base)) for name, mutate in MUTATIONS.items() if name != "clean")
        for name, snapshot in cases.items():
            if name != "as migrated":
                if snapshot is None:
                    continue
                torch.save(snapshot, path)
            expected = deeplabcut_loads(path, config, detector)
            said, words = tool_says_loads(project, path)
            judged += 1
            if said != expected:
                disagreements.append(
                    f"{path.name}, {name}: DeepLabCut {'loads' if expected else 'refuses'}; the tool said: {words}"
                )
            path.write_bytes(saved)
    assert judged >= 18 and not disagreements, "\n".join(disagreements)
