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
from dataclasses import dataclass
from typing import Any

import torch
import torch._weights_only_unpickler as weights_only

from dlc_snapshot_fix.reading import NUMPY_SCALAR_GLOBALS


class NotRecordable(Exception):
    """The pickle uses something this reader does not record (another tensor kind, a refused global)."""


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
    allowed = dict(weights_only._get_allowed_globals())
    for entry in NUMPY_SCALAR_GLOBALS:
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__name__}")
        allowed[name] = obj
    return allowed


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
        obj = unpickler.load()
    except NotRecordable:
        raise
    except Exception as error:  # a damaged pickle: let the full path report it in its own words
        raise NotRecordable(f"unreadable pickle ({error})") from error
    return obj, unpickler.storage_order


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
