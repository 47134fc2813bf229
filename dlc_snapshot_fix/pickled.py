"""Read and rewrite a snapshot's ``data.pkl`` without building a single tensor, and without torch.

A ``torch.save`` file keeps every key name in one small pickle (``data.pkl``, ~30 KB
for a ResNet-50 pose model); the ~95 MB of tensor bytes sit in separate zip records
that the pickle refers to by *persistent id* ``('storage', type, key, location, numel)``.
Stripping a prefix therefore only needs a new ``data.pkl``. Here the pickle is read by
a restricted unpickler that resolves a handful of globals, a subset of what torch's
weights-only loader allows: ``collections.OrderedDict``, ``_codecs.encode`` (latin-1
only), torch's storage types as :class:`TorchName` placeholders, numpy's scalar and
numeric dtype (checked before numpy sees them). ``_rebuild_tensor_v2`` is *recorded* as a
:class:`TensorRecord` instead of called, and storages stay :class:`StorageRecord`
placeholders carrying their original persistent id, which :func:`dumps` writes back.

Nothing here imports torch (seconds and ~600 MB for a process that never builds a
tensor), and numpy only when a pickle names it. Anything else is :class:`NotRecordable`:
torch's own loader judges it.
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from dlc_snapshot_fix.reading import NUMPY_SCALAR_NAMES, numpy_scalar_globals


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

    def real(self) -> Any:
        import numpy as np  # a dtype record exists only where a pickle named numpy

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
    return _numpy_names()[1](real, data)


STORAGE_ITEMSIZE = {
    "FloatStorage": 4,
    "DoubleStorage": 8,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}
"""torch's typed storage classes a snapshot's tensors use, with their element size in bytes."""


class TorchName:
    """A torch global known by name only (``torch.FloatStorage``); pickled back as the same ``GLOBAL``.

    One object per name (:func:`torch_name`), so placeholders compare by identity as the
    classes they stand for do. Calling one is never right: it is what a pickle names, not torch.
    """

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:
        raise NotRecordable(f"{self} called: only torch's own loader does that")

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"

    __repr__ = __str__

    @property
    def itemsize(self) -> int:
        return STORAGE_ITEMSIZE[self.name]


@functools.cache
def torch_name(module: str, name: str) -> TorchName:
    return TorchName(module, name)


REBUILD_TENSOR_V2 = torch_name("torch._utils", "_rebuild_tensor_v2")


@dataclass(eq=False)
class StorageRecord:
    """A storage, known only by its persistent id; its bytes stay untouched in the zip."""

    pid: tuple

    @property
    def key(self) -> str:
        return str(self.pid[2])

    @property
    def storage_type(self) -> TorchName:
        return self.pid[1]

    @property
    def numel(self) -> int:
        return self.pid[4]

    def __setstate__(self, state: Any) -> None:
        raise NotRecordable("a pickle that sets state on a storage")


@dataclass(eq=False)
class TensorRecord:
    """A tensor as ``_rebuild_tensor_v2(*args)`` would build it; pickles back to the same call."""

    args: tuple

    @property
    def storage(self) -> StorageRecord:
        return self.args[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.args[2])

    @property
    def ndim(self) -> int:
        return len(self.args[2])

    def __reduce__(self):
        return (REBUILD_TENSOR_V2, self.args)

    def __setstate__(self, state: Any) -> None:
        raise NotRecordable("a pickle that sets state on a tensor")


def _record_tensor(*args: Any) -> TensorRecord:
    if not args or not isinstance(args[0], StorageRecord):
        raise NotRecordable("a tensor whose storage is not a persistent id")
    return TensorRecord(args)


def _encode_latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol 2 pickles ``bytes`` (latin-1 text); any other use is torch's to judge."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise NotRecordable(f"_codecs.encode with {type(text).__name__} and {encoding!r}")
    return text.encode("latin-1")


@functools.cache
def _numpy_names() -> tuple[dict[str, Any], Any]:
    """(numpy's allowed globals by name, numpy's scalar reconstructor); numpy is imported here, on first need."""
    import numpy as np

    allowed: dict[str, Any] = {}
    scalar = None
    for entry in numpy_scalar_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__name__}")
        if name in NUMPY_SCALAR_NAMES:
            allowed[name], scalar = _record_scalar, obj
        elif obj is np.dtype or (isinstance(obj, type) and issubclass(obj, np.dtype)):
            allowed[name] = _DTypeRecord
    return allowed, scalar


PLAIN_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "_codecs.encode": _encode_latin1,
    "torch._utils._rebuild_tensor_v2": _record_tensor,
}


class _RecordingUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO):
        super().__init__(stream, encoding="utf-8")
        self.storage_order: list[str] = []
        self.seen_storages: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in PLAIN_GLOBALS:
            return PLAIN_GLOBALS[full]
        if module == "torch" and name in STORAGE_ITEMSIZE:
            return torch_name(module, name)
        if module.split(".", 1)[0] == "numpy" and full in _numpy_names()[0]:
            return _numpy_names()[0][full]
        raise NotRecordable(f"{full}: only torch's own loader judges it")

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], TorchName)
            and pid[1].name in STORAGE_ITEMSIZE
            and type(pid[2]) is str
            and type(pid[3]) is str
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise NotRecordable(f"a persistent id torch.save does not write: {pid!r}")
        record = StorageRecord(pid)
        if record.key not in self.seen_storages:
            self.seen_storages.add(record.key)
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


_PythonPickler: Any = pickle._Pickler  # typeshed leaves out the private pickler's methods this class uses


class _RecordPickler(_PythonPickler):
    """Python's own pickler (the C one must import a global's module to write it: torch), plus torch names.

    For what a snapshot holds it writes the same bytes as the C pickler ``torch.save`` uses.
    """

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def __init__(self, stream: io.BytesIO, numpy_dialect: str | None = None):
        super().__init__(stream, protocol=2)
        self.storage_order: list[str] = []
        self._seen: set[str] = set()
        self._scalar_module = SCALAR_MODULES.get(numpy_dialect or "")

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is StorageRecord:
            if obj.key not in self._seen:
                self._seen.add(obj.key)
                self.storage_order.append(obj.key)
            return obj.pid
        return None

    _never_memoized: ClassVar[dict] = {
        int: _PythonPickler.save_long,
        bool: _PythonPickler.save_bool,
        float: _PythonPickler.save_float,
        type(None): _PythonPickler.save_none,
    }

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        """Numbers and ``None`` straight to their writer: what the full ``save`` does for them, without the lookups.

        They are never a persistent id and never memoized; at protocol 2 there are no frames.
        Half of a snapshot's objects are numbers (offsets, sizes, strides).
        """
        writer = self._never_memoized.get(type(obj))
        if writer is not None:
            writer(self, obj)
        else:
            super().save(obj, save_persistent_id)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        """numpy's scalar under the name the original pickle gave it (a numpy-1.x file stays one under numpy 2)."""
        if self._scalar_module is not None and obj is _numpy_names()[1]:
            self.write(pickle.GLOBAL + f"{self._scalar_module}\nscalar\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def save_torch_name(self, obj: TorchName) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[TorchName] = save_torch_name


def dumps(obj: Any, expected_storage_order: list[str], numpy_dialect: str | None = None) -> bytes:
    """Pickle ``obj`` as torch.save does (protocol 2), checking storages keep their order.

    torch may compute storage offsets assuming storages are first referenced in file
    order; a pickle that referenced them in another order could load wrong tensors, so
    a different order is an error, never written. ``numpy_dialect`` (see
    :func:`numpy_dialect`): the numpy whose names numpy scalars are written under, as the
    original had them (default: the running numpy's).
    """
    stream = io.BytesIO()
    pickler = _RecordPickler(stream, numpy_dialect)
    try:
        pickler.dump(obj)
    except NotRecordable:
        raise
    except (pickle.PicklingError, TypeError, ValueError, AttributeError, RecursionError) as error:
        raise NotRecordable(f"cannot be pickled again as it was read ({error})") from error
    if pickler.storage_order != expected_storage_order:
        raise NotRecordable("the new pickle would reference storages in another order")
    return stream.getvalue()


def require_canonical(obj: Any, order: list[str], data: bytes) -> None:
    """Accept what :func:`loads` read from ``data`` only if pickling it again gives ``data`` byte for byte.

    Python's unpickler is more lenient than torch's weights-only one (``SETITEM`` on a
    list, ``BUILD`` on anything with a ``__dict__``, ...). A pickle that is exactly what a
    pickler writes for the objects read holds none of those tricks, so what was read is
    what torch reads. Anything else goes to torch's own loader.
    """
    if dumps(obj, order, scalar_dialect(data)) != data:
        raise NotRecordable("its data.pkl is not exactly what torch.save writes for what it holds")


def records_in(obj: Any) -> list[TensorRecord]:
    """Tensor records in pickling order (first reference); iterative, so any nesting depth is fine."""
    found: list[TensorRecord] = []
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, TensorRecord):
            found.append(value)
        elif isinstance(value, dict):
            stack.extend(reversed(value.values()))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed(value))
    return found


SCALAR_MODULES = {"numpy 1.x": "numpy.core.multiarray", "numpy 2.x": "numpy._core.multiarray"}
"""Where each numpy's pickles name the scalar reconstructor."""


def scalar_dialect(data: bytes) -> str | None:
    """:func:`numpy_dialect`, read only from a pickle that names numpy's scalar at all (most snapshots do not)."""
    return numpy_dialect(data) if b"multiarray\nscalar\n" in data else None


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
