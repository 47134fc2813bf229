"""Structure-aware fuzzing: whatever a file named like a snapshot holds, the run goes on.

Mutants are made from a real rc5-style snapshot (numpy float64 metrics, ``module.``
keys) and, where DeepLabCut is installed, from every zoo snapshot (tests/zoo.py, tensors
cut to one element, every key and state kept): bytes changed in their zip local headers,
central directory, end records, member names and sizes; their ``data.pkl`` opcodes changed
and zipped again validly; pickles of arbitrary shape (types at every level, deep nesting)
saved by torch. Each mutant sits beside a good prefixed snapshot in a project. For ``rewrite``, ``append``, ``--check``
and ``inspect``: nothing raises, the odd file is named and never written unless it
migrated cleanly (then ``restore`` gives its bytes back), the good snapshot is still
migrated, and peak memory stays within the bound.

CI runs ``DLC_FUZZ_EXAMPLES`` (default 500) cases per property, derandomized; a long
run sets it (and ``DLC_FUZZ_RANDOM=1`` for new cases each time):
``DLC_FUZZ_EXAMPLES=25000 DLC_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import collections
import faulthandler
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN, TinyPose, make_project, wrapped_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oddfiles import nested_lists, rezip, snapshot_pickle

from dlc_snapshot_fix import load_snapshot, migrate_project, pickled, restore_project, verify, zipappend
from dlc_snapshot_fix.diagnose import diagnose
from dlc_snapshot_fix.reading import SnapshotReadError, numpy_allowed, read_recorded
from dlc_snapshot_fix.report import Status

EXAMPLES = int(os.environ.get("DLC_FUZZ_EXAMPLES", "500"))
PEAK_BOUND_MIB = 256
HANG_S = 120  # a hang detector, not a speed claim
MEASURES_PEAK_RSS = os.path.exists("/proc/self/clear_refs")
"""Linux resets a process's peak RSS on request; elsewhere (Windows, macOS) the bound is not measured, the runs are."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("DLC_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _saved(obj: object) -> bytes:
    stream = io.BytesIO()
    torch.save(obj, stream)
    return stream.getvalue()


def _rc5_snapshot() -> dict:
    torch.manual_seed(0)
    metadata = {"epoch": 3, "metrics": {"test.rmse": np.float64(2.5), "test.mAP": np.float64(0.5)}}
    return {"metadata": metadata, "model": wrapped_state_dict(TinyPose(), "dp")}


def _shrunk(obj: object) -> object:
    """``obj`` with every tensor cut to its first element: the pickle's structure (keys, metadata,
    optimizer and scheduler state, ``_metadata``) kept, the file a few hundred KB at most."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().reshape(-1)[:1].clone()
    if isinstance(obj, dict):
        shrunk = type(obj)((key, _shrunk(value)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):
            shrunk._metadata = obj._metadata
        return shrunk
    if isinstance(obj, (list, tuple)):
        return type(obj)(_shrunk(value) for value in obj)
    return obj


def _zoo_seeds() -> list[bytes]:
    """A seed per zoo snapshot (tests/zoo.py: every architecture DeepLabCut builds, detectors too), where
    DeepLabCut is installed to build it: 163 to 2,036 keys, pickles of 35 to 380 KB, AdamW and scheduler state."""
    if not verify.deeplabcut_available():
        return []
    import zoo

    return [_saved(_shrunk(load_snapshot(path))) for path in zoo.snapshots(zoo.cached_zoo())]


BASE = _saved(_rc5_snapshot())
GOOD = BASE
SEEDS = [BASE, *_zoo_seeds()]


def _regions(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of each zip structure in ``data``, found through Python's zipfile."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        central_start = archive.start_dir
    end_start = data.rfind(b"PK\x05\x06")
    zip64 = data.rfind(b"PK\x06\x06")
    regions: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for member in members:
        name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)
        payload = member.header_offset + 30 + name_len + extra_len
        regions["local header"].append((member.header_offset, payload))
        regions["member name"].append((member.header_offset + 30, member.header_offset + 30 + name_len))
        kind = "pickle" if member.filename.endswith("data.pkl") else "payload"
        regions[kind].append((payload, payload + member.compress_size))
    regions["central directory"].append((central_start, zip64 if 0 < zip64 < end_start else end_start))
    regions["end records"].append((min(p for p in (zip64, end_start) if p > 0), len(data)))
    return regions


SEED_REGIONS = [_regions(seed) for seed in SEEDS]
CENTRAL_FIELDS = {"compressed size": 20, "size": 24, "name length": 28, "extra length": 30, "offset": 42}


@st.composite
def zip_mutants(draw) -> bytes:
    """Bytes of a seed snapshot changed inside one zip structure, or its sizes set to extremes."""
    seed = draw(st.integers(0, len(SEEDS) - 1))
    base, regions = SEEDS[seed], SEED_REGIONS[seed]
    data = bytearray(base)
    kind = draw(st.sampled_from(["bytes", "field", "truncate"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "field":
        directory = regions["central directory"][0][0]
        records = [i for i in range(directory, len(data) - 4) if data[i : i + 4] == b"PK\x01\x02"]
        record = draw(st.sampled_from(records))
        field = CENTRAL_FIELDS[draw(st.sampled_from(sorted(CENTRAL_FIELDS)))]
        width = 2 if field in (28, 30) else 4
        top = 2 ** (8 * width) - 1
        value = draw(st.sampled_from([0, 1, top // 2, top]) | st.integers(0, top))
        data[record + field : record + field + width] = value.to_bytes(width, "little")
        return bytes(data)
    start, end = draw(st.sampled_from(regions[draw(st.sampled_from(sorted(regions)))]))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(start, max(start, end - 1)))
        patch = draw(st.binary(min_size=1, max_size=8))
        data[at : at + len(patch)] = patch
    return bytes(data[: len(base)]) if draw(st.booleans()) else bytes(data)


def _rezipped(pickle: bytes, base: bytes = BASE) -> bytes:
    """A seed snapshot zipped again (validly, by zipfile) around another ``data.pkl``."""
    out = io.BytesIO()
    rezip(io.BytesIO(base), out, pickle=pickle)
    return out.getvalue()


def _pickle_of(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


SEED_PICKLES = [_pickle_of(seed) for seed in SEEDS]
BASE_PICKLE = SEED_PICKLES[0]


@st.composite
def pickle_mutants(draw) -> bytes:
    """A valid zip whose ``data.pkl`` had opcodes replaced, inserted or deleted, or is nested deep."""
    if draw(st.integers(0, 9)) == 0:
        return _rezipped(snapshot_pickle(nested_lists(draw(st.integers(1, 200_000)))))
    seed = draw(st.integers(0, len(SEEDS) - 1))
    pickle = bytearray(SEED_PICKLES[seed])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(pickle)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        patch = draw(st.binary(min_size=1, max_size=6))
        if action == "replace":
            pickle[at : at + len(patch)] = patch
        elif action == "insert":
            pickle[at:at] = patch
        else:
            del pickle[at : at + len(patch)]
    return _rezipped(bytes(pickle), SEEDS[seed])


LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.builds(np.float64, st.floats())
    | st.builds(np.float32, st.floats(width=32))
    | st.builds(np.int64, st.integers(-(2**63), 2**63 - 1))
    | st.builds(torch.ones, st.integers(0, 3))
)
SHAPES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=12) | st.integers(), inner, max_size=4)
        | st.builds(collections.OrderedDict, st.dictionaries(st.text(max_size=20), inner, max_size=4))
    ),
    max_leaves=12,
)


@st.composite
def shape_mutants(draw) -> bytes:
    """torch.save of a snapshot with an arbitrary shape at one level: the whole, ``model``, a key, ``metadata``."""
    snapshot = _rc5_snapshot()
    shape = draw(SHAPES)
    where = draw(st.sampled_from(["whole", "model", "key", "metadata", "extra"]))
    if where == "whole":
        return _saved(shape)
    if where == "key":
        name = draw(st.sampled_from([*snapshot["model"], "module.extra", "other"]))
        snapshot["model"][name] = shape
    else:
        snapshot[where] = shape
    return _saved(snapshot)


MUTANTS = zip_mutants() | pickle_mutants() | shape_mutants()


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split(field + ":")[1].split()[0])


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    project, _, _ = _case(root, GOOD)
    diagnose(project)  # imports (DeepLabCut's loader, where installed) belong to the baseline, not to a case
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _case(scratch: Path, mutant: bytes) -> tuple[Path, Path, Path]:
    root = Path(tempfile.mkdtemp(dir=scratch))
    project = make_project(root / "p")
    good, odd = project / TRAIN / "snapshot-001.pt", project / TRAIN / "snapshot-002.pt"
    good.write_bytes(GOOD)
    odd.write_bytes(mutant)
    return project, good, odd


def _check_run(scratch: Path, mutant: bytes, run) -> None:
    (scratch / "last-case.bin").write_bytes(mutant)  # a crash (not an exception) leaves the case behind
    project, good, odd = _case(scratch, mutant)
    baseline = _kib("VmRSS") if MEASURES_PEAK_RSS else 0
    if MEASURES_PEAK_RSS:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # peak RSS counts from here
    faulthandler.dump_traceback_later(HANG_S, exit=True)  # a hang ends the test run, with every thread's stack
    try:
        run(project, good, odd)
    finally:
        faulthandler.cancel_dump_traceback_later()
    if MEASURES_PEAK_RSS:
        peak = (_kib("VmHWM") - baseline) / 1024
        assert peak <= PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB above the baseline"
    shutil.rmtree(project.parent, ignore_errors=True)


def _migrated(method: str):
    def run(project: Path, good: Path, odd: Path) -> None:
        before = odd.read_bytes()
        report = migrate_project(project, method=method, check_model=False)
        by_path = {r.path: r for r in report.results}
        assert by_path[good].status == Status.FIXED, by_path[good].describe()
        result = by_path[odd]  # named, whatever it holds
        if result.status == Status.FAILED:
            assert result.reason and odd.read_bytes() == before
        elif result.status == Status.FIXED:
            assert not any(k.startswith(("module.", "_orig_mod.")) for k in load_snapshot(odd)["model"])
            restore_project(project)
            assert odd.read_bytes() == before
        else:
            assert result.status == Status.CLEAN and odd.read_bytes() == before

    return run


def _checked(project: Path, good: Path, odd: Path) -> None:
    before = odd.read_bytes(), good.read_bytes()
    report = migrate_project(project, write=False, check_model=False)
    by_path = {r.path: r for r in report.results}
    assert by_path[good].status == Status.NEEDS_FIX
    assert by_path[odd].status in (Status.FAILED, Status.NEEDS_FIX, Status.CLEAN)
    assert (odd.read_bytes(), good.read_bytes()) == before
    assert not (project / ".dlc-snapshot-fix").exists()


def _inspected(project: Path, good: Path, odd: Path) -> None:
    before = odd.read_bytes()
    by_path = {d.path: d for d in diagnose(project)}
    assert by_path[good].error is None and by_path[good].prefixes == ("module.",)
    assert odd in by_path and odd.read_bytes() == before


@FUZZ
@given(mutant=MUTANTS)
def test_rewrite_survives_any_odd_file(scratch: Path, mutant: bytes):
    _check_run(scratch, mutant, _migrated("rewrite"))


@FUZZ
@given(mutant=MUTANTS)
def test_append_survives_any_odd_file(scratch: Path, mutant: bytes):
    _check_run(scratch, mutant, _migrated("append"))


@FUZZ
@given(mutant=MUTANTS)
def test_check_survives_any_odd_file_and_writes_nothing(scratch: Path, mutant: bytes):
    _check_run(scratch, mutant, _checked)


@FUZZ
@given(mutant=MUTANTS)
def test_inspect_survives_any_odd_file(scratch: Path, mutant: bytes):
    _check_run(scratch, mutant, _inspected)


@pytest.mark.skipif(not verify.deeplabcut_available(), reason="the zoo is built by DeepLabCut: not installed")
def test_the_mutants_come_from_every_zoo_architecture():
    """The seeds are the population: every zoo snapshot, HRNet-sized pickles, compiled keys, scheduler state."""
    import zoo

    assert len(SEEDS) == 1 + zoo.SNAPSHOT_COUNT  # the base snapshot, then every zoo snapshot
    assert max(len(pickle) for pickle in SEED_PICKLES) > 300_000
    assert any(b"_orig_mod." in pickle for pickle in SEED_PICKLES)
    assert any(b"Counter" in pickle for pickle in SEED_PICKLES)
    assert any(b"model.backbone.body" in pickle for pickle in SEED_PICKLES)  # Faster R-CNN's own names


def test_a_dtype_state_numpy_would_crash_on_is_refused_before_numpy_sees_it(tmp_path: Path):
    """Found by this suite: numpy's dtype.__setstate__ segfaults on a state one element short."""
    assert b"X\x01\x00\x00\x00<q\x0cNNN" in BASE_PICKLE
    crashing = _rezipped(BASE_PICKLE.replace(b"X\x01\x00\x00\x00<q\x0cNNN", b"X\x01\x00\x00\x00NN"))
    project, _, odd = _case(tmp_path, crashing)
    code = f"from dlc_snapshot_fix import migrate_project; print(migrate_project({str(project)!r}).results[1].reason)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]  # not -11 (SIGSEGV)
    assert "numpy dtype state" in done.stdout and "numpy would crash the process reading it" in done.stdout
    assert odd.read_bytes() == crashing


def test_a_memo_index_that_would_take_a_gigabyte_is_refused(scratch: Path):
    """Found by this suite: Python's unpickler sizes its memo by the largest index (LONG_BINPUT 72 million: 1 GiB)."""
    at = BASE_PICKLE.index(b"q\x0c")  # the first BINPUT after the dtype's byte order
    huge = _rezipped(BASE_PICKLE[:at] + b"r" + (72 << 20).to_bytes(4, "little") + BASE_PICKLE[at + 2 :])

    def run(project: Path, good: Path, odd: Path) -> None:
        result = {r.path: r for r in migrate_project(project, check_model=False).results}[odd]
        assert result.status == Status.FAILED and "memo index" in result.reason, result.describe()

    _check_run(scratch, huge, run)


def _same_as_torch(recorded: object, loaded: object, storages: dict[str, bytes]) -> bool:
    """The recorded snapshot is what torch loaded: structure, and each tensor's view of the bytes torch read."""
    if isinstance(recorded, pickled.TensorRecord):
        storage, offset, size, stride = recorded.args[:4]
        return (
            isinstance(loaded, torch.Tensor)
            and (tuple(loaded.shape), loaded.stride(), loaded.storage_offset()) == (size, stride, offset)
            and loaded.element_size() == storage.storage_type.itemsize
            and bytes(loaded.untyped_storage()) == storages[storage.key]
        )
    if isinstance(recorded, dict):
        return (
            type(loaded) is type(recorded)
            and list(loaded) == list(recorded)
            and getattr(recorded, "_metadata", None) == getattr(loaded, "_metadata", None)
            and all(_same_as_torch(recorded[k], loaded[k], storages) for k in recorded)
        )
    if isinstance(recorded, (list, tuple)):
        return (
            type(loaded) is type(recorded)
            and len(loaded) == len(recorded)
            and all(_same_as_torch(a, b, storages) for a, b in zip(recorded, loaded, strict=True))
        )
    return type(loaded) is type(recorded) and (loaded == recorded or (loaded != loaded and recorded != recorded))


@FUZZ
@given(mutant=MUTANTS)
def test_what_the_torch_free_reader_accepts_torch_loads_the_same(scratch: Path, mutant: bytes):
    """The torch-free reader (``--check`` and ``append`` use it) is never more lenient than torch.load.

    Whatever it accepts, ``torch.load(weights_only=True)`` loads too, memory-mapped (as this
    tool reads) and not (as DeepLabCut reads), to the same structure, every tensor with the
    shape, stride and offset recorded, over the bytes where the reader says its storage is.
    """
    path = scratch / "differential.pt"
    path.write_bytes(mutant)
    try:
        recorded = read_recorded(path)
    except (SnapshotReadError, pickled.NotRecordable):
        return  # refused, or left to torch's own judgement
    root = recorded.layout.records[0].name.split("/", 1)[0]
    by_name = {r.name: r for r in recorded.layout.records}
    keys = recorded.storage_order
    spans = zipappend.data_spans(path, [by_name[f"{root}/data/{key}"] for key in keys])
    storages = {key: mutant[start : start + length] for key, (start, length) in zip(keys, spans, strict=True)}
    for mmap in (False, True):
        with numpy_allowed():
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        assert _same_as_torch(recorded.snapshot, loaded, storages), f"mmap={mmap}"


def _deeplabcut_loads(source) -> bool:
    """DeepLabCut's own answer (its ``attempt_snapshot_load``, its allow-list, its default weights_only)."""
    try:
        verify.deeplabcut_load(source)
    except Exception:
        return False
    return True


@pytest.mark.skipif(not verify.deeplabcut_available(), reason="DeepLabCut is the judge here: not installed")
@FUZZ
@given(mutant=MUTANTS)
def test_what_the_tool_calls_loadable_deeplabcut_loads(scratch: Path, mutant: bytes):
    """Whatever a run calls clean or migrated, unless it says DeepLabCut refuses it, DeepLabCut's own loader loads.

    A check without the model check still speaks for DeepLabCut: ``clean`` means the file
    loads as it is, ``needs fix`` that the planned file will (a hint says where DeepLabCut
    will refuse it anyway: numpy values it does not allow-list). Then an append writes it
    (or fails, the file unchanged, as the properties above check), and its word must hold
    for the file on disk.
    """

    def run(project: Path, good: Path, odd: Path) -> None:
        checked = {r.path: r for r in migrate_project(project, write=False, check_model=False).results}[odd]
        if checked.status == Status.CLEAN and checked.ok:
            assert _deeplabcut_loads(odd), f"called loadable, DeepLabCut refuses it: {checked.describe()}"
        written = {r.path: r for r in migrate_project(project, method="append", check_model=False).results}[odd]
        if written.status in (Status.CLEAN, Status.FIXED) and written.ok:
            assert _deeplabcut_loads(odd), f"called {written.status.value}, DeepLabCut refuses it: {written.describe()}"
        if checked.status == Status.NEEDS_FIX and written.status == Status.FIXED:  # (or failed, unchanged: above)
            assert written.ok == checked.ok, (checked.describe(), written.describe())

    _check_run(scratch, mutant, run)
