"""YAML read as DeepLabCut reads it, at libyaml's speed.

DeepLabCut 3.0.x reads ``pytorch_config.yaml`` (and 3.0.2 ``config.yaml`` too) with
``ruamel.yaml.YAML(typ="safe", pure=True)``: YAML 1.2, where ``1e-05`` is a float and
``yes``/``on`` are strings, and where a duplicated key is an error. PyYAML reads YAML 1.1
(``1e-05`` a string, ``yes`` true, the last duplicate wins), and its own model configs
carry ``lr: 1e-05``. So PyYAML's answer is not DeepLabCut's.

ruamel's pure-Python reader costs ~20 ms per ``pytorch_config.yaml``; libyaml ~2 ms. Here
libyaml parses, with ruamel's YAML 1.2 resolution rules, and builds only what both would
build the same way (strings, ``true``/``false``, ``null``, plain decimal integers, floats
without ``_``). Anything else (octal, ``_`` separators, ``.inf``, timestamps, merge keys,
duplicate keys, tags, anchors, block scalars, directives, a tab anywhere, a parse error)
makes ruamel itself read the file: its value, or its error, is the answer. Without ruamel
(no DeepLabCut here to judge) PyYAML's safe loader answers.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar

INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"
BOOL = "tag:yaml.org,2002:bool"
NULL = "tag:yaml.org,2002:null"
MERGE = "tag:yaml.org,2002:merge"

YAML_1_2_RESOLVERS: tuple[tuple[str, str, str], ...] = (
    (BOOL, r"""^(?:true|True|TRUE|false|False|FALSE)$""", "tTfF"),
    (
        FLOAT,
        r"""^(?:
         [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        "-+0123456789.",
    ),
    (
        INT,
        r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0o?[0-7_]+
        |[-+]?[0-9_]+
        |[-+]?0x[0-9a-fA-F_]+)$""",
        "-+0123456789",
    ),
    (MERGE, r"^(?:<<)$", "<"),
    (
        NULL,
        r"""^(?: ~
        |null|Null|NULL
        | )$""",
        "~nN ",
    ),
    (
        "tag:yaml.org,2002:timestamp",
        r"""^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
        |[0-9][0-9][0-9][0-9] -[0-9][0-9]? -[0-9][0-9]?
        (?:[Tt]|[ \t]+)[0-9][0-9]?
        :[0-9][0-9] :[0-9][0-9] (?:\.[0-9]*)?
        (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$""",
        "0123456789",
    ),
    ("tag:yaml.org,2002:value", r"^(?:=)$", "="),
)
"""ruamel.yaml's implicit resolvers for YAML 1.2, in its order (a test compares them with ruamel's own).

In ``first``, a space stands for the empty scalar (ruamel lists ``''``)."""

UNUSUAL_CHARACTERS = re.compile("[\t\x85\u2028\u2029\ufeff]")
PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
PLAIN_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


class YamlError(Exception):
    """DeepLabCut's reader refuses the text; the message is its own."""


class _Ambiguous(Exception):
    """Something YAML 1.1 and 1.2 (or PyYAML and ruamel) may build differently: ask ruamel."""


def load(text: str) -> Any:
    """The document in ``text`` as DeepLabCut's YAML reader builds it; raises YamlError where it refuses."""
    if (loader := _libyaml_loader()) is not None:
        import yaml

        try:
            _require_plain_syntax(text, loader)
            return yaml.load(text, Loader=loader)
        except Exception:  # _Ambiguous, a YAMLError, or anything odd (a 5,000-digit int): ruamel decides
            pass
    return _load_as_deeplabcut(text)


def _require_plain_syntax(text: str, loader: Any) -> None:
    """Refuse what libyaml's and ruamel's scanners read differently (each case found by a fuzzer).

    Anchors, aliases, tags, directives, block scalars, ``?`` keys; a ``:`` followed by no space inside
    ``[...]``/``{...}``; tabs and the line breaks YAML 1.1 has beyond ``\\n`` and ``\\r``.
    """
    import yaml

    if UNUSUAL_CHARACTERS.search(text):
        raise _Ambiguous("tab or unusual line break")
    flow_level = 0
    for token in yaml.scan(text, Loader=loader):
        if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken)):
            flow_level += 1
        elif isinstance(token, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)):
            flow_level -= 1
        elif isinstance(token, (yaml.AnchorToken, yaml.AliasToken, yaml.TagToken, yaml.DirectiveToken)):
            raise _Ambiguous(type(token).__name__)
        elif isinstance(token, yaml.ScalarToken) and token.style in ("|", ">"):
            raise _Ambiguous("block scalar")
        elif isinstance(token, yaml.KeyToken) and text[token.start_mark.index : token.start_mark.index + 1] == "?":
            raise _Ambiguous("explicit key")
        elif (
            isinstance(token, yaml.ValueToken)
            and flow_level
            and text[token.end_mark.index : token.end_mark.index + 1] not in ("", " ", "\n", "\r")
        ):
            raise _Ambiguous("':' followed by no space in a flow collection")


def _load_as_deeplabcut(text: str) -> Any:
    try:
        from ruamel.yaml import YAML
    except ImportError:  # no DeepLabCut to judge: PyYAML answers
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise YamlError(str(error)) from error
    try:
        return YAML(typ="safe", pure=True).load(text)
    except Exception as error:  # any refusal by the reader is the file's problem, never a crash of the run
        raise YamlError(str(error) or type(error).__name__) from error


@functools.cache
def _libyaml_loader() -> Any:
    """PyYAML's libyaml loader with YAML 1.2 resolution, building only the unambiguous; None without libyaml."""
    import yaml

    base: Any = getattr(yaml, "CSafeLoader", None)
    if base is None:
        return None

    class Yaml12Loader(base):  # type: ignore[misc, valid-type]
        yaml_implicit_resolvers: ClassVar[dict] = {}  # ruamel's, set below
        yaml_constructors: ClassVar[dict] = {
            "tag:yaml.org,2002:str": base.construct_yaml_str,
            "tag:yaml.org,2002:seq": base.construct_yaml_seq,
            "tag:yaml.org,2002:map": base.construct_yaml_map,
            BOOL: lambda _, node: {"true": True, "false": False}[_plain(node, ("true", "false"))],
            NULL: _construct_null,
            INT: lambda _, node: int(_plain_matching(node, PLAIN_INT)),
            FLOAT: _construct_float,
            None: _refuse,  # every other tag, explicit or implicit
        }

        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            if any(key.tag == MERGE for key, _ in node.value):
                raise _Ambiguous("merge key")
            mapping = super().construct_mapping(node, deep=deep)
            if len(mapping) != len(node.value):
                raise _Ambiguous("duplicate key")  # ruamel refuses it, PyYAML keeps the last
            return mapping

    for tag, pattern, first in YAML_1_2_RESOLVERS:
        starts = ["" if char == " " else char for char in first]
        Yaml12Loader.add_implicit_resolver(tag, re.compile(pattern, re.VERBOSE), starts)
    return Yaml12Loader


def _plain(node: Any, lowered: tuple[str, ...]) -> str:
    value = node.value.lower()
    if value not in lowered:
        raise _Ambiguous(node.value)
    return value


def _plain_matching(node: Any, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(node.value):
        raise _Ambiguous(node.value)
    return node.value


def _construct_null(_: Any, node: Any) -> None:
    _plain(node, ("~", "null", ""))


def _construct_float(_: Any, node: Any) -> float:
    value = node.value
    if not PLAIN_FLOAT.fullmatch(value):
        raise _Ambiguous(value)  # separators, .inf, .nan, an explicit !!float: ruamel builds those its own way
    return float(value)


def _refuse(_: Any, node: Any) -> Any:
    raise _Ambiguous(node.tag)
