"""The same commands on the same DeepLabCut-made project, on Linux and on a real Windows CPython: same results?

    python scripts/windows_parity.py make FOLDER        # Linux, DeepLabCut installed: FOLDER/archive, two copies
                                                        # of sample_project with rc5 two-GPU snapshots of its model
    python scripts/windows_parity.py run FOLDER OUT     # any platform: the steps below on a copy of FOLDER/archive
    python scripts/windows_parity.py compare A B        # exit 1 on any difference, printing each

Steps (each the installed command line, in a fresh process): --check, migrate, a second run,
restore, --method append, restore, an archive run with --jobs 2, inspect. Recorded per step:
the exit code, each snapshot's status, changes and method, and the sha256 of every snapshot
file. DeepLabCut's verdict is left out (--no-model-check): DeepLabCut runs on the Linux side
only. --fix-metadata on both sides: the rc5 metrics are numpy scalars, and what the tool does
with them by default depends on the numpy it runs with (the Windows run has numpy 1.26, as
every numpy 2 fails under Wine 8.0); the words saying why (which name the numpy) are left out.
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
INSPECTED = ("entries", "epoch", "metrics", "wrapper_prefixes", "parameters", "tensor_bytes", "head_shapes")


def make(folder: Path) -> None:
    from dlc_snapshot_fix.testing import build_pose_model, write_dataparallel_snapshots

    archive = folder / "archive"
    shutil.rmtree(archive, ignore_errors=True)
    for name in COPIES:
        project = archive / name
        shutil.copytree(ROOT / "sample_project", project, ignore=shutil.ignore_patterns("*.pt", ".dlc-snapshot-fix"))
        shutil.rmtree(project / "evaluation-results-pytorch", ignore_errors=True)
        train = next(project.glob("dlc-models-pytorch/iteration-*/*/train"))
        model = build_pose_model(train / "pytorch_config.yaml")  # DeepLabCut builds it from the project's config
        write_dataparallel_snapshots(train, model, epochs=(5, 10), best_epoch=10)
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


def _rows(report: Path, root: Path) -> list[tuple]:
    data = json.loads(report.read_text(encoding="utf-8"))
    return sorted(
        (
            Path(r["path"]).relative_to(root).as_posix(),
            r["status"],
            tuple(NUMPY_WHY.sub("", change) for change in r.get("changes") or ()),
            r.get("method"),
        )
        for r in data.get("snapshots", [])
    )


def run(folder: Path, out: Path) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="parity-"))
    root = scratch / "archive"
    shutil.copytree(folder / "archive", root)
    project = root / COPIES[0]
    tool = [sys.executable, "-m", "dlc_snapshot_fix"]
    plain = ["--no-model-check", "--fix-metadata"]
    steps = [
        ("check", [project, "--check", *plain]),
        ("migrate", [project, *plain]),
        ("second run", [project, *plain]),
        ("restore", ["restore", project]),
        ("append", [project, *plain, "--method", "append"]),
        ("restore after append", ["restore", project]),
        ("archive, --jobs 2", [root, *plain, "--jobs", "2"]),
        ("inspect", ["inspect", root / COPIES[1]]),
    ]
    record = {}
    for name, args in steps:
        report = scratch / "report.json"
        report.unlink(missing_ok=True)
        done = subprocess.run([*tool, *map(str, args), "--json", str(report)], capture_output=True, text=True)
        if name == "inspect":  # what the file holds; the exit code and notes say what DeepLabCut (absent there) does
            rows = sorted(
                [Path(s["path"]).relative_to(root).as_posix(), *(s[k] for k in INSPECTED)]
                for s in json.loads(report.read_text(encoding="utf-8"))
            )
            record[name] = {"rows": rows, "snapshots": _snapshot_hashes(root)}
        else:
            rows = _rows(report, root) if report.exists() else []
            record[name] = {"exit code": done.returncode, "rows": rows, "snapshots": _snapshot_hashes(root)}
        print(f"{name}: exit {done.returncode}, {len(rows)} rows", flush=True)
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
