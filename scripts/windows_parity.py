"""The same commands on the same DeepLabCut-made project, on Linux and on a real Windows CPython: same results?

    python scripts/windows_parity.py make FOLDER        # Linux, DeepLabCut installed: FOLDER/archive, two copies
                                                        # of sample_project with rc5 two-GPU snapshots of its model,
                                                        # and FOLDER/three bodyparts (a project to adapt to)
    python scripts/windows_parity.py run FOLDER OUT     # any platform with DeepLabCut: the steps below on a copy
    python scripts/windows_parity.py compare A B        # exit 1 on any difference, printing each

Steps (each the installed command line, in a fresh process): --check, migrate, a second run,
restore, --method append, restore, an archive run with --jobs 2, inspect, inspect --against the
three-bodypart project, adapt to it. Recorded per step: the exit code, each snapshot's status,
changes, method and DeepLabCut's verdict (status and words), and the sha256 of every snapshot
file; for inspect what the file holds and the verdict; for adapt the adapted model's tensors
(names, shapes, dtypes, and the sha256 of the bytes of each one kept from the source: the
re-initialised ones hold DeepLabCut's random initialisation, other values on every run).
Paths are recorded relative to the folder.

--fix-metadata on both sides: the rc5 metrics are numpy scalars pickled under the Linux side's
numpy 2, and the Windows side runs numpy 1.26 (every numpy 2 fails under Wine 8.0), whose
DeepLabCut refuses them, so its verdict on them rightly differs (the tests check each side's
verdict against its own DeepLabCut); with the metrics made plain both sides judge the same
bytes. The notes saying why (which name the numpy each side runs) are left out.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIES = ("mouse A", "rat B")
INSPECTED = ("entries", "epoch", "metrics", "wrapper_prefixes", "parameters", "tensor_bytes", "head_shapes", "cause")
TARGET = "three bodyparts"


def make(folder: Path) -> None:
    from dlc_snapshot_fix.testing import break_like_two_gpu_rc5, make_sample_project

    archive = folder / "archive"
    shutil.rmtree(archive, ignore_errors=True)
    for name in COPIES:
        project = archive / name
        shutil.copytree(ROOT / "sample_project", project, ignore=shutil.ignore_patterns("*.pt", ".dlc-snapshot-fix"))
        shutil.rmtree(project / "evaluation-results-pytorch", ignore_errors=True)
        break_like_two_gpu_rc5(project)  # the model DeepLabCut builds from the project's config
    shutil.rmtree(folder / TARGET, ignore_errors=True)
    make_sample_project(folder / TARGET, ("head", "tail", "mid"))
    print(f"made {archive}: {len(list(archive.rglob('*.pt')))} snapshots")


def _snapshot_hashes(root: Path) -> dict[str, str]:
    from dlc_snapshot_fix.store import sha256_of

    return {
        p.relative_to(root).as_posix(): sha256_of(p)
        for p in sorted(root.rglob("*.pt"))
        if ".dlc-snapshot-fix" not in p.parts
    }


NUMPY_WHY = re.compile(r" \(DeepLabCut refuses them: they were pickled under numpy .*\)$")
"""Why the numpy scalars are made plain, which names the numpy each side runs (2.x here, 1.x under Wine)."""


def _portable(text: str | None, scratch: Path) -> str | None:
    """Words with this side's scratch folder named SCRATCH and / between folders, so both sides compare."""
    return None if text is None else text.replace(str(scratch), "SCRATCH").replace("\\", "/")


def _verdicts(model_check: dict | None, scratch: Path) -> dict:
    """DeepLabCut's verdict per entry ('model', 'detector'): status and words."""
    return {
        entry: (check["status"], _portable(check["reason"], scratch))
        for entry, check in sorted((model_check or {}).items())
    }


def _rows(report: Path, root: Path, scratch: Path) -> list[tuple]:
    data = json.loads(report.read_text(encoding="utf-8"))
    return sorted(
        (
            Path(r["path"]).relative_to(root).as_posix(),
            r["status"],
            tuple(NUMPY_WHY.sub("", change) for change in r.get("changes") or ()),
            r.get("method"),
            _verdicts(r.get("model_check"), scratch),
        )
        for r in data.get("snapshots", [])
    )


def _inspected(report: Path, root: Path, scratch: Path) -> list[list]:
    """What inspect says each file holds, and DeepLabCut's verdict on it with the fix it names."""
    return sorted(
        [
            Path(s["path"]).relative_to(root).as_posix(),
            *(s[k] for k in INSPECTED),
            _verdicts({"model": s["model_check"]}, scratch),
            _portable(s["fix"], scratch),
        ]
        for s in json.loads(report.read_text(encoding="utf-8"))
    )


def _tensors(adapted: Path, source: Path) -> dict[str, list]:
    """Every tensor of the adapted model: shape, dtype, and the sha256 of its bytes where it was kept from the
    source; a re-initialised one has DeepLabCut's random initialisation (other values on every run, here too)."""
    import hashlib

    import torch

    from dlc_snapshot_fix.verify import tensor_bytes, tensors_bit_identical

    model = torch.load(adapted, map_location="cpu", weights_only=True)["model"]
    original = torch.load(source, map_location="cpu", weights_only=True)["model"]  # migrated by the archive step
    return {
        key: [
            list(t.shape),
            str(t.dtype),
            hashlib.sha256(tensor_bytes(t)).hexdigest()
            if key in original and tensors_bit_identical(original[key], t)
            else "re-initialised",
        ]
        for key, t in sorted(model.items())
    }


def run(folder: Path, out: Path) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="parity-"))
    root = scratch / "archive"
    shutil.copytree(folder / "archive", root)
    target = shutil.copytree(folder / TARGET, scratch / TARGET)
    project = root / COPIES[0]
    best = next((root / COPIES[1]).rglob("snapshot-best-*.pt"))
    adapted = scratch / "adapted.pt"
    tool = [sys.executable, "-m", "dlc_snapshot_fix"]
    steps = [
        ("check", [project, "--check", "--fix-metadata"]),
        ("migrate", [project, "--fix-metadata"]),
        ("second run", [project, "--fix-metadata"]),
        ("restore", ["restore", project]),
        ("append", [project, "--fix-metadata", "--method", "append"]),
        ("restore after append", ["restore", project]),
        ("archive, --jobs 2", [root, "--fix-metadata", "--jobs", "2"]),
        ("inspect", ["inspect", root / COPIES[1]]),
        ("inspect --against", ["inspect", best, "--against", target]),
        ("adapt", ["adapt", best, "--target", target, "--output", adapted]),
    ]
    record = {}
    for name, args in steps:
        report = scratch / "report.json"
        report.unlink(missing_ok=True)
        json_report = [] if name == "adapt" else ["--json", str(report)]
        done = subprocess.run([*tool, *map(str, args), *json_report], capture_output=True, text=True)
        step: dict = {"exit code": done.returncode}
        if name == "adapt":
            step["tensors"] = _tensors(adapted, best) if adapted.exists() else {}
        elif name.startswith("inspect"):
            step["rows"] = _inspected(report, root, scratch) if report.exists() else []
        else:
            step["rows"] = _rows(report, root, scratch) if report.exists() else []
        step["snapshots"] = _snapshot_hashes(root)
        record[name] = step
        print(f"{name}: exit {done.returncode}, {len(step.get('rows') or step.get('tensors') or ())} rows", flush=True)
    out.write_text(json.dumps(record, indent=1, default=list), encoding="utf-8")
    shutil.rmtree(scratch, ignore_errors=True)


def compare(a: Path, b: Path) -> int:
    first, second = (json.loads(p.read_text(encoding="utf-8")) for p in (a, b))
    differences = [
        f"{step}, {what}: {first[step][what]!r}\n  vs {second.get(step, {}).get(what)!r}"
        for step in first
        for what in first[step]
        if first[step][what] != second.get(step, {}).get(what)
    ]
    print(*differences, sep="\n") if differences else print(f"the same: {len(first)} steps, every result and byte")
    return 1 if differences else 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "make":
        make(Path(rest[0]))
    elif command == "run":
        run(Path(rest[0]), Path(rest[1]))
    else:
        sys.exit(compare(Path(rest[0]), Path(rest[1])))
