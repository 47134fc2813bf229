"""Prove a result: the file reads back as intended, and DeepLabCut itself loads it.

``compare_snapshots`` and ``compare_to_model`` are pure. ``ModelChecker`` asks the
installed DeepLabCut, never a guess of it: the file goes through DeepLabCut's own
snapshot loader (``runners.base.attempt_snapshot_load``, the function its runners
call, with the ``weights_only`` its ``pytorch_config.yaml`` or default gives), and the
state dict then loads strictly into the model that config builds (as its inference
does, with no weight download). Where DeepLabCut is absent the check is skipped, saying so.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import io
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dlc_snapshot_fix import keys, pickled, signature, transforms, zipappend
from dlc_snapshot_fix.discover import SnapshotFile, read_yaml
from dlc_snapshot_fix.report import NOT_REQUESTED
from dlc_snapshot_fix.transforms import is_loaded_tensor

if TYPE_CHECKING:
    import torch

records_in = pickled.records_in


def tensor_bytes(tensor: torch.Tensor) -> Any:
    """A tensor's bytes in memory order, as a numpy uint8 array (no copy where it is contiguous)."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensors_bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike ``torch.equal``, NaN equals an identical NaN)."""
    import numpy as np

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(np.array_equal(tensor_bytes(a), tensor_bytes(b)))  # numpy compares bytes at memory speed


def compare_snapshots(expected: Any, actual: Any, where: str = "snapshot") -> list[str]:
    """Every difference between two loaded snapshots: keys, order, ``_metadata``, tensor bits."""
    if is_loaded_tensor(expected) or is_loaded_tensor(actual):
        if not (is_loaded_tensor(expected) and is_loaded_tensor(actual)):
            return [f"{where}: tensor expected on one side only"]
        return [] if tensors_bit_identical(expected, actual) else [f"{where}: tensor differs"]
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        if list(expected) != list(actual):
            return [f"{where}: keys differ"]
        problems = []
        if getattr(expected, "_metadata", None) != getattr(actual, "_metadata", None):
            problems.append(f"{where}: _metadata differs")
        for key in expected:
            problems += compare_snapshots(expected[key], actual[key], f"{where}[{key!r}]")
        return problems
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where}: length differs"]
        problems = []
        for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
            problems += compare_snapshots(a, b, f"{where}[{index}]")
        return problems
    return [] if expected == actual or (expected != expected and actual != actual) else [f"{where}: value differs"]


def same_structure(expected: Any, actual: Any) -> bool:
    if isinstance(expected, pickled.TensorRecord):
        return isinstance(actual, pickled.TensorRecord) and expected.args[1:] == actual.args[1:]
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and list(expected) == list(actual)
            and getattr(expected, "_metadata", None) == getattr(actual, "_metadata", None)
            and all(same_structure(expected[k], actual[k]) for k in expected)
        )
    if isinstance(expected, (list, tuple)):
        return (
            type(expected) is type(actual)
            and len(expected) == len(actual)
            and all(map(same_structure, expected, actual))
        )
    return expected == actual or (expected != expected and actual != actual)


def streamed_differences(original: Path, written: Path, expected: Any) -> list[str]:
    """Read-back of a rewrite without mapping either file: memory does not grow with snapshot size.

    ``expected`` is the snapshot meant, as tensor records (the original pickle, transformed).
    The new file's pickle must parse to it, tensor for tensor (offset, size, stride, storage
    type and length), and every storage's bytes must equal the original's, compared in
    1 MiB chunks straight from both zips (whose reader also checks each member's CRC).
    """
    old_layout, new_layout = zipappend.read_layout(original), zipappend.read_layout(written)
    new_records, new_order = pickled.loads(zipappend.read_member(written, new_layout, new_layout.pickle_record()))
    if not same_structure(expected, new_records):
        return ["the new file's pickle does not parse to the snapshot meant"]
    old_storages = list({r.storage.key: r.storage for r in records_in(expected)}.values())
    new_storages = list({r.storage.key: r.storage for r in records_in(new_records)}.values())
    if [s.key for s in new_storages] != new_order or len(old_storages) != len(new_storages):
        return ["the new file references its storages differently"]
    old_prefix = old_layout.pickle_record().name.rsplit("/", 1)[0]
    new_prefix = new_layout.pickle_record().name.rsplit("/", 1)[0]
    with zipfile.ZipFile(original) as old_zip, zipfile.ZipFile(written) as new_zip:
        for old, new in zip(old_storages, new_storages, strict=True):
            if old.pid[1] is not new.pid[1] or old.pid[4] != new.pid[4]:
                return [f"storage {new.key}: another type or length than the original's {old.key}"]
            with old_zip.open(f"{old_prefix}/data/{old.key}") as a, new_zip.open(f"{new_prefix}/data/{new.key}") as b:
                while chunk := a.read(CHUNK):
                    if b.read(len(chunk)) != chunk:
                        return [f"storage {new.key}: bytes differ from the original's"]
                if b.read(1):
                    return [f"storage {new.key}: longer than the original's"]
    return []


CHUNK = 1 << 20


CheckStatus = Literal["ok", "mismatch", "refused", "skipped"]
"""``refused``: DeepLabCut's own snapshot loader does not read the file at all."""


@dataclass(frozen=True)
class ModelCheck:
    """How a state dict fits the model it belongs to, in fvcore's terms."""

    status: CheckStatus
    reason: str = ""
    missing: dict[str, int] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """``(key, shape in snapshot, shape in model)``."""

    @property
    def fits(self) -> bool:
        return self.status not in ("mismatch", "refused")

    def summary(self) -> str:
        if self.status != "mismatch":
            return self.reason
        parts = []
        for label, groups in (("missing", self.missing), ("unexpected", self.unexpected)):
            if groups:
                listed = ", ".join(f"{module}: {count}" for module, count in groups.items())
                parts.append(f"{label} keys ({listed})")
        if self.shape_mismatches:
            listed = ", ".join(f"{k} {list(s)} vs model {list(m)}" for k, s, m in self.shape_mismatches[:3])
            more = len(self.shape_mismatches) - 3
            parts.append(f"shape mismatches ({listed}{f', +{more} more' if more > 0 else ''})")
        if self.reason:
            parts.append(self.reason)
        return "; ".join(parts)


def compare_to_model(model_shapes: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]) -> ModelCheck:
    """What a strict ``load_state_dict`` would complain about, grouped by module."""
    missing = [k for k in model_shapes if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_shapes]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(shape))
        for k, shape in model_shapes.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    if not (missing or unexpected or mismatched):
        return ModelCheck("ok", "loads strictly into its DeepLabCut model")
    return ModelCheck(
        "mismatch",
        missing=keys.group_by_module(missing),
        unexpected=keys.group_by_module(unexpected),
        shape_mismatches=mismatched,
    )


def deeplabcut_available() -> bool:
    return importlib.util.find_spec("deeplabcut") is not None


def deeplabcut_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deeplabcut")
    except PackageNotFoundError:
        return "unknown"


LoadSource = Path | Callable[[], io.BufferedIOBase]
"""What DeepLabCut's loader reads: a file, or a stream opener (a planned file that is not written yet)."""


class _DropDeepLabCutLoadError(logging.Filter):
    """``attempt_snapshot_load`` logs a page of advice before re-raising; the refusal is reported here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("Failed to load the snapshot")


@contextlib.contextmanager
def _quiet_deeplabcut_loader() -> Iterator[None]:
    drop = _DropDeepLabCutLoadError()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def deeplabcut_load(source: LoadSource, weights_only: bool | None = None) -> Any:
    """Load ``source`` exactly as DeepLabCut's runners do: its ``attempt_snapshot_load``, on the CPU.

    ``weights_only=None`` is DeepLabCut's own default (``get_load_weights_only()``,
    ``TORCH_LOAD_WEIGHTS_ONLY``). Importing that module is also what registers the numpy
    types DeepLabCut allow-lists, so the answer is the one DeepLabCut gives.
    """
    from deeplabcut.pose_estimation_pytorch.runners.base import attempt_snapshot_load

    with _quiet_deeplabcut_loader():
        if isinstance(source, (str, os.PathLike)):
            return attempt_snapshot_load(source, "cpu", weights_only)
        with source() as stream:
            return attempt_snapshot_load(stream, "cpu", weights_only)


def loader_refusal(error: BaseException) -> str:
    """The diagnosis inside torch's weights-only error (it opens with advice to disable safety)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        if " was not an allowed global" in detail:
            return detail.split(" was not an allowed global")[0] + " is not allowed"
        if "but got " in detail:
            return f"{detail.split('but got ', 1)[1]} is not allow-listed"
        return detail or "refused"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


class JoinedFile(io.RawIOBase):
    """A file's bytes followed by ``tail``, read-only: the result of an append, before it is written."""

    def __init__(self, path: Path, tail: bytes):
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._size = os.fstat(self._file.fileno()).st_size
        self._tail = tail
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size + len(self._tail)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:  # type: ignore[override]
        wanted = len(buffer)
        if self._position < self._size:
            self._file.seek(self._position)
            data = self._file.read(min(wanted, self._size - self._position))
        else:
            start = self._position - self._size
            data = self._tail[start : start + wanted]
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


DEEPLABCUT_NUMPY = {"float64", "dtype(float64)"}
"""The numpy values DeepLabCut 3.0.x's loader reads: it allow-lists numpy's ``dtype``, ``Float64DType`` and
``scalar``, nothing else of numpy's."""


def running_numpy_dialect() -> str:
    """The numpy names this environment's numpy (so DeepLabCut here) gives ``scalar``."""
    import numpy

    return "numpy 2.x" if int(numpy.__version__.split(".")[0]) >= 2 else "numpy 1.x"


def numpy_dialect_of(path: Path) -> str | None:
    """The numpy whose names a zip snapshot's pickle uses (:func:`pickled.numpy_dialect`); ``None`` if unknown."""
    try:
        layout = zipappend.read_layout(path)
        return pickled.numpy_dialect(zipappend.read_member(path, layout, layout.pickle_record()))
    except (zipappend.NotAppendable, OSError):
        return None


def deeplabcut_refuses_metadata(names: Iterable[str], dialect: str | None) -> str | None:
    """Why DeepLabCut 3.0.x, running with this numpy, refuses the numpy scalars ``metadata`` holds, or ``None``.

    ``names`` are :func:`transforms.numpy_values`' names, ``dialect`` the numpy whose names
    the pickle uses (``None``: unknown, taken as refused: the cure is lossless). Pure apart
    from asking which numpy is installed; the tests hold it against the real DeepLabCut.
    """
    scalars = {name for name in names if not name.startswith("dtype(")}
    if not scalars:
        return None
    if not scalars <= DEEPLABCUT_NUMPY:
        return f"DeepLabCut allow-lists numpy float64 only, and these are {', '.join(sorted(scalars))}"
    running = running_numpy_dialect()
    if dialect != running:
        return (
            f"DeepLabCut refuses them: they were pickled under {dialect or 'an unknown numpy'}'s names "
            f"and it runs with {running}"
        )
    return None


def judge_numpy_values(
    found: Mapping[str, list[str]], checks: Iterable[ModelCheck], dialect: str | None
) -> tuple[str | None, str | None]:
    """(a failure hint, a note) for numpy values in a snapshot (:func:`transforms.numpy_values`).

    DeepLabCut 3.0.x allow-lists numpy's ``dtype``, ``Float64DType`` and ``scalar`` (by
    object, so only under the name its own numpy gives ``scalar``: numpy 1.x pickles say
    ``numpy.core``, numpy 2.x ones ``numpy._core``), wherever in the file they are. Where
    DeepLabCut ran, its verdict is in ``checks``; where it did not, this says what DeepLabCut
    3.0.x does, which the tests check against the real one. ``dialect`` names the numpy whose
    names the pickle uses.
    """
    if not found:
        return None, None
    held = "; ".join(
        f"{entry!r} holds {len(names)} numpy value(s) ({', '.join(sorted(set(names)))})"
        + (", as DeepLabCut 3.0.0rc5 and older saved them" if entry == "metadata" else "")
        for entry, names in sorted(found.items())
    )
    beyond_fix = sorted(  # --fix-metadata turns numpy scalars in 'metadata' into numbers, nothing else
        entry for entry, names in found.items() if entry != "metadata" or any(n.startswith("dtype(") for n in names)
    )
    fix = (
        "--fix-metadata makes them plain numbers, which every loader reads"
        if not beyond_fix
        else "--fix-metadata turns only numpy scalars in 'metadata' into numbers; what "
        f"{', '.join(map(repr, beyond_fix))} holds must be saved again without numpy"
    )
    other = {"numpy 1.x": "numpy 2.x", "numpy 2.x": "numpy 1.x"}.get(dialect or "")
    also = f", and so does DeepLabCut running with {other} (the pickle uses {dialect}'s names)" if other else ""
    verdicts = [check for check in checks if check.status != "skipped"]
    refusals = [check.reason for check in verdicts if check.status == "refused"]
    if refusals:  # DeepLabCut's word is in the check; say what fixes it when numpy is what it refused
        return (f"{held}. {fix}" if any("numpy" in reason for reason in refusals) else None), None
    if verdicts:
        return None, (
            f"{held}: DeepLabCut {deeplabcut_version()} reads them (it allow-lists numpy float64), but a bare "
            f"torch.load(weights_only=True) refuses this file{also}. {fix}"
        )
    if {name for names in found.values() for name in names} <= DEEPLABCUT_NUMPY:
        return None, (
            f"{held}: DeepLabCut 3.0.x (numpy >= 1.25) reads numpy float64 pickled under the numpy it runs with"
            f"{f' (here {dialect})' if dialect else ''}; a bare torch.load(weights_only=True) refuses this file"
            f"{also}. {fix}"
        )
    return f"{held}: DeepLabCut 3.0.x allow-lists numpy float64 only, so its loader refuses this file. {fix}", None


def joined_opener(path: Path, tail: bytes) -> Callable[[], io.BufferedIOBase]:
    return lambda: io.BufferedReader(JoinedFile(path, tail), buffer_size=1 << 20)


def build_pose_model(model_config: Mapping[str, Any]) -> torch.nn.Module:
    """The pose model a ``pytorch_config.yaml``'s ``model`` section describes, built as DeepLabCut's inference does.

    ``pretrained_backbone=False``: no weight download. The config is copied, since
    ``PoseModel.build`` writes into it.
    """
    from deeplabcut.pose_estimation_pytorch.models import PoseModel

    return PoseModel.build(copy.deepcopy(dict(model_config)), pretrained_backbone=False)


DETECTOR = "#detector"
"""Marks a model source as a detector's (``pytorch_config.yaml``'s ``detector.model``), built by DETECTORS."""


@contextlib.contextmanager
def _backbones_without_download() -> Iterator[None]:
    """Build torchvision's detectors as DeepLabCut's inference does, without downloading their backbone weights.

    DeepLabCut's Faster R-CNN asks torchvision for ``weights=None`` and leaves
    ``weights_backbone`` at its default (ImageNet weights): torchvision then builds the
    pretrained branch (``FrozenBatchNorm2d`` in the backbone of ``fasterrcnn_resnet50_fpn``
    and ``fasterrcnn_mobilenet_v3_large_fpn``, no ``num_batches_tracked``) and downloads the
    weights into it. Here the detection modules' backbone builders (``resnet50``,
    ``mobilenet_v3_large``, ...) are called with ``weights=None``: the same branch, the same
    structure, no download. The snapshot replaces every weight, so the structure is all a
    check needs. (Building with ``weights_backbone=None`` instead, as this tool once did,
    gives ``BatchNorm2d``: another key set, and a wrong verdict.)
    """
    import torchvision.models.detection as detection

    patched: list[tuple[Any, str, Any]] = []
    modules = [value for value in vars(detection).values() if inspect.ismodule(value)]
    for module in modules:
        if not module.__name__.startswith("torchvision.models.detection."):
            continue
        for name, builder in vars(module).items():
            if _is_backbone_builder(builder):
                patched.append((module, name, builder))
    for module, name, builder in patched:
        setattr(module, name, _without_weights(builder))
    try:
        yield
    finally:
        for module, name, builder in patched:
            setattr(module, name, builder)


def _without_weights(builder: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(builder)
    def build(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights"] = None  # whatever the caller asked for: the structure is the same, the bytes never used
        return builder(*args, **kwargs)

    return build


def _is_backbone_builder(builder: Any) -> bool:
    """A classification model builder of torchvision's (``resnet50``), which detection modules call for backbones."""
    if not inspect.isfunction(builder) or not builder.__module__.startswith("torchvision.models."):
        return False
    if builder.__module__.startswith("torchvision.models.detection") or builder.__name__.startswith("_"):
        return False
    try:
        return "weights" in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def build_detector(detector_model_config: Mapping[str, Any]) -> torch.nn.Module:
    """The detector ``detector.model`` describes, built by DeepLabCut's ``DETECTORS`` as its inference does."""
    from deeplabcut.pose_estimation_pytorch.models.detectors import DETECTORS

    config = dict(copy.deepcopy(dict(detector_model_config)))
    if "pretrained" in config:  # as DeepLabCut's inference runners build it (apis/utils.py): no COCO weights
        config["pretrained"] = False
    with _backbones_without_download():
        return DETECTORS.build(config)


def _kind(config_source: str) -> str:
    """``detector`` for a model source that names a detector's config (:data:`DETECTOR`), else ``pose``."""
    return "detector" if config_source.endswith(DETECTOR) else "pose"


def read_config(path: Path) -> Any:
    """A ``pytorch_config.yaml`` as :func:`read_yaml` reads it, once per version of the file in a process (a
    project's snapshots share one: the verdict asks it for the model and ``load_weights_only`` of each)."""
    stat = os.stat(path)
    return _read_config_once(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_config_once(path: str, mtime_ns: int, size: int) -> Any:
    return read_yaml(Path(path))


def model_config_from(pytorch_config: Path, detector: bool = False) -> tuple[dict | None, str]:
    """The ``model`` (or ``detector.model``) section of a ``pytorch_config.yaml``, or ``None`` and why not."""
    config = read_config(pytorch_config)
    if detector:
        section = config.get("detector") if isinstance(config, Mapping) else None
        model = section.get("model") if isinstance(section, Mapping) else None
        if not isinstance(model, Mapping):
            return None, f"{pytorch_config} has no 'detector.model' section; detector check skipped"
        return dict(model), f"{pytorch_config}{DETECTOR}"
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        return None, f"{pytorch_config} has no 'model' section; model check skipped"
    return dict(config["model"]), str(pytorch_config)


class ModelChecker:
    """DeepLabCut's verdict on a snapshot: its loader reads the file, and the state dict loads strictly into its model.

    By default from the model's *signature* (:mod:`~dlc_snapshot_fix.signature`): built by
    DeepLabCut once per model config and kept in the user's cache, then judged against
    what the snapshot's pickle records, reading no tensor byte (:meth:`judge`). With
    ``deep=True`` (``--deep-check``), or where a model loads by a rule the signature does
    not replay, DeepLabCut's own loader reads every byte and the model loads the tensors
    (:meth:`check`). Each model is built at most once per run.
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        deep: bool = False,
        cache: signature.SignatureCache | None = None,
        announce: Callable[[str], None] | None = None,
    ):
        self.enabled = enabled
        self.deep = deep
        self.cache = cache
        """Where signatures are kept between runs; ``None``: built in memory for this run only (``--no-cache``)."""
        self.announce = announce
        self._models: dict[str, torch.nn.Module] = {}
        self._signatures: dict[str, dict[str, Any] | str] = {}
        """By config source: the signature, or why that model is judged by the full load instead."""

    def judge(self, snapshot_file: SnapshotFile, snapshot: Mapping[str, Any], entry: str) -> ModelCheck | None:
        """DeepLabCut's verdict on a file holding ``snapshot`` (tensors as records), from the model's signature.

        ``snapshot`` must have been read with ``weights_only`` rules (the torch-free reader,
        or torch's weights-only load): what DeepLabCut's loader then still refuses is numpy
        it does not allow-list, unless the project sets ``runner.load_weights_only: false``.
        ``None`` where only the full load can tell (:meth:`check` then judges).
        """
        if not self.enabled:
            return ModelCheck("skipped", NOT_REQUESTED)
        if self.deep or not deeplabcut_available():
            return None
        model_config, config_source = self._model_config(snapshot_file, snapshot, entry)
        if model_config is None:
            return ModelCheck("skipped", config_source)
        signature_ = self.signature(config_source, model_config)
        if signature_ is None:
            return None
        if snapshot_file.role != "exported" and self._deeplabcut_reads_weights_only(snapshot_file):
            names = [name for found in transforms.numpy_values(snapshot).values() for name in found]
            refused = deeplabcut_refuses_metadata(names, numpy_dialect_of(snapshot_file.path) if names else None)
            if refused:
                why = f"DeepLabCut {deeplabcut_version()}'s snapshot loader refuses it: {refused}"
                return ModelCheck("refused", why)
        state_dict = snapshot.get(entry)
        if not isinstance(state_dict, Mapping):
            missing = [prefix + entry_[0] for prefix, _, entries, _, _ in signature_["modules"] for entry_ in entries]
            return ModelCheck("mismatch", f"no {entry!r} state dict", missing=keys.group_by_module(missing))
        load = signature.strict_load_problems(signature_, state_dict)
        what = "detector" if config_source.endswith(DETECTOR) else "model"
        if load.loads:
            return ModelCheck(
                "ok",
                f"DeepLabCut {deeplabcut_version()} loads it: its snapshot loader reads the file and the state dict "
                f"loads strictly into the {what} its "
                f"{'file' if snapshot_file.role == 'exported' else 'pytorch_config.yaml'} builds (judged from the "
                "model's signature: no tensor byte read)",
            )
        return ModelCheck(
            "mismatch",
            "; ".join(([load.crash] if load.crash else []) + load.errors[:3]),
            missing=keys.group_by_module(load.missing),
            unexpected=keys.group_by_module(load.unexpected),
            shape_mismatches=load.shape_mismatches,
        )

    def signature(self, config_source: str, model_config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The signature of the model built from ``model_config``: kept, cached, or built now; ``None`` where only
        DeepLabCut's full load judges that model."""
        if config_source not in self._signatures:
            kind = _kind(config_source)
            key = signature.cache_key(kind, model_config)
            found = self.cache.get(key) if self.cache is not None else None
            if found is None:
                try:
                    found = signature.build(kind, model_config)
                except signature.NotDescribable as error:
                    self._signatures[config_source] = f"judged by the full load: {error}"
                    return None
                except Exception as error:  # DeepLabCut's builders raise many types for a bad config
                    self._signatures[config_source] = f"could not build the model from {config_source}: {error}"
                    return None
                if self.cache is not None:
                    self.cache.put(key, found)
            self._signatures[config_source] = found
        kept = self._signatures[config_source]
        return kept if isinstance(kept, dict) else None

    def prepare(self, snapshot_files: Iterable[SnapshotFile]) -> int:
        """Build (and keep) every signature these snapshots need that is not in the cache yet, saying so first.

        Returns how many models were built. Nothing is imported when every signature is kept.
        """
        if not self.enabled or self.deep or not deeplabcut_available():
            return 0
        missing: dict[str, dict] = {}
        for snapshot_file in snapshot_files:
            if snapshot_file.role == "exported" or snapshot_file.pytorch_config is None:
                continue
            with contextlib.suppress(Exception):  # an unreadable config is reported where the snapshot is checked
                model_config, source = model_config_from(snapshot_file.pytorch_config, snapshot_file.role == "detector")
                if model_config is None or source in self._signatures or source in missing:
                    continue
                key = signature.cache_key(_kind(source), model_config)
                kept = self.cache.get(key) if self.cache is not None else None
                if kept is not None:
                    self._signatures[source] = kept  # read once: the snapshots' verdicts take it from here
                else:
                    missing[source] = model_config
        if missing and self.announce is not None:
            where = f"; kept in {self.cache.folder} for later runs" if self.cache is not None else ""
            self.announce(
                f"building DeepLabCut's model for {len(missing)} config{'s' if len(missing) > 1 else ''} "
                f"(once per model config{where})…"
            )
        for source, config in missing.items():
            self.signature(source, config)
        return len(missing)

    @staticmethod
    def _deeplabcut_reads_weights_only(snapshot_file: SnapshotFile) -> bool:
        """``weights_only`` as DeepLabCut's loader takes it: the config's ``load_weights_only``, else its default
        (``TORCH_LOAD_WEIGHTS_ONLY``, true unless set otherwise: ``runners.base._load_weights_only``)."""
        configured = ModelChecker._weights_only(snapshot_file)
        if configured is not None:
            return configured
        return os.getenv("TORCH_LOAD_WEIGHTS_ONLY", "true").lower() in ("true", "1")

    def check(
        self,
        snapshot_file: SnapshotFile,
        snapshot: Mapping[str, Any] | None,
        entry: str,
        against: Path | None = None,
        source: LoadSource | None = None,
    ) -> ModelCheck:
        """The full load: ``entry`` against its own model config, or the ``pytorch_config.yaml`` ``against``.

        With ``source`` (a file, or a planned file as a stream), DeepLabCut's own loader
        reads it first and a refusal is the verdict; the state dict checked is
        ``snapshot[entry]`` when ``snapshot`` is given (what the file will hold once
        migrated), else what DeepLabCut loaded. Exported models are loaded by
        DeepLabCut-Live, not by that loader: they are checked in memory.
        """
        if not self.enabled:
            return ModelCheck("skipped", NOT_REQUESTED)
        if not deeplabcut_available():
            return ModelCheck("skipped", "deeplabcut is not installed; model check skipped")
        loaded: Any = None
        if source is not None and snapshot_file.role != "exported":
            try:
                loaded = deeplabcut_load(source, self._weights_only(snapshot_file))
            except Exception as error:  # whatever DeepLabCut raises is its verdict
                return ModelCheck(
                    "refused",
                    f"DeepLabCut {deeplabcut_version()}'s snapshot loader refuses it: {loader_refusal(error)}",
                )
        if snapshot is None:
            snapshot = loaded if isinstance(loaded, Mapping) else {}
        if against is not None:
            model_config, config_source = model_config_from(against)
        else:
            model_config, config_source = self._model_config(snapshot_file, snapshot, entry)
        if model_config is None:
            return ModelCheck("skipped", config_source)
        try:
            model = self.model(config_source, model_config)
        except Exception as error:  # DeepLabCut's builders raise many types for a bad config
            return ModelCheck("skipped", f"could not build the model from {config_source}: {error}")
        state_dict = snapshot.get(entry)
        if not isinstance(state_dict, Mapping):
            return ModelCheck("mismatch", f"no {entry!r} state dict", missing=keys.group_by_module(model.state_dict()))
        result = compare_to_model({k: tuple(v.shape) for k, v in model.state_dict().items()}, state_dict)
        if result.status == "ok" and all(map(is_loaded_tensor, state_dict.values())):
            model.load_state_dict(state_dict, strict=True)  # the real thing, as DeepLabCut calls it
        # (tensors recorded from the pickle are compared by shape only: no data is read)
        if result.status == "ok" and loaded is not None:
            return ModelCheck(
                "ok",
                f"DeepLabCut {deeplabcut_version()} loads it: its snapshot loader reads the file and the state dict "
                f"loads strictly into the {'detector' if config_source.endswith(DETECTOR) else 'model'} "
                "its pytorch_config.yaml builds",
            )
        return result

    @staticmethod
    def _weights_only(snapshot_file: SnapshotFile) -> bool | None:
        """``runner.load_weights_only`` (``detector.runner`` for a detector) as DeepLabCut's apis read it."""
        if snapshot_file.pytorch_config is None:
            return None
        try:
            config = read_config(snapshot_file.pytorch_config)
        except Exception:  # an unreadable config is reported by discovery; DeepLabCut's default applies
            return None
        if snapshot_file.role == "detector":
            config = config.get("detector") if isinstance(config, Mapping) else None
        runner = config.get("runner") if isinstance(config, Mapping) else None
        value = runner.get("load_weights_only") if isinstance(runner, Mapping) else None
        return value if isinstance(value, bool) else None

    @staticmethod
    def _model_config(snapshot_file: SnapshotFile, snapshot: Mapping[str, Any], entry: str) -> tuple[dict | None, str]:
        """The config of the model ``entry`` loads into: the pose model, or the detector (role or entry)."""
        detector = entry == "detector" or snapshot_file.role == "detector"
        if snapshot_file.role == "exported":
            config = snapshot.get("config")
            section = config.get("detector") if detector and isinstance(config, Mapping) else config
            if isinstance(section, Mapping) and isinstance(section.get("model"), Mapping):
                return dict(section["model"]), f"{snapshot_file.path}#config" + (DETECTOR if detector else "")
            return None, f"exported file has no {'detector ' if detector else ''}model config; model check skipped"
        if snapshot_file.pytorch_config is None:
            return None, "no readable pytorch_config.yaml beside it; model check skipped"
        return model_config_from(snapshot_file.pytorch_config, detector=detector)

    def model(self, source: str, model_config: Mapping[str, Any]) -> torch.nn.Module:
        """The model built from ``model_config``, once per ``source`` (a detector's ends in :data:`DETECTOR`)."""
        if source not in self._models:
            build = build_detector if source.endswith(DETECTOR) else build_pose_model
            self._models[source] = build(model_config)
        return self._models[source]
