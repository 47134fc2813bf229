"""DeepLabCut's model as a strict ``load_state_dict`` sees it: built once, kept, judged without DeepLabCut.

A snapshot loads into its model when DeepLabCut's loader reads the file and
``model.load_state_dict(snapshot["model"])`` (strict) succeeds. The second half depends on
the model only through what torch's loading code looks at: for every module the load
visits, its parameters and persistent buffers (name, shape, dtype), its children, and
what its own ``_load_from_state_dict`` adds or drops. :func:`describe` reduces a model to
exactly that (the *signature*, plain JSON); :func:`strict_load_problems` replays torch's
strict load over a signature and a state dict of tensor records, reading no tensor byte.
Where a model holds a loading rule this module does not replay (a hook, a module class with
its own ``_load_from_state_dict``), its signature says so and DeepLabCut's full load judges.

Signatures are kept in the user's cache folder (:class:`SignatureCache`), keyed by this
tool's, DeepLabCut's, torch's and torchvision's versions and the canonical model section,
so DeepLabCut is imported only to build a missing one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlc_snapshot_fix import pickled
from dlc_snapshot_fix.transforms import is_loaded_tensor

if TYPE_CHECKING:
    import torch

FORMAT = 1
"""Bumped whenever what a signature records, or how it is judged, changes: older entries are rebuilt."""

PACKAGES = ("dlc-snapshot-fix", "deeplabcut", "torch", "torchvision")
"""Whose versions key a signature: a signature built under one set is never used under another."""

STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
"""The dtype of a tensor built on each of torch's typed storages (:data:`pickled.STORAGE_ITEMSIZE`)."""


# ---------------------------------------------------------------------------------------------------------------
# Building a signature (torch, and DeepLabCut for the model itself)


class NotDescribable(Exception):
    """The model loads by a rule :func:`strict_load_problems` does not replay."""


RULES = {
    ("torch.nn.modules.module", "Module"): "plain",
    ("torch.nn.modules.batchnorm", "_NormBase"): "batchnorm",
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): "frozen_batchnorm",
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): "frozen_batchnorm",
    ("torchvision.ops.feature_pyramid_network", "FeaturePyramidNetwork"): "rename",
    ("torchvision.models.detection.rpn", "RPNHead"): "rename",
}
"""Each class in torch, torchvision and timm whose ``_load_from_state_dict`` is replayed, and its rule:
``batchnorm`` fills in ``num_batches_tracked`` for a state dict saved before version 2;
``frozen_batchnorm`` drops it; ``rename`` moves keys of version-1 layouts to their new names."""

RULE_NAMES = frozenset([*RULES.values(), "batchnorm_untracked"])


def _rule_of(module: torch.nn.Module) -> tuple[str, list[list[str]]]:
    """The loading rule of ``module``'s class (the nearest ``_load_from_state_dict`` in its MRO, if replayed) and,
    for ``rename``, the ``[old, new]`` key suffixes it moves."""
    mro = type(module).__mro__
    owners = [cls for cls in mro if "_load_from_state_dict" in vars(cls)]
    rule = RULES.get((owners[0].__module__, owners[0].__qualname__)) if owners else None
    if rule is None:
        raise NotDescribable(f"{type(module).__qualname__} loads by its own rule ({owners[0].__module__})")
    if any(RULES.get((cls.__module__, cls.__qualname__)) is None for cls in owners[1:]):
        raise NotDescribable(f"{type(module).__qualname__} builds on a loading rule not replayed here")
    if rule == "batchnorm" and not getattr(module, "track_running_stats", False):
        return "batchnorm_untracked", []  # reads the version like the others, fills nothing in
    if rule != "rename":
        return rule, []
    if owners[0].__name__ == "RPNHead":
        return rule, [[f"conv.{kind}", f"conv.0.0.{kind}"] for kind in ("weight", "bias")]
    blocks = len(module.inner_blocks)  # type: ignore[arg-type]
    return rule, [
        [f"{block}.{index}.{kind}", f"{block}.{index}.0.{kind}"]
        for block in ("inner_blocks", "layer_blocks")
        for index in range(blocks)
        for kind in ("weight", "bias")
    ]


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """``model`` as a strict ``load_state_dict`` sees it, with what this torch does at the edges (:func:`probe`).

    Modules are listed in the order ``load_state_dict`` visits them (a shared module once per
    name it is reached by), each as ``[prefix, rule, entries, children, renames]``; ``entries``
    are ``[name, dtype, shape]`` for parameters and persistent buffers that are not ``None``.
    """
    import torch

    modules: list[list[Any]] = []
    stack: list[tuple[str, torch.nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks:
            raise NotDescribable(f"{prefix or 'the model'} has load_state_dict hooks")
        if getattr(type(module), "set_extra_state", None) is not torch.nn.Module.set_extra_state:
            raise NotDescribable(f"{prefix or 'the model'} keeps extra state (_extra_state)")
        rule, renames = _rule_of(module)
        entries = []
        persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
        for name, value in [*module._parameters.items(), *persistent.items()]:
            if value is None:
                continue
            if torch.nn.parameter.is_lazy(value):
                raise NotDescribable(f"{prefix}{name} is a lazy parameter")
            if value.layout != torch.strided:
                raise NotDescribable(f"{prefix}{name} is a {value.layout} tensor")
            entries.append([name, str(value.dtype).removeprefix("torch."), list(value.shape)])
        children = list(module._modules)  # a None child too: torch neither visits it nor finds keys under it unexpected
        modules.append([prefix, rule, entries, children, renames])
        stack.extend(
            (f"{prefix}{name}.", child) for name, child in reversed(module._modules.items()) if child is not None
        )
    dtypes = sorted({dtype for module in modules for _, dtype, _ in module[2]})
    return {"format": FORMAT, "modules": modules, "torch": probe(dtypes)}


def probe(dtypes: Iterable[str]) -> dict[str, Any]:
    """What this torch's ``load_state_dict`` does where versions differ, measured rather than assumed.

    ``legacy_scalar``: which one-dimensional shapes a zero-dimensional parameter accepts
    (``"one"``: ``[1]`` only, as torch 2.14; ``"any"``: any non-empty one, its first element,
    as torch 2.6); ``refused_casts``: for each dtype a model holds, the storage dtypes
    ``copy_`` refuses to cast from (none, in both).
    """
    import warnings

    import torch

    def loads(shape: list[int]) -> bool:
        module = torch.nn.Module()
        module.register_buffer("value", torch.zeros(()))
        try:
            module.load_state_dict({"value": torch.zeros(shape)})
        except (RuntimeError, IndexError):
            return False
        return True

    refused: dict[str, list[str]] = {}
    for target in dtypes:
        refused[target] = []
        for source in STORAGE_DTYPES.values():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    torch.zeros(2, dtype=getattr(torch, target)).copy_(torch.ones(2, dtype=getattr(torch, source)))
                except Exception:
                    refused[target].append(source)
    return {"legacy_scalar": "any" if loads([2]) else "one" if loads([1]) else "none", "refused_casts": refused}


def build(kind: str, model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The signature of the model (``kind="pose"``) or detector DeepLabCut builds for inference from ``model_config``.

    Raises :class:`NotDescribable` where the model loads by a rule not replayed here.
    """
    from dlc_snapshot_fix import verify

    model = verify.build_detector(model_config) if kind == "detector" else verify.build_pose_model(model_config)
    return describe(model)


# ---------------------------------------------------------------------------------------------------------------
# The cache


@functools.cache
def versions() -> dict[str, str]:
    """The installed versions of :data:`PACKAGES`, read from their metadata (nothing is imported)."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def cache_key(kind: str, model_config: Mapping[str, Any]) -> str:
    """What a signature is kept under: every version that shapes it and the canonical model section."""
    canonical = json.dumps(
        {"format": FORMAT, "kind": kind, "versions": versions(), "model": model_config},
        sort_keys=True,
        default=repr,
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_cache_folder() -> Path:
    """``dlc-snapshot-fix/signatures`` in the user's cache folder (``XDG_CACHE_HOME``, ``%LOCALAPPDATA%``, ...)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("dlc-snapshot-fix", appauthor=False)) / "signatures"


class SignatureCache:
    """Signatures as one JSON file each, written atomically; a damaged or foreign entry is ignored (and rebuilt)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder if folder is not None else default_cache_folder()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            entry = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(entry, dict) and entry.get("key") == key and _well_formed(entry.get("signature"))):
            return None
        return entry["signature"]

    def put(self, key: str, signature: dict[str, Any]) -> None:
        """Write an entry (temp file in the same folder, then ``os.replace``); a cache that cannot be written is
        not an error: the signature is simply built again next time."""
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.folder)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    json.dump({"key": key, "signature": signature}, stream, separators=(",", ":"))
                os.replace(temp, self.path(key))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise


def _well_formed(signature: Any) -> bool:
    """Whether ``signature`` has the shape :func:`describe` writes (a damaged entry must not become a verdict)."""
    if not (isinstance(signature, dict) and signature.get("format") == FORMAT):
        return False
    modules, edges = signature.get("modules"), signature.get("torch")
    if not (isinstance(modules, list) and modules and isinstance(edges, dict)):
        return False
    if edges.get("legacy_scalar") not in ("any", "one", "none") or not isinstance(edges.get("refused_casts"), dict):
        return False
    for module in modules:
        if not (isinstance(module, list) and len(module) == 5 and isinstance(module[0], str)):
            return False
        _, rule, entries, children, renames = module
        if not (isinstance(renames, list) and all(_strings(pair, 2) for pair in renames)):
            return False
        if rule not in RULE_NAMES or not isinstance(children, list):
            return False
        if not all(isinstance(child, str) for child in children) or not isinstance(entries, list):
            return False
        for entry in entries:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and _strings(entry[:2], 2)
                and isinstance(entry[2], list)
                and all(type(n) is int and n >= 0 for n in entry[2])
            ):
                return False
    return True


def _strings(values: Any, count: int) -> bool:
    return isinstance(values, list) and len(values) == count and all(isinstance(v, str) for v in values)


# ---------------------------------------------------------------------------------------------------------------
# The verdict: torch's strict load, replayed over tensor records (pure)


@dataclass
class StrictLoad:
    """What ``model.load_state_dict(state_dict)`` (strict) reports, replayed: empty lists mean it loads."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """``(key, shape in snapshot, shape in model)``."""
    errors: list[str] = field(default_factory=list)
    """Every other error torch reports for an entry (a value that is not a tensor, a refused cast)."""
    crash: str | None = None
    """An exception torch raises out of the load itself (a key that is not a string, a bad ``_metadata``)."""

    @property
    def loads(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches or self.errors or self.crash)


@dataclass(frozen=True)
class TensorFacts:
    """What the replay reads of a loaded tensor, kept once the tensor itself is let go (its file unmapped)."""

    dtype: str
    shape: tuple[int, ...]


def facts_only(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """``snapshot`` with each loaded tensor of its top-level dicts (state dicts) as :class:`TensorFacts`.

    For a snapshot torch rewrote: the tensors must be released before the swap (Windows
    refuses to replace a mapped file), and the verdict after it needs only these facts.
    """
    view: dict[str, Any] = {}
    for name, value in snapshot.items():
        if isinstance(value, dict):
            kept = type(value)(
                (key, TensorFacts(str(item.dtype).removeprefix("torch."), tuple(item.shape)))
                if is_loaded_tensor(item)
                else (key, item)
                for key, item in value.items()
            )
            if hasattr(value, "_metadata"):
                kept._metadata = value._metadata  # type: ignore[attr-defined]
            value = kept
        view[name] = value
    return view


def _tensor_facts(value: Any) -> tuple[str, tuple[int, ...]] | None:
    """(dtype, shape) of a tensor record or a loaded dense tensor; ``None`` for anything torch would not copy."""
    if isinstance(value, pickled.TensorRecord):
        return STORAGE_DTYPES[value.storage.storage_type.name], value.shape
    if isinstance(value, TensorFacts):
        return value.dtype, value.shape
    if is_loaded_tensor(value):
        return str(value.dtype).removeprefix("torch."), tuple(value.shape)
    return None


def strict_load_problems(signature: Mapping[str, Any], state_dict: Any) -> StrictLoad:
    """Replay ``Module.load_state_dict(state_dict, strict=True)`` (torch 2.x) over a signature.

    The same walk as torch's: each module in turn (parents before children), given the
    entries under its prefix and its ``_metadata`` version, applies its class's rule
    (:data:`RULES`), then the default: a value that is not a tensor, a shape (after the
    legacy scalar rule) or a dtype ``copy_`` refuses is an error; a missing entry is
    missing; a key under the prefix naming neither a child module nor an entry is
    unexpected. What a rule adds, drops or renames is seen by that module and its children
    only, as with torch's per-module copies: one map, changed in that order, is the same.
    """
    result = StrictLoad()
    if not isinstance(state_dict, Mapping):
        result.crash = f"the state dict is a {type(state_dict).__name__}, not a mapping"
        return result
    if not all(isinstance(key, str) for key in state_dict):
        odd = next(key for key in state_dict if not isinstance(key, str))
        result.crash = f"a key that is not a string ({odd!r})"
        return result
    metadata = getattr(state_dict, "_metadata", None)
    edges = signature["torch"]
    current: dict[str, Any] = dict(state_dict)
    children_of = {module[0]: set(module[3]) for module in signature["modules"]}
    owned: dict[str, list[str]] = {}
    for key in current:
        owned.setdefault(_owner(key, "", children_of), []).append(key)
    for prefix, rule, entries, _, renames in signature["modules"]:
        try:
            local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
            version = local_metadata.get("version", None)
            old_layout = rule in ("batchnorm", "batchnorm_untracked", "rename") and (version is None or version < 2)
        except Exception as error:  # torch raises the same out of its load (a _metadata that is not a dict of dicts)
            result.crash = f"its _metadata cannot be read for {prefix[:-1] or 'the model'} ({error})"
            return result
        if rule == "batchnorm" and old_layout and f"{prefix}num_batches_tracked" not in current:
            current[f"{prefix}num_batches_tracked"] = _FILLED_IN
        elif rule == "frozen_batchnorm":
            current.pop(f"{prefix}num_batches_tracked", None)
        elif rule == "rename" and old_layout:
            for old, new in renames:
                if prefix + old in current:
                    current[prefix + new] = current.pop(prefix + old)
                    owned.setdefault(_owner(prefix + new, prefix, children_of), []).append(prefix + new)
        local = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        for name, (dtype, shape) in local.items():
            key = prefix + name
            if key not in current:
                result.missing.append(key)
                continue
            value = current[key]
            if value is _FILLED_IN:
                continue
            facts = _tensor_facts(value)
            if facts is None:
                result.errors.append(f"{key} holds a {type(value).__name__}, not a tensor")
                continue
            given_dtype, given_shape = facts
            if shape == () and len(given_shape) == 1:
                if given_shape[0] == 1 or (edges["legacy_scalar"] == "any" and given_shape[0] > 1):
                    given_shape = ()
                elif edges["legacy_scalar"] == "any":
                    result.crash = f"{key} is empty where the model holds a scalar (torch raises IndexError)"
                    return result
            if given_shape != shape:
                result.shape_mismatches.append((key, given_shape, shape))
            elif given_dtype in edges["refused_casts"].get(dtype, ()):
                result.errors.append(f"{key} is {given_dtype}, which torch does not cast to the model's {dtype}")
        for key in owned.get(prefix, ()):  # the keys whose name leaves the module tree here
            if key in current and key[len(prefix) :] not in local:
                result.unexpected.append(key)
    return result


def _owner(key: str, start: str, children_of: Mapping[str, set[str]]) -> str:
    """The prefix of the module whose strict check decides ``key``: torch hands a key down while its next name part
    is a child module, and the module where that stops finds it unexpected unless it names an entry of its own."""
    prefix = start
    while True:
        head, dot, _ = key[len(prefix) :].partition(".")
        if not dot or head not in children_of.get(prefix, ()):
            return prefix
        prefix = f"{prefix}{head}."


_FILLED_IN = object()
"""The ``num_batches_tracked`` BatchNorm puts in for a state dict saved before version 2 (the model's own)."""
