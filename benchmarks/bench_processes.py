"""Benchmark what a user pays: whole processes, page cache dropped, timed to durable completion.

Each command runs as its own process, start-up and imports included, as a user would run
it; the page cache is dropped before each (where the machine allows it; the output says
which), and the clock stops after the process has exited and ``sync`` has returned. Peak
RSS is the process's own (``wait4``'s ``ru_maxrss``). Each figure is the median of
``--repeat`` runs, each migration on a fresh copy of the same archive. Baselines measured
in the same run: ``cp -a`` of the archive, the common script (copy backup, ``torch.load``,
``k.replace``, ``torch.save``), and a full ``torch.load`` of every snapshot. Both methods also
run with ``--jobs 2`` (two projects at once, each in its own worker process): whether a second
process buys anything on this machine (it decides whether snapshots within one project should
be spread over processes too).

    python benchmarks/bench_processes.py [--count 16] [--repeat 3] [--scale 16,64,256] [--big-gb 1.2] [--out DIR]
                                         [--net-type hrnet_w32]

The archive: ``--count`` snapshots with the ResNet-50 pose model's key set and shapes from
``sample_project`` (~95 MB each, saved as a two-GPU DeepLabCut 3.0.0rc5 run saved them), 4 per
project; ``--net-type`` another pose model DeepLabCut builds from its own config (HRNet-w32:
~117 MB, 1,834 keys, a ``data.pkl`` of ~0.33 MB, which the append leaves to the rewrite).
Then one snapshot of ``--big-gb`` GB (default 1.2), rewritten and appended once each
(peak RSS must not grow with the snapshot). The scale runs use small snapshots (one conv layer,
~40 KB) to reach 256 cheaply; besides the time per snapshot it prints what each snapshot
added beyond the previous, smaller archive (the start-up is spread over the first).
Writes ``results.json`` and ``scale.png`` to ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_migrate import TRAIN, make_template, project_skeleton, settle_cache

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TOOL = [PYTHON, "-m", "dlc_snapshot_fix"]

SEED_SCRIPT = r"""
import shutil, sys, torch
from pathlib import Path
for path in sorted(Path(sys.argv[1]).rglob("snapshot-*.pt")):
    shutil.copy(path, str(path) + ".bak")
    snapshot = torch.load(path, map_location="cpu", weights_only=True)
    snapshot["model"] = {k.replace("module.", ""): v for k, v in snapshot["model"].items()}
    torch.save(snapshot, path)
"""
LOAD_SCRIPT = r"""
import sys, torch
from pathlib import Path
for path in sorted(Path(sys.argv[1]).rglob("snapshot-*.pt")):
    torch.load(path, map_location="cpu", weights_only=True)
"""


def run_process(command: list[str], cache: bool = True) -> tuple[float, int, int]:
    """One whole process: (seconds to durable completion, peak RSS in bytes, exit code)."""
    if cache:
        settle_cache()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    os.sync()
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{command} exited {process.returncode}: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, process.returncode


def measure(name: str, command: list[str], template: Path | None, work: Path, repeat: int) -> dict:
    """Median time and peak RSS of ``command`` over ``repeat`` runs (on a fresh copy of ``template``)."""
    times, peaks = [], []
    for _ in range(repeat):
        if template is not None:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(template, work, symlinks=True)
        seconds, peak, _ = run_process(command)
        times.append(seconds)
        peaks.append(peak)
    print(f"  {name}: {statistics.median(times):.3f} s, {statistics.median(peaks) / 2**20:.0f} MiB", flush=True)
    return {"name": name, "seconds": statistics.median(times), "peak_rss": statistics.median(peaks), "runs": times}


def small_archive(root: Path, count: int, per_project: int = 4) -> None:
    """``count`` small DataParallel snapshots (a conv layer and a BatchNorm), ``per_project`` to a project."""
    import torch

    model = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7), torch.nn.BatchNorm2d(64)))
    for i in range(count):
        project = project_skeleton(root / f"project-{i // per_project:03d}")
        torch.save({"metadata": {"epoch": 1}, "model": model.state_dict()}, project / TRAIN / f"snapshot-{i:03d}.pt")


def build(kind: str, folder: Path, count: float) -> None:
    """Make an archive in a child process, so that this one never imports torch.

    A child's peak RSS (``ru_maxrss``) starts from its parent's at ``fork`` and survives
    ``exec``: measured from a parent that had imported torch, even ``python -c pass``
    would report a gigabyte.
    """
    subprocess.run([PYTHON, __file__, "--make", kind, str(folder), str(count)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", default="16,64,256")
    parser.add_argument("--big-gb", type=float, default=1.2, help="also one snapshot of this many GB (0: none)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--net-type", default="resnet_50", help="the archive's pose model, as DeepLabCut builds it (e.g. hrnet_w32)"
    )
    parser.add_argument("--make", nargs=3, metavar=("KIND", "DIR", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:  # in a child process: this one must stay small (see build)
        kind, folder, count = args.make
        if kind == "big":
            make_template(Path(folder), 0, float(count))
        elif kind == "small":
            small_archive(Path(folder), int(count))
        else:
            make_template(Path(folder), int(count), 0, net_type=kind)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cache = settle_cache()
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks", prefix=".bench-") as scratch:
        scratch = Path(scratch)
        template, work = scratch / "template", scratch / "archive"
        build(args.net_type, template, args.count)
        size = max(p.stat().st_size for p in template.rglob("*.pt"))
        total = sum(p.stat().st_size for p in template.rglob("*.pt"))
        print(
            f"{args.count} {args.net_type} snapshots of {size / 1e6:.1f} MB ({total / 1e9:.2f} GB), page cache {cache}",
            flush=True,
        )
        rows = [
            measure("cp -a of the archive", ["cp", "-a", str(template), str(work)], None, work, args.repeat),
            measure("seed script", [PYTHON, "-c", SEED_SCRIPT, str(work)], template, work, args.repeat),
            measure("append", [*TOOL, str(work), "--no-model-check", "-q"], template, work, args.repeat),
            measure(
                "rewrite", [*TOOL, str(work), "--no-model-check", "-q", "--method", "rewrite"], template, work, 3
            ),
            measure("append, --jobs 2", [*TOOL, str(work), "--no-model-check", "-q", "-j", "2"], template, work, 3),
            measure(
                "rewrite, --jobs 2",
                [*TOOL, str(work), "--no-model-check", "-q", "--method", "rewrite", "-j", "2"],
                template,
                work,
                3,
            ),
            measure("torch.load of every snapshot", [PYTHON, "-c", LOAD_SCRIPT, str(template)], None, work, 3),
            measure("--check", [*TOOL, str(template), "--check", "--no-model-check", "-q"], None, work, 3),
            measure("--help", [*TOOL, "--help"], None, work, args.repeat),
            measure("plugin status", [*TOOL, "plugin", "status"], None, work, args.repeat),
            measure("python -c pass", [PYTHON, "-c", "pass"], None, work, args.repeat),
            measure(
                "python + the plugin's start-up line",
                [PYTHON, "-c", "from dlc_snapshot_fix import autoload; exec(autoload.PTH_LINE)"],
                None,
                work,
                args.repeat,
            ),
        ]
        shutil.rmtree(work, ignore_errors=True)
        if args.big_gb:
            big = scratch / "big"
            build("big", big, args.big_gb)
            gigabytes = sum(p.stat().st_size for p in big.rglob("*.pt")) / 1e9
            print(f"one snapshot of {gigabytes:.2f} GB", flush=True)
            for method in ("rewrite", "append"):
                command = [*TOOL, str(work), "--no-model-check", "-q", "--method", method]
                rows.append(measure(f"{method}, one {gigabytes:.2f} GB snapshot", command, big, work, 1))
            shutil.rmtree(big)
            shutil.rmtree(work, ignore_errors=True)
        by = {row["name"]: row for row in rows}
        ratios = {
            "seed/append": by["seed script"]["seconds"] / by["append"]["seconds"],
            "cp/append": by["cp -a of the archive"]["seconds"] / by["append"]["seconds"],
            "load/check": by["torch.load of every snapshot"]["seconds"] / by["--check"]["seconds"],
            "seed/rewrite": by["seed script"]["seconds"] / by["rewrite"]["seconds"],
            "append/append -j2": by["append"]["seconds"] / by["append, --jobs 2"]["seconds"],
            "rewrite/rewrite -j2": by["rewrite"]["seconds"] / by["rewrite, --jobs 2"]["seconds"],
        }
        scale = []
        for count in [int(n) for n in args.scale.split(",") if n]:
            shutil.rmtree(template)
            build("small", template, count)
            print(f"scale: {count} small snapshots", flush=True)
            for name, command, source in (
                ("append", [*TOOL, str(work), "--no-model-check", "-q"], template),
                ("--check", [*TOOL, str(template), "--check", "--no-model-check", "-q"], None),
            ):
                row = measure(f"{name} x{count}", command, source, work, args.repeat)
                scale.append({"method": name, "count": count, **row})
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "net_type": args.net_type,
        "page_cache": cache,
        "snapshots": args.count,
        "snapshot_bytes": size,
        "rows": rows,
        "ratios": ratios,
        "scale": scale,
        "scale_added_ms_per_snapshot": marginal_costs(scale),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if scale:
        plot(scale, args.out / "scale.png")
    print("\n| command | time (s) | peak RSS (MiB) |\n| --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['seconds']:.3f} | {row['peak_rss'] / 2**20:.0f} |")
    print("\n" + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("\n| method | snapshots | time per snapshot (ms) | added per snapshot (ms) | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row, added in zip(scale, marginal_costs(scale), strict=True):
        per = 1000 * row["seconds"] / row["count"]
        more = f"{added:.1f}" if added is not None else "-"
        print(f"| {row['method']} | {row['count']} | {per:.1f} | {more} | {row['peak_rss'] / 2**20:.0f} |")


def marginal_costs(scale: list[dict]) -> list[float | None]:
    """What each snapshot added to the run beyond the previous, smaller archive of the same method (ms).

    The whole-process time per snapshot also spreads the start-up over the archive; this
    separates the two.
    """
    costs: list[float | None] = []
    previous: dict[str, dict] = {}
    for row in scale:
        before = previous.get(row["method"])
        if before is None:
            costs.append(None)
        else:
            costs.append(1000 * (row["seconds"] - before["seconds"]) / (row["count"] - before["count"]))
        previous[row["method"]] = row
    return costs


def plot(scale: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({row["method"] for row in scale}):
        rows = [row for row in scale if row["method"] == method]
        counts = [row["count"] for row in rows]
        left.plot(counts, [1000 * row["seconds"] / row["count"] for row in rows], marker="o", label=method)
        right.plot(counts, [row["peak_rss"] / 2**20 for row in rows], marker="o", label=method)
    left.set(xscale="log", xlabel="snapshots in the archive", ylabel="whole-process time per snapshot (ms)")
    right.set(xscale="log", xlabel="snapshots in the archive", ylabel="peak RSS (MiB)")
    counts = sorted({row["count"] for row in scale})
    for axis in (left, right):
        axis.minorticks_off()
        axis.set_xticks(counts, labels=[str(count) for count in counts])
        axis.set_ylim(0, axis.get_ylim()[1] * 1.15)  # from 0: flat is flat, not a zoomed-in slope
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
