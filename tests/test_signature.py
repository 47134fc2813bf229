"""The signature verdict is torch's strict load, replayed: held against the real ``load_state_dict`` (torch only).

Each model holds one of the loading rules the replay knows (BatchNorm's version-dependent
``num_batches_tracked``, FrozenBatchNorm2d dropping it, the renames of torchvision's FPN
and RPN head), and hypothesis alters its state dict the ways a snapshot can differ from
its model. Whatever torch reports (missing, unexpected, another error, an exception out of
the load), the replay must report the same. DeepLabCut's own models are the differential
test's (``tests/test_signature_deeplabcut.py``).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlc_snapshot_fix import signature

torchvision = pytest.importorskip("torchvision")


class Zoo(torch.nn.Module):
    """One module of each rule, nested and shared as real models are."""

    def __init__(self) -> None:
        super().__init__()
        shared = torch.nn.Conv2d(3, 3, 1)
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        self.frozen = torchvision.ops.misc.FrozenBatchNorm2d(4)
        self.untracked = torch.nn.BatchNorm1d(2, track_running_stats=False)
        self.fpn = torchvision.ops.FeaturePyramidNetwork([4, 8], 4)
        self.rpn = torchvision.models.detection.rpn.RPNHead(4, 3)
        self.heads = torch.nn.ModuleDict({"a": shared, "b": shared, "gone": None})
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def real_load(model: torch.nn.Module, state_dict: OrderedDict) -> tuple[set[str], set[str], bool, bool]:
    """(missing, unexpected, another error, an exception out of the load) as torch reports them."""
    target = copy.deepcopy(model)
    try:
        outcome = target.load_state_dict(state_dict, strict=False)  # the same checks; keys returned, not raised
    except RuntimeError:
        try:  # the other errors are raised: missing and unexpected from a load that skips their cause
            return (*_keys_despite_errors(target, state_dict), True, False)
        except Exception:
            return set(), set(), True, False
    except Exception:
        return set(), set(), False, True
    return set(outcome.missing_keys), set(outcome.unexpected_keys), False, False


def _keys_despite_errors(model: torch.nn.Module, state_dict: OrderedDict) -> tuple[set[str], set[str]]:
    """Missing and unexpected keys torch finds when other errors are also there (it reports all of them at once)."""
    missing: list[str] = []
    unexpected: list[str] = []
    metadata = getattr(state_dict, "_metadata", None)

    def visit(module: torch.nn.Module, local: dict, prefix: str = "") -> None:
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        module._load_from_state_dict(local, prefix, local_metadata, True, missing, unexpected, [])
        for name, child in module._modules.items():
            if child is not None:
                visit(child, {k: v for k, v in local.items() if k.startswith(f"{prefix}{name}.")}, f"{prefix}{name}.")

    with torch.no_grad():
        visit(model, OrderedDict(state_dict))
    return set(missing), set(unexpected)


def replayed(model: torch.nn.Module, state_dict: OrderedDict) -> tuple[set[str], set[str], bool, bool]:
    load = signature.strict_load_problems(json.loads(json.dumps(signature.describe(model))), state_dict)
    if load.crash is not None:  # torch raises out of the load: nothing else is reported
        return set(), set(), False, True
    return set(load.missing), set(load.unexpected), bool(load.shape_mismatches or load.errors), load.crash is not None


MODEL = Zoo()
CLEAN = MODEL.state_dict()


def test_a_clean_state_dict_loads_in_both():
    assert real_load(MODEL, CLEAN) == replayed(MODEL, CLEAN) == (set(), set(), False, False)


MUTATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(list(CLEAN))),
        st.tuples(
            st.just("add"),
            st.sampled_from(
                [
                    "backbone.9.weight",
                    "frozen.num_batches_tracked",
                    "untracked.running_mean",
                    "fpn.inner_blocks.0.weight",
                    "fpn.layer_blocks.1.bias",
                    "rpn.conv.weight",
                    "heads.gone.weight",
                    "heads.a.extra",
                    "scratch",
                    "_extra_state",
                    "backbone._extra_state",
                    "unknown",
                    "",
                ]
            ),
        ),
        st.tuples(st.just("rename_old"), st.sampled_from(["fpn", "rpn"])),
        st.tuples(st.just("reshape"), st.sampled_from(list(CLEAN))),
        st.tuples(st.just("scalar_as"), st.sampled_from([[1], [2], [0], [1, 1]])),
        st.tuples(st.just("dtype"), st.sampled_from(list(CLEAN))),
        st.tuples(st.just("not_a_tensor"), st.sampled_from(list(CLEAN))),
        st.tuples(st.just("metadata"), st.sampled_from(["none", "v1", "v2", "odd"])),
    ),
    max_size=4,
)


OLD_NAMES = {"fpn": re.compile(r"^(fpn\.(?:inner|layer)_blocks\.\d+)\.0\."), "rpn": re.compile(r"^(rpn\.conv)\.0\.0\.")}


def mutate(mutations: list[tuple[str, object]]) -> OrderedDict:
    state = OrderedDict((k, v.clone()) for k, v in CLEAN.items())
    metadata = copy.deepcopy(CLEAN._metadata)
    for kind, what in mutations:
        if kind == "drop":
            state.pop(what, None)
        elif kind == "add":
            state[what] = torch.zeros(4)
        elif kind == "rename_old":  # the version-1 names torchvision still reads
            for key in [k for k in state if k.startswith(f"{what}.")]:
                state[OLD_NAMES[what].sub(r"\1.", key)] = state.pop(key)
            if metadata is not None:
                metadata[what] = {"version": 1}
        elif kind == "reshape" and isinstance(state.get(what), torch.Tensor):
            state[what] = torch.zeros(*state[what].shape, 1)
        elif kind == "scalar_as":
            state["scale"] = torch.zeros(what)
        elif kind == "dtype" and isinstance(state.get(what), torch.Tensor):
            state[what] = state[what].to(torch.float64 if state[what].is_floating_point() else torch.int32)
        elif kind == "not_a_tensor" and what in state:
            state[what] = 1.5
        elif kind == "metadata" and metadata is not None:
            if what == "none":
                metadata = None
            elif what == "odd":
                metadata["backbone.1"] = {"version": "two"}
            else:
                for name, entry in metadata.items():
                    if "version" in entry:
                        metadata[name] = {**entry, "version": 1 if what == "v1" else 2}
    if metadata is not None:
        state._metadata = metadata
    return state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MUTATIONS)
def test_any_altered_state_dict_is_judged_as_torch_judges_it(mutations):
    state = mutate(mutations)
    assert replayed(MODEL, state) == real_load(MODEL, state)


@pytest.mark.parametrize("mutations", [[("metadata", "none"), ("drop", "backbone.1.num_batches_tracked")]])
def test_batchnorm_without_metadata_loads_without_num_batches_tracked(mutations):
    """The case a signature of names alone gets wrong: torch fills the buffer in for a pre-version-2 state dict."""
    state = mutate(mutations)
    assert replayed(MODEL, state) == real_load(MODEL, state) == (set(), set(), False, False)


def test_tensor_records_are_judged_like_the_tensors_they_record(tmp_path: Path):
    """What the torch-free reader gives (records, _metadata) is what the replay judges, not loaded tensors."""
    from dlc_snapshot_fix.reading import read_recorded

    state = mutate([("dtype", "backbone.0.weight"), ("drop", "frozen.bias")])
    path = tmp_path / "snapshot-001.pt"
    torch.save({"model": state, "metadata": {"epoch": 1}}, path)
    records = read_recorded(path).snapshot["model"]
    assert replayed(MODEL, records) == real_load(MODEL, state) == ({"frozen.bias"}, set(), False, False)


def test_what_the_replay_does_not_know_is_never_judged_by_it():
    for model in (torch.nn.InstanceNorm2d(3, track_running_stats=True), torch.nn.LazyLinear(2)):
        with pytest.raises(signature.NotDescribable):
            signature.describe(model)
    hooked = torch.nn.Linear(2, 2)
    hooked.register_load_state_dict_post_hook(lambda module, keys: None)
    with pytest.raises(signature.NotDescribable, match="hooks"):
        signature.describe(hooked)


def test_the_probe_measures_this_torch():
    """torch 2.6 copies any non-empty 1-d tensor into a scalar (its first element); 2.14 only a 1-element one."""
    edges = signature.probe(["float32", "int64"])
    module = torch.nn.Module()
    module.register_buffer("value", torch.zeros(()))
    try:
        module.load_state_dict({"value": torch.zeros(2)})
        any_length = True
    except RuntimeError:
        any_length = False
    assert edges["legacy_scalar"] == ("any" if any_length else "one")
    assert set(edges["refused_casts"]) == {"float32", "int64"}


def test_the_cache_keeps_what_it_is_given_and_ignores_what_it_did_not_write(tmp_path: Path):
    cache = signature.SignatureCache(tmp_path / "signatures")
    kept = signature.describe(Zoo())
    key = signature.cache_key("pose", {"backbone": {"type": "ResNet"}})
    assert cache.get(key) is None
    cache.put(key, kept)
    assert cache.get(key) == json.loads(json.dumps(kept))
    assert [p.name for p in cache.folder.iterdir()] == [f"{key}.json"]  # no temp file left
    cache.path(key).write_text(cache.path(key).read_text()[:-20])  # cut short
    assert cache.get(key) is None
    damaged = json.loads(json.dumps(kept))
    damaged["modules"][0][2] = [["weight", "float32", [-1]]]
    cache.path(key).write_text(json.dumps({"key": key, "signature": damaged}))
    assert cache.get(key) is None
    cache.path(key).write_text(json.dumps({"key": "another", "signature": kept}))
    assert cache.get(key) is None


def test_the_key_changes_with_every_version_and_the_model_section(monkeypatch):
    base = signature.cache_key("pose", {"a": 1, "b": [1, 2]})
    assert base == signature.cache_key("pose", {"b": [1, 2], "a": 1})  # canonical: order does not matter
    assert base != signature.cache_key("detector", {"a": 1, "b": [1, 2]})
    assert base != signature.cache_key("pose", {"a": 1, "b": [1, 3]})
    for package in signature.PACKAGES:
        real = signature.versions()
        monkeypatch.setattr(signature, "versions", lambda real=real, package=package: {**real, package: "0.0.0"})
        assert signature.cache_key("pose", {"a": 1, "b": [1, 2]}) != base
        monkeypatch.undo()


def test_the_cache_folder_honours_xdg_cache_home(monkeypatch, tmp_path: Path):
    if not sys.platform.startswith("linux"):
        pytest.skip("XDG_CACHE_HOME is the Linux convention; platformdirs uses LOCALAPPDATA and ~/Library/Caches")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert signature.default_cache_folder() == tmp_path / "dlc-snapshot-fix" / "signatures"
