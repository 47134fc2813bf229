"""YAML is read as DeepLabCut's reader (ruamel.yaml, safe, pure, YAML 1.2) builds it, value and type alike."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dlc_snapshot_fix import dlcyaml

ruamel = pytest.importorskip("ruamel.yaml")


def deeplabcuts_reader(text: str):
    return ruamel.YAML(typ="safe", pure=True).load(text)


def typed(value):
    """``value`` with every scalar's type spelled out (``True == 1`` and ``1 == 1.0`` must not pass)."""
    if isinstance(value, dict):
        return ("map", sorted((repr(typed(k)), typed(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("seq", [typed(v) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def outcome(read, text: str):
    try:
        return "read", typed(read(text))
    except Exception:  # what a refusal says is compared elsewhere; here only that both refuse
        return "refused", None


def yaml_files() -> list[Path]:
    """Every YAML file at hand: the sample project's, and DeepLabCut's own model configs where it is installed."""
    files = sorted(Path(__file__).parents[1].joinpath("sample_project").rglob("*.yaml"))
    spec = importlib.util.find_spec("deeplabcut")
    if spec is not None and spec.origin:
        files += sorted(Path(spec.origin).parent.rglob("*.yaml"))
    return files


def test_the_resolution_rules_are_ruamels_own_for_yaml_1_2():
    from ruamel.yaml.resolver import implicit_resolvers

    theirs = [
        (tag, regexp.pattern, "".join(" " if c == "" else c for c in first))
        for versions, tag, regexp, first in implicit_resolvers
        if (1, 2) in versions and tag != "tag:yaml.org,2002:yaml"  # ruamel: "for documentation purposes", inert
    ]
    assert [(tag, pattern, first) for tag, pattern, first in dlcyaml.YAML_1_2_RESOLVERS] == theirs


def test_every_yaml_file_at_hand_reads_as_deeplabcut_reads_it_without_asking_ruamel(monkeypatch):
    """DeepLabCut's own configs (``lr: 1e-05`` among them) take the fast path and come out as ruamel builds them."""
    files = yaml_files()
    assert len(files) >= 4
    expected = {path: typed(deeplabcuts_reader(path.read_text(encoding="utf-8"))) for path in files}

    def no_fallback(text: str):
        raise AssertionError("the libyaml path gave up on a file DeepLabCut wrote")

    monkeypatch.setattr(dlcyaml, "_load_as_deeplabcut", no_fallback)
    for path in files:
        assert typed(dlcyaml.load(path.read_text(encoding="utf-8"))) == expected[path], path


@pytest.mark.deeplabcut
def test_pytorch_configs_read_as_deeplabcuts_read_config_as_dict(tmp_path: Path):
    """The judge itself: DeepLabCut's ``read_config_as_dict`` on the sample project and on odd hand edits."""
    from deeplabcut.pose_estimation_pytorch.config import read_config_as_dict

    odd = tmp_path / "pytorch_config.yaml"
    odd.write_text("runner:\n  snapshot_prefix: no\n  lr: 1e-05\nmodel: {eps: 1_000, when: 2024-01-02, ratio: .inf}\n")
    for path in [*Path(__file__).parents[1].joinpath("sample_project").rglob("pytorch_config.yaml"), odd]:
        assert typed(dlcyaml.load(path.read_text(encoding="utf-8"))) == typed(read_config_as_dict(path)), path


SCALAR_ALPHABET = "0123456789+-._eEoxXbB:yYnNtTrRuUfFaAlLsS~ =<!&*%@'\"[]{},#|>\\?/\t\né\x85\u2028\ufeff"
scalars = st.text(alphabet=SCALAR_ALPHABET, max_size=10)
QUOTED_ALPHABET = "\\\"'xuUN_LP0abtnvfre 0123456789ABCDEF#:/,[]{}\né\x85\u2028\t"
quoted = st.builds(
    lambda quote, body: f"{quote}{body}{quote}",
    st.sampled_from(['"', "'", ""]),
    st.text(alphabet=QUOTED_ALPHABET, max_size=10),
)


@settings(max_examples=600, deadline=None)
@given(values=st.lists(scalars, min_size=1, max_size=4), keys=st.lists(scalars, min_size=1, max_size=4))
@example(values=["1e-05", "yes", "017", "1_000", ".inf", "2024-01-02"], keys=["a", "b", "c", "d", "e", "f"])
@example(values=["1", "2"], keys=["a", "a"])  # a duplicated key: ruamel refuses, PyYAML keeps the last
@example(values=["{a: 1}"], keys=["<<"])  # a merge key
@example(values=["!!float 3", "!!int 0x1F", "!!bool yes", "!!str 1"], keys=["a", "b", "c", "d"])
@example(values=[""], keys=["0\t"])  # a tab: ruamel's scanner refuses it where libyaml reads it
@example(values=["", "x"], keys=["b7", "&X"])  # an anchor
@example(values=["R~\n- |#"], keys=["a"])  # a block scalar
def test_any_block_mapping_of_odd_scalars_reads_as_ruamel_reads_it(values: list[str], keys: list[str]):
    text = "".join(f"{k}: {v}\n" for k, v in zip(keys, values, strict=False))  # the shorter list decides
    assert outcome(dlcyaml.load, text) == outcome(deeplabcuts_reader, text)


@settings(max_examples=400, deadline=None)
@given(values=st.lists(st.one_of(scalars, quoted), min_size=1, max_size=6))
@example(values=['"eA{":ba_c"'])  # a ':' right after a quoted scalar in a flow collection
@example(values=["'N0' :N1AU'"])
@example(values=["u", "?", "", ""])  # an explicit-key indicator
def test_any_flow_sequence_of_odd_scalars_reads_as_ruamel_reads_it(values: list[str]):
    text = "v: [" + ", ".join(values) + "]\n"
    assert outcome(dlcyaml.load, text) == outcome(deeplabcuts_reader, text)


@settings(max_examples=400, deadline=None)
@given(pairs=st.lists(st.tuples(quoted, quoted), min_size=1, max_size=3), nested=st.booleans())
@example(pairs=[("'C3b\\'", "v\u202860F2v")], nested=False)  # YAML 1.1's extra line breaks
def test_any_mapping_of_quoted_scalars_reads_as_ruamel_reads_it(pairs: list[tuple[str, str]], nested: bool):
    indent = "  " if nested else ""
    text = ("k:\n" if nested else "") + "".join(f"{indent}{k}: {v}\n" for k, v in pairs)
    assert outcome(dlcyaml.load, text) == outcome(deeplabcuts_reader, text)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: 1\nb: [1, 2\n", "expected ',' or ']', but got '<stream end>'"),
        ("a: 1\na: 2\n", 'found duplicate key "a"'),
        ("a: " + "9" * 5000 + "\n", "Exceeds the limit"),  # Python's int() refuses it, in either reader
    ],
)
def test_a_refusal_is_deeplabcuts_readers_own_words(text: str, words: str):
    with pytest.raises(dlcyaml.YamlError, match=words):
        dlcyaml.load(text)
    with pytest.raises(Exception, match=words):
        deeplabcuts_reader(text)
