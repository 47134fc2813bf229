"""What a migration costs on the drives archives live on: time and new data, per file system, against cp.

As root, each file system is really mounted (tests/mounts.py: ext4, btrfs and xfs with reflink
on loop images, exFAT through exfat-fuse, sshfs to a sshd on 127.0.0.1). On each, a reference
copy of the archive is laid out once; each measured command then runs on a fresh full copy of
it (made untimed), as its own process, page cache dropped, clock stopped once ``sync`` has
returned (bench_processes.run_process). Baselines in the same run and on the same drive:
``cp -a`` (which clones on btrfs and xfs) and ``cp -a --reflink=never`` (which copies).
"New data" is the drive's free space before minus after (``sync`` between), backups included.

    python benchmarks/bench_filesystems.py [--count 2] [--repeat 3] [--kinds ext4,btrfs,xfs,exfat,sshfs] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench_processes import PYTHON, REPO, TOOL, build, run_process
from mounts import KINDS, Mounts, missing


def free(point: Path) -> int:
    os.sync()
    return shutil.disk_usage(point).free


def measure(name: str, command: list[str], reference: Path, work: Path, point: Path, repeat: int) -> dict:
    """Median seconds and new data of ``command`` over ``repeat`` runs, each on a fresh copy of ``reference``."""
    times, added = [], []
    for _ in range(repeat):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(reference, work, copy_function=shutil.copyfile)  # a full copy: nothing shared yet
        before = free(point)
        seconds, _, _ = run_process(command)
        times.append(seconds)
        added.append(before - free(point))
    row = {"name": name, "seconds": statistics.median(times), "new_bytes": statistics.median(added), "runs": times}
    print(f"  {name}: {row['seconds']:.2f} s, {row['new_bytes'] / 1e6:.1f} MB new", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2, help="ResNet-50 snapshots (~95 MB each) in the archive")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "filesystems")
    args = parser.parse_args()
    if missing():
        sys.exit(f"cannot mount here: missing {', '.join(missing())}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"snapshots": args.count, "kinds": {}}
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks", prefix=".bench-fs-") as scratch:
        template = Path(scratch) / "template"
        build("resnet_50", template, args.count)
        size = sum(p.stat().st_size for p in template.rglob("*.pt"))
        print(f"{args.count} ResNet-50 snapshots, {size / 1e6:.0f} MB", flush=True)
        mounts = Mounts(Path(scratch) / "mounts")
        try:
            for kind in args.kinds.split(","):
                point = mounts.mount(kind, size_mb=max(1200, 6 * size >> 20))
                reference, work = point / "reference", point / "archive"
                shutil.copytree(template, reference, copy_function=shutil.copyfile)
                print(kind, flush=True)
                tool = [*TOOL, str(work), "--no-model-check", "-q"]
                rows = [
                    measure("cp -a", ["cp", "-a", str(reference), str(work) + "-copy"], reference, work, point, 1),
                ]
                shutil.rmtree(str(work) + "-copy")
                rows.append(
                    measure(
                        "cp -a --reflink=never",
                        ["cp", "-a", "--reflink=never", str(reference), str(work) + "-copy"],
                        reference,
                        work,
                        point,
                        1,
                    )
                )
                shutil.rmtree(str(work) + "-copy")
                rows.append(measure("append (archive default)", tool, reference, work, point, args.repeat))
                rows.append(measure("rewrite", [*tool, "--method", "rewrite"], reference, work, point, args.repeat))
                rows.append(
                    measure(
                        "--check",
                        [*TOOL, str(reference), "--check", "--no-model-check", "-q"],
                        reference,
                        work,
                        point,
                        args.repeat,
                    )
                )
                results["kinds"][kind] = rows
                mounts.unmount(point)
        finally:
            mounts.close()
    results["python"] = PYTHON
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| file system | cp -a | cp -a --reflink=never | append | rewrite | --check | rewrite: new data |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, rows in results["kinds"].items():
        by = {row["name"]: row for row in rows}
        cells = [f"{by[name]['seconds']:.2f} s" for name in ("cp -a", "cp -a --reflink=never")]
        cells += [f"{by[name]['seconds']:.2f} s" for name in ("append (archive default)", "rewrite", "--check")]
        print(f"| {kind} | " + " | ".join(cells) + f" | {by['rewrite']['new_bytes'] / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
