"""Transformations of a loaded snapshot: pure functions, no I/O, gathered in one place.

Each transformation takes a snapshot dict and returns a new one plus a description of
what it changed, leaving its input untouched; tensors are shared, never copied. To add
one: write a function here, say in its docstring which DeepLabCut version or training
setup produced the problem, and give it unit tests on a dict built in memory.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from dlc_snapshot_fix import keys
from dlc_snapshot_fix.pickled import TensorRecord


def is_loaded_tensor(value: Any) -> bool:
    """A ``torch.Tensor``, asked without importing torch: where torch is not loaded, no tensor exists."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_tensor(value: Any) -> bool:
    """What a state dict value may be: a loaded tensor, or one recorded from the pickle (fast path)."""
    return isinstance(value, TensorRecord) or is_loaded_tensor(value)


def _numpy_scalar_types() -> tuple[type, ...]:
    """numpy's scalar base class, if numpy is loaded (a numpy scalar cannot exist otherwise); else nothing."""
    numpy = sys.modules.get("numpy")
    return (numpy.generic,) if numpy is not None else ()


class SnapshotFormatError(ValueError):
    """The snapshot dict is not shaped like a DeepLabCut snapshot; nothing is changed."""


MAX_NESTING = 64
"""Deepest container nesting accepted; DeepLabCut's snapshots nest four levels (metadata → metrics → value)."""


def check_nesting(snapshot: Any, limit: int = MAX_NESTING) -> None:
    """Refuse containers nested deeper than ``limit`` before anything recursive walks them.

    Iterative, so a pickle nested tens of thousands of levels deep is refused with a
    reason instead of ending the run in a ``RecursionError``.
    """
    stack: list[tuple[Any, int]] = [(snapshot, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth >= limit:
                raise SnapshotFormatError(
                    f"containers nested more than {limit} levels deep; DeepLabCut never writes that, "
                    "so this is not a snapshot DeepLabCut made"
                )
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


@dataclass(frozen=True)
class StrippedEntry:
    """Wrapper prefixes removed from one state dict of a snapshot (``model``, ``pose`` or ``detector``)."""

    entry: str
    prefixes: tuple[str, ...]
    key_count: int


def state_dict_of(snapshot: Mapping[str, Any], entry: str) -> Mapping[str, Any]:
    """The state dict under ``entry``, checked to be a mapping of names to tensors."""
    state_dict = snapshot[entry]
    if not isinstance(state_dict, Mapping):
        raise SnapshotFormatError(
            f"{entry!r} is a {type(state_dict).__name__}, not a state dict (a mapping of names to tensors)"
        )
    not_tensors = [k for k, v in state_dict.items() if not is_tensor(v)]
    if not_tensors:
        raise SnapshotFormatError(
            f"{entry!r} holds {len(not_tensors)} values that are not tensors (first: {not_tensors[0]!r})"
        )
    bad_names = [k for k in state_dict if not isinstance(k, str)]
    if bad_names:
        raise SnapshotFormatError(f"{entry!r} has keys that are not strings (first: {bad_names[0]!r})")
    return state_dict


def present_entries(snapshot: Mapping[str, Any], entries: tuple[str, ...]) -> list[str]:
    """Which of ``entries`` the snapshot has; at least one must be there."""
    present = [entry for entry in entries if snapshot.get(entry) is not None]
    if not present:
        wanted = " or ".join(repr(e) for e in entries)
        found = ", ".join(repr(k) for k in snapshot) or "nothing"
        raise SnapshotFormatError(f"no {wanted} entry (it holds {found})")
    return present


def strip_wrapper_prefixes(
    snapshot: Mapping[str, Any], entries: tuple[str, ...] = ("model",)
) -> tuple[dict[str, Any], list[StrippedEntry]]:
    """Remove ``module.`` / ``_orig_mod.`` wrapper prefixes from the snapshot's state dicts.

    Needed for snapshots saved from a ``torch.nn.DataParallel``-wrapped model
    (DeepLabCut up to 3.0.0rc5 with several ``runner.gpus``; fixed in rc6 by saving
    ``model.module``) and for any custom DataParallel, DDP or ``torch.compile``
    training script. DeepLabCut 3.0.2 still loads ``snapshot["model"]`` strictly.
    Every other entry (``metadata``, ``optimizer``, ``scheduler``, ``config``, ...) is
    kept as it is: optimizer and scheduler state index parameters by position, not name.
    """
    result = dict(snapshot)
    stripped: list[StrippedEntry] = []
    for entry in present_entries(snapshot, entries):
        state_dict = state_dict_of(snapshot, entry)
        partial = keys.partially_prefixed(state_dict)
        if partial and not keys.find_wrapper_prefixes(state_dict):
            prefix, count = next(iter(partial.items()))
            try:
                keys.strip_prefix(state_dict, prefix)
                collision = ""
            except keys.KeyCollisionError as error:
                collision = f"; stripping it would make keys collide ({error.collisions[0]})"
            raise SnapshotFormatError(
                f"{entry!r}: {count} of {len(state_dict)} keys start with {prefix!r} and the rest do not{collision}. "
                "A wrapper prefixes every key, so this state dict was edited or merged by hand; it is left as it is"
            )
        new_state_dict, prefixes = keys.strip_wrapper_prefixes(state_dict)
        if prefixes:
            result[entry] = new_state_dict
            stripped.append(StrippedEntry(entry, prefixes, len(new_state_dict)))
    return result, stripped


def numpy_metadata_to_python(snapshot: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """Turn numpy scalars in ``metadata`` (keys too) into plain Python numbers; return the snapshot and how many.

    DeepLabCut 3.0.0rc5 and older stored numpy float64 values in ``metadata["metrics"]``;
    ``torch.load(weights_only=True)`` (DeepLabCut's default since torch 2.6) refuses them
    unless numpy's types are allow-listed. DeepLabCut's own ``fix_snapshot_metadata``
    does the same cast, but loads with ``weights_only=False`` and keeps no backup.
    """
    count = 0
    numpy_scalars = _numpy_scalar_types()

    def plain(value: Any) -> Any:
        nonlocal count
        if isinstance(value, numpy_scalars):
            count += 1
            return cast(Any, value).item()  # a numpy scalar
        if isinstance(value, dict):
            return type(value)((plain(key), plain(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(plain(item) for item in value)
        return value

    if not isinstance(snapshot.get("metadata"), dict):
        return dict(snapshot), 0
    metadata = plain(snapshot["metadata"])
    return ({**snapshot, "metadata": metadata} if count else dict(snapshot)), count


def numpy_values(snapshot: Mapping[str, Any]) -> dict[str, list[str]]:
    """The numpy scalars and dtypes a snapshot holds, by top-level entry: one type name each (``float64``,
    ``dtype(float32)``), keys included.

    DeepLabCut's loader judges every one of them wherever it sits, not only in ``metadata``
    (where DeepLabCut 3.0.0rc5 and older put numpy float64 metrics).
    """
    numpy = sys.modules.get("numpy")
    if numpy is None:  # a numpy value cannot exist without numpy loaded
        return {}
    found: dict[str, list[str]] = {}
    for entry, top in snapshot.items():
        names: list[str] = []
        stack = [entry, top]
        while stack:
            value = stack.pop()
            if isinstance(value, numpy.generic):
                names.append(type(value).__name__)
            elif isinstance(value, numpy.dtype):
                names.append(f"dtype({value.name})")
            elif isinstance(value, dict):
                stack.extend(value.keys())
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        if names:
            found[str(entry)] = sorted(names)
    return found


def epoch_of(snapshot: Mapping[str, Any]) -> int | None:
    """The epoch a snapshot's metadata records, if it records one as a whole number."""
    metadata = snapshot.get("metadata")
    epoch = metadata.get("epoch") if isinstance(metadata, Mapping) else None
    numpy = sys.modules.get("numpy")
    whole = (int, numpy.integer) if numpy is not None else (int,)
    if isinstance(epoch, whole) and not isinstance(epoch, bool) and epoch >= 0:
        return int(epoch)
    return None
