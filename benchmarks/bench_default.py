"""Benchmark what a DeepLabCut user runs by default: DeepLabCut's verdict on, whole processes, cold page cache.

Every figure is one whole process (start-up and imports included), the page cache
dropped before it, the clock stopped after the process exited and ``sync`` returned; bytes
read from disk are the process's own (``wait4``'s ``ru_inblock``, 512-byte blocks), peak
RSS its ``ru_maxrss``. Each is the median of ``--repeat`` runs, each migration on a fresh
copy of the same archive. In the same run: ``cp -a``, the seed script (copy, ``torch.load``,
``k.replace``, ``torch.save``), a full ``torch.load`` of every snapshot, and the tool with
the user's signature cache cold (an empty folder, so DeepLabCut builds the model once) and
warm, with ``--no-model-check`` and with ``--deep-check`` (DeepLabCut's loader over every
byte: the default before signatures). Ratios are against ``--no-model-check`` of the same
command, measured in the same run.

    python benchmarks/bench_default.py [--count 16] [--repeat 3] [--out DIR]

The archive: ``--count`` ResNet-50 snapshots (DeepLabCut's model from sample_project's
config, saved through DataParallel as a two-GPU rc5 run saved them), 4 per project.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_migrate import settle_cache
from bench_processes import LOAD_SCRIPT, PYTHON, REPO, SEED_SCRIPT, TOOL, build


def run(command: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(seconds to durable completion, bytes read from disk, peak RSS in bytes) of one whole process."""
    settle_cache()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    os.sync()
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise RuntimeError(f"{command} exited {code}: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_inblock * 512, usage.ru_maxrss * 1024


def measure(name: str, command: list[str], *, template: Path | None, work: Path, repeat: int, cache: str) -> dict:
    """Median of ``repeat`` runs; ``cache``: ``cold`` (an empty signature cache each run), ``warm`` (filled once
    before the runs) or ``none`` (the command does not use it)."""
    runs = []
    cache_home = work.parent / f".cache-{name.replace(' ', '-')}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(cache_home)}
    if cache == "warm":
        shutil.rmtree(cache_home, ignore_errors=True)
        if template is not None:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(template, work, symlinks=True)
        subprocess.run(command, env=env, capture_output=True, check=False)  # fills the user's cache
    for _ in range(repeat):
        if cache == "cold":
            shutil.rmtree(cache_home, ignore_errors=True)
        if template is not None:
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(template, work, symlinks=True)
        runs.append(run(command, env))
    seconds, read, peak = (statistics.median(values) for values in zip(*runs, strict=True))
    print(f"  {name}: {seconds:.2f} s, {read / 1e6:,.0f} MB read, {peak / 2**20:,.0f} MiB", flush=True)
    return {"name": name, "seconds": seconds, "read_bytes": read, "peak_rss": peak, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "default")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    page_cache = settle_cache()
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks", prefix=".bench-") as scratch:
        scratch = Path(scratch)
        template, work = scratch / "template", scratch / "archive"
        build("resnet_50", template, args.count)
        project_template = template / "project-000"
        total = sum(p.stat().st_size for p in template.rglob("*.pt"))
        print(f"{args.count} ResNet-50 snapshots ({total / 1e9:.2f} GB), page cache {page_cache}", flush=True)
        archive, project = str(work), str(work)
        common = {"template": template, "work": work, "repeat": args.repeat}
        rows = [
            measure(
                "cp -a of the archive",
                ["cp", "-a", str(template), str(work)],
                **{**common, "template": None},
                cache="none",
            ),
            measure("seed script, archive", [PYTHON, "-c", SEED_SCRIPT, archive], **common, cache="none"),
            measure("full torch.load, archive", [PYTHON, "-c", LOAD_SCRIPT, archive], **common, cache="none"),
            measure("archive default, cache cold", [*TOOL, archive, "-q"], **common, cache="cold"),
            measure("archive default, cache warm", [*TOOL, archive, "-q"], **common, cache="warm"),
            measure("archive --no-model-check", [*TOOL, archive, "-q", "--no-model-check"], **common, cache="none"),
            measure("archive --deep-check", [*TOOL, archive, "-q", "--deep-check"], **common, cache="warm"),
            measure("archive --check, cache warm", [*TOOL, archive, "--check", "-q"], **common, cache="warm"),
            measure(
                "archive --check --no-model-check",
                [*TOOL, archive, "--check", "-q", "--no-model-check"],
                **common,
                cache="none",
            ),
        ]
        one = {"template": project_template, "work": work, "repeat": args.repeat}
        rows += [
            measure("project seed script", [PYTHON, "-c", SEED_SCRIPT, project], **one, cache="none"),
            measure("project default, cache cold", [*TOOL, project, "-q"], **one, cache="cold"),
            measure("project default, cache warm", [*TOOL, project, "-q"], **one, cache="warm"),
            measure("project --no-model-check", [*TOOL, project, "-q", "--no-model-check"], **one, cache="none"),
        ]
    by_name = {row["name"]: row for row in rows}
    ratios = {
        "archive default (warm) / --no-model-check": ("archive default, cache warm", "archive --no-model-check"),
        "archive --check (warm) / --check --no-model-check": (
            "archive --check, cache warm",
            "archive --check --no-model-check",
        ),
        "project default (cold) / seed script": ("project default, cache cold", "project seed script"),
        "archive --deep-check / default (warm)": ("archive --deep-check", "archive default, cache warm"),
    }
    print("\n| command | time | read from disk | peak RSS |\n| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['name']} | {row['seconds']:.2f} s | {row['read_bytes'] / 1e6:,.0f} MB | "
            f"{row['peak_rss'] / 2**20:,.0f} MiB |"
        )
    print("\n| ratio | time | disk reads |\n| --- | --- | --- |")
    for label, (a, b) in ratios.items():
        time_ratio = by_name[a]["seconds"] / by_name[b]["seconds"]
        read_ratio = by_name[a]["read_bytes"] / max(by_name[b]["read_bytes"], 1)
        print(f"| {label} | {time_ratio:.2f}x | {read_ratio:.2f}x |")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "page_cache": page_cache}, indent=2))


if __name__ == "__main__":
    main()
