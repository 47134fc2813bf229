"""Read and rewrite a snapshot's ``data.pkl`` without building a single tensor.

A ``torch.save`` file keeps every key name in one small pickle (``data.pkl``, ~30 KB
for a ResNet-50 pose model); the ~95 MB of tensor bytes sit in separate zip records
that the pickle refers to by *persistent id* ``('storage', type, key, location, numel)``.
Stripping a prefix therefore only needs a new ``data.pkl``. Here the pickle is read by
a restricted unpickler: only the globals torch's weights-only loader allows (plus
numpy scalar types) are resolved, ``_rebuild_tensor_v2`` is *recorded* as a
:class:`TensorRecord` instead of called, and storages stay :class:`StorageRecord`
placeholders carrying their original persistent id, which :func:`dumps` writes back.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch._weights_only_unpickler as weights_only

from dlc_snapshot_fix.reading import NUMPY_SCALAR_GLOBALS, NUMPY_SCALAR_NAMES


class NotRecordable(Exception):
    """The pickle uses something this reader does not record (another tensor kind, a refused global)."""


class NeverWritten(NotRecordable):
    """Something no numpy or torch writes, which can crash the process reading it (not just raise)."""


class _DTypeRecord:
    """A numpy dtype as the pickle asks for it, before numpy sees it.

    numpy's ``dtype.__setstate__`` crashes the interpreter (a segfault, which no
    ``except`` catches) on some states no numpy writes, e.g. a tuple one element short
    (found by the fuzz suite). So the constructor arguments and the state are recorded,
    and a real dtype is made only when they are exactly what numpy writes for a numeric dtype.
    """

    def __init__(self, *args: Any):
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def real(self) -> np.dtype:
        if not (
            1 <= len(self.args) <= 3
            and isinstance(self.args[0], str)
            and len(self.args[0]) <= 8
            and all(isinstance(flag, bool) for flag in self.args[1:])
        ):
            raise NeverWritten(f"a numpy dtype made from {self.args!r}, which numpy never writes")
        try:
            dtype = np.dtype(self.args[0])
        except Exception as error:
            raise NeverWritten(f"a numpy dtype {self.args[0]!r} numpy does not know") from error
        if dtype.kind not in "biufc":
            raise NeverWritten(f"a numpy {dtype} dtype; snapshot metadata holds numbers")
        if self.state is None:
            return dtype
        canonical = dtype.__reduce__()[2]
        if not (
            isinstance(self.state, tuple)
            and len(self.state) == len(canonical)
            and self.state[1] in ("<", ">", "|", "=")
            and self.state[:1] + self.state[2:] == canonical[:1] + canonical[2:]
        ):
            raise NeverWritten(f"a numpy dtype state {self.state!r} numpy never writes")
        return dtype.newbyteorder(self.state[1]) if self.state[1] in "<>" else dtype


def _record_scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's ``scalar(dtype, bytes)``, given only a checked dtype and exactly its item's bytes."""
    real = dtype.real() if isinstance(dtype, _DTypeRecord) else None
    if real is None or not isinstance(data, bytes) or len(data) != real.itemsize:
        raise NeverWritten("a numpy scalar whose dtype or bytes numpy never writes")
    return _NUMPY_SCALAR(real, data)


@dataclass(eq=False)
class StorageRecord:
    """A storage, known only by its persistent id; its bytes stay untouched in the zip."""

    pid: tuple

    @property
    def key(self) -> str:
        return str(self.pid[2])


@dataclass(eq=False)
class TensorRecord:
    """A tensor as ``_rebuild_tensor_v2(*args)`` would build it; pickles back to the same call."""

    args: tuple

    @property
    def storage(self) -> StorageRecord:
        return self.args[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.args[2])

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def _record_tensor(*args: Any) -> TensorRecord:
    if not isinstance(args[0], StorageRecord):
        raise NotRecordable("a tensor whose storage is not a persistent id")
    return TensorRecord(args)


def _allowed_globals() -> dict[str, Any]:
    """torch's weights-only globals plus numpy's; numpy's dtype and scalar go through the checks above."""
    allowed = dict(weights_only._get_allowed_globals())
    for entry in NUMPY_SCALAR_GLOBALS:
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__name__}")
        if name in NUMPY_SCALAR_NAMES:
            allowed[name] = _record_scalar
        elif obj is np.dtype or (isinstance(obj, type) and issubclass(obj, np.dtype)):
            allowed[name] = _DTypeRecord
        else:
            allowed[name] = obj
    return allowed


_NUMPY_SCALAR = next(e[0] for e in NUMPY_SCALAR_GLOBALS if isinstance(e, tuple))


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO):
        super().__init__(stream, encoding="utf-8")
        self.allowed = _allowed_globals()
        self.storage_order: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full == "torch._utils._rebuild_tensor_v2":
            return _record_tensor
        if module == "torch" and name.endswith("Storage"):
            storage_class = getattr(torch, name, None)  # pickled back as the same GLOBAL torch.<Type>Storage
            if isinstance(storage_class, type):
                return storage_class
        if "_rebuild" in name:
            raise NotRecordable(f"{full}: a tensor kind only a full load handles")
        if full not in self.allowed:
            raise NotRecordable(f"{full} is not allowed for weights-only loading")
        return self.allowed[full]

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NotRecordable(f"unexpected persistent id {pid!r}")
        record = StorageRecord(pid)
        if record.key not in self.storage_order:
            self.storage_order.append(record.key)
        return record


def loads(data: bytes) -> tuple[Any, list[str]]:
    """The snapshot with tensors as records, and the order its storages are first referenced in."""
    unpickler = _RecordingUnpickler(io.BytesIO(data))
    try:
        obj = _without_dtype_records(unpickler.load())
    except NotRecordable:
        raise
    except Exception as error:  # a damaged pickle: let the full path report it in its own words
        raise NotRecordable(f"unreadable pickle ({error})") from error
    return obj, unpickler.storage_order


def _without_dtype_records(obj: Any) -> Any:
    """Checked real dtypes in place of any dtype record left outside a scalar (iterative: no recursion)."""
    if isinstance(obj, _DTypeRecord):
        return obj.real()
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, _DTypeRecord):
                    value[key] = item.real()
                else:
                    stack.append(item)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, _DTypeRecord):
                    value[index] = item.real()
                else:
                    stack.append(item)
        elif isinstance(value, tuple):
            if any(isinstance(item, _DTypeRecord) for item in value):
                raise NeverWritten("a numpy dtype inside a tuple, which no snapshot holds")
            stack.extend(value)
    return obj


class _RecordPickler(pickle.Pickler):
    def __init__(self, stream: io.BytesIO):
        super().__init__(stream, protocol=2)
        self.storage_order: list[str] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRecord):
            if obj.key not in self.storage_order:
                self.storage_order.append(obj.key)
            return obj.pid
        return None


def dumps(obj: Any, expected_storage_order: list[str]) -> bytes:
    """Pickle ``obj`` as torch.save does (protocol 2), checking storages keep their order.

    torch may compute storage offsets assuming storages are first referenced in file
    order; a pickle that referenced them in another order could load wrong tensors, so
    a different order is an error, never written.
    """
    stream = io.BytesIO()
    pickler = _RecordPickler(stream)
    pickler.dump(obj)
    if pickler.storage_order != expected_storage_order:
        raise NotRecordable("the new pickle would reference storages in another order")
    return stream.getvalue()


def numpy_dialect(data: bytes) -> str | None:
    """Which numpy wrote the numpy scalars in a pickle: ``"numpy 1.x"`` (``numpy.core``), ``"numpy 2.x"``, or ``None``.

    The names differ, and a loader that allow-lists numpy by object accepts only the name
    its own numpy uses, so the same metrics load under one numpy and are refused under the other.
    """
    try:
        names = [str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]
    except Exception:  # a damaged pickle says nothing about numpy
        return None
    if any(name.startswith("numpy._core.") for name in names):
        return "numpy 2.x"
    if any(name.startswith("numpy.core.") for name in names):
        return "numpy 1.x"
    return None
