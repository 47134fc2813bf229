"""The pure key logic: unit tests on the cases users hit, property tests on the rules."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import TinyPose, wrapped_state_dict
from hypothesis import assume, given
from hypothesis import strategies as st

from dlc_snapshot_fix import keys

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
key = st.lists(st.one_of(segment, st.sampled_from(["module", "_orig_mod", "model"])), min_size=1, max_size=5).map(
    ".".join
)
key_sets = st.lists(key, min_size=1, max_size=12, unique=True)
wrapper_stacks = st.lists(st.sampled_from(keys.WRAPPER_PREFIXES), max_size=4)


def as_state_dict(names: list[str]) -> OrderedDict:
    return OrderedDict((name, torch.tensor([float(i)])) for i, name in enumerate(names))


@given(key_sets, wrapper_stacks)
def test_stripping_undoes_any_stack_of_wrappers(clean_keys, stack):
    assume(keys.find_wrapper_prefixes(clean_keys) == ())
    clean = as_state_dict(clean_keys)
    wrapped = OrderedDict(("".join(stack) + k, v) for k, v in clean.items())
    stripped, prefixes = keys.strip_wrapper_prefixes(wrapped)
    assert prefixes == tuple(stack)
    assert list(stripped) == clean_keys
    assert all(stripped[k] is clean[k] for k in clean_keys)  # no tensor copied


@given(key_sets)
def test_stripping_is_idempotent(names):
    once, _ = keys.strip_wrapper_prefixes(as_state_dict(names))
    twice, prefixes = keys.strip_wrapper_prefixes(once)
    assert prefixes == ()
    assert list(twice) == list(once)


@given(key_sets, st.sampled_from(keys.WRAPPER_PREFIXES))
def test_keys_without_the_prefix_at_their_start_never_change(names, prefix):
    assume(len({n[len(prefix) :] if n.startswith(prefix) else n for n in names}) == len(names))
    stripped = keys.strip_prefix(as_state_dict(names), prefix)
    for old, new in zip(names, stripped, strict=True):
        assert new == (old[len(prefix) :] if old.startswith(prefix) else old)


@given(key_sets, st.sampled_from(keys.WRAPPER_PREFIXES))
def test_a_prefix_missing_from_some_keys_is_not_stripped(names, prefix):
    mixed = [*names, prefix + names[0]]
    assume(len(set(mixed)) == len(mixed))
    assume(not all(n.startswith(prefix) for n in mixed))
    stripped, prefixes = keys.strip_wrapper_prefixes(as_state_dict(mixed))
    assert prefix not in prefixes
    if not prefixes:
        assert list(stripped) == mixed


@given(key_sets, st.sampled_from(keys.WRAPPER_PREFIXES))
def test_collisions_are_refused(names, prefix):
    colliding = as_state_dict([*names, *(prefix + n for n in names if not n.startswith(prefix))])
    assume(len(colliding) > len(names))
    with pytest.raises(keys.KeyCollisionError) as refused:
        keys.strip_prefix(colliding, prefix)
    assert refused.value.collisions


def test_str_replace_victims_are_untouched():
    names = ["module.backbone.channel_attention_module.weight", "module.backbone.position_attention_module.bias"]
    stripped, prefixes = keys.strip_wrapper_prefixes(as_state_dict(names))
    assert prefixes == ("module.",)
    assert list(stripped) == ["backbone.channel_attention_module.weight", "backbone.position_attention_module.bias"]
    # the popular fix corrupts exactly these keys:
    assert names[0].replace("module.", "") == "backbone.channel_attention_weight"


def test_a_detectors_own_model_prefix_stays():
    names = ["model.backbone.body.conv1.weight", "model.rpn.head.conv.0.0.weight"]
    for wrapped in (names, ["module." + n for n in names]):
        stripped, _ = keys.strip_wrapper_prefixes(as_state_dict(wrapped))
        assert list(stripped) == names


@pytest.mark.parametrize("stack", [("dp",), ("compile",), ("dp", "compile"), ("compile", "dp"), ("dp", "dp")])
def test_metadata_matches_the_unwrapped_models(stack):
    model = TinyPose()
    stripped, prefixes = keys.strip_wrapper_prefixes(wrapped_state_dict(model, *stack))
    clean = model.state_dict()
    assert len(prefixes) == len(stack)
    assert list(stripped) == list(clean)
    assert stripped._metadata == clean._metadata
    TinyPose().load_state_dict(stripped, strict=True)


def test_a_key_that_is_only_the_prefix_is_not_a_wrapper():
    assert keys.find_wrapper_prefixes(["module.", "module.a"]) == ()
    assert keys.find_wrapper_prefixes([]) == ()


def test_group_by_module_counts_per_module():
    groups = keys.group_by_module(["backbone.model.layer4.0.w", "backbone.model.layer4.1.w", "heads.x.w", "bias"])
    assert groups == {"backbone.model.layer4": 2, "heads.x": 1, "bias": 1}
