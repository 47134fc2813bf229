"""Pure key logic: find and strip the prefixes that model wrappers put on state-dict keys.

No I/O here. A wrapper prefix is stripped only when it leads *every* key, only at the
start of a key, and repeatedly for stacked wrappers (``module._orig_mod.`` and the
like), so ``channel_attention_module.weight`` or a detector's own leading ``model.``
are never touched. ``state_dict._metadata`` (per-module version info that
``load_state_dict`` passes to ``_load_from_state_dict``) is renamed the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
"""``module.``: ``torch.nn.DataParallel`` and ``DistributedDataParallel``; ``_orig_mod.``: ``torch.compile``."""


class KeyCollisionError(ValueError):
    """Stripping a prefix would give two entries the same key; nothing is changed."""

    def __init__(self, prefix: str, collisions: list[str]):
        self.prefix = prefix
        self.collisions = collisions
        shown = ", ".join(repr(key) for key in collisions[:5])
        super().__init__(f"stripping {prefix!r} would make keys collide ({len(collisions)}: {shown})")


def leading_wrapper_prefix(keys: Iterable[str]) -> str | None:
    """The wrapper prefix that starts every key (with something after it), if there is one."""
    keys = list(keys)
    if not keys:
        return None
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) and len(key) > len(prefix) for key in keys):
            return prefix
    return None


def find_wrapper_prefixes(keys: Iterable[str]) -> tuple[str, ...]:
    """The stack of wrapper prefixes on every key, outermost first (empty when the keys are clean)."""
    keys = list(keys)
    found: list[str] = []
    while (prefix := leading_wrapper_prefix(keys)) is not None:
        found.append(prefix)
        keys = [key[len(prefix) :] for key in keys]
    return tuple(found)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """A new state dict with ``prefix`` removed from the start of the keys that have it.

    The values are the same objects (no tensor is copied) and the order is kept.
    Raises :class:`KeyCollisionError` when a stripped key equals another key.
    """
    renamed = [(key[len(prefix) :] if key.startswith(prefix) else key, key) for key in state_dict]
    seen: dict[str, str] = {}
    collisions = []
    for new_key, old_key in renamed:
        if new_key in seen:
            collisions.append(f"{seen[new_key]} / {old_key}")
        seen[new_key] = old_key
    if collisions:
        raise KeyCollisionError(prefix, collisions)
    stripped: OrderedDict[str, Any] = OrderedDict((new_key, state_dict[old_key]) for new_key, old_key in renamed)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        stripped._metadata = strip_metadata_prefix(metadata, prefix)  # type: ignore[attr-defined]
    return stripped


def strip_metadata_prefix(metadata: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """Rename ``_metadata`` module paths as torch's ``consume_prefix_in_state_dict_if_present`` does.

    Its keys are module paths without the trailing dot: ``""`` is the wrapper itself,
    ``"module"`` the wrapped model (which becomes the new root ``""``), and
    ``"module.backbone"`` a submodule.
    """
    bare = prefix.rstrip(".")
    renamed: OrderedDict[str, Any] = OrderedDict()
    for key, value in metadata.items():
        if key == bare:
            renamed[""] = value
        elif key.startswith(prefix):
            renamed[key[len(prefix) :]] = value
        elif key == "" and bare in metadata:
            continue  # the wrapper's own entry; the wrapped model's entry replaces it
        else:
            renamed[key] = value
    return renamed


def strip_wrapper_prefixes(
    state_dict: Mapping[str, Any],
) -> tuple[OrderedDict[str, Any], tuple[str, ...]]:
    """Strip every wrapper prefix that leads all keys; return the new dict and what was stripped."""
    prefixes = find_wrapper_prefixes(state_dict.keys())
    stripped: Mapping[str, Any] = state_dict
    for prefix in prefixes:
        stripped = strip_prefix(stripped, prefix)
    if not prefixes:
        stripped = OrderedDict(state_dict)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            stripped._metadata = metadata  # type: ignore[attr-defined]
    return stripped, prefixes  # type: ignore[return-value]


def partially_prefixed(keys: Iterable[str]) -> dict[str, int]:
    """Wrapper prefixes that start some keys but not all: a sign of a hand-edited state dict."""
    keys = list(keys)
    counts = {p: sum(key.startswith(p) for key in keys) for p in WRAPPER_PREFIXES}
    return {p: n for p, n in counts.items() if 0 < n < len(keys)}


def group_by_module(keys: Iterable[str], depth: int = 3) -> dict[str, int]:
    """Count keys per module path (their first ``depth`` dotted parts), so a report stays short."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        module = ".".join(parts[: min(depth, max(len(parts) - 1, 1))])
        groups[module] = groups.get(module, 0) + 1
    return groups


def shape_changes(changes: Iterable[tuple[str, Any, Any]], shown: int = 2) -> str:
    """``key (1, 2, 192) in the snapshot, (1, 3, 192) in the model`` for the first few, and how many more."""
    changes = list(changes)
    text = "; ".join(
        f"{key} {tuple(have)} in the snapshot, {tuple(want)} in the model" for key, have, want in changes[:shown]
    )
    return text + (f"; {len(changes) - shown} more" if len(changes) > shown else "")


def resized_by_a_count(changes: Iterable[tuple[str, Any, Any]], configured: int | None = None) -> bool:
    """Whether every shape change is one count becoming another (the bodypart count), and nothing else.

    AnimalTokenPose's keypoint tokens and CTD's conditioning layers have a dimension per
    bodypart: reused for another bodypart set, each differs only where N became M, the same
    N and M everywhere (M the model's bodypart count where its config says). Another width of
    the same family (HRNet-w32 against w48) changes many sizes, so it is not taken for this.
    """
    pairs = set()
    for _, have, want in changes:
        if len(have) != len(want):
            return False
        pairs |= {(h, w) for h, w in zip(have, want, strict=True) if h != w}
    if len(pairs) != 1:
        return False
    _, want = next(iter(pairs))
    return configured is None or want == configured
