"""Shards of a lab archive, and one report from the reports of many shards.

An array job (SLURM, SGE, PBS, LSF) runs one task per shard; each task takes the projects
whose relative path hashes to its shard and writes its own JSON report. Merging them says
what every task did, and which tasks failed, were stopped, or never reported at all.
Nothing here imports torch: merging runs in a small job of its own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROW_FIELDS = (
    "project",
    "path",
    "status",
    "method",
    "kept_by",
    "new_bytes",
    "reason",
    "size",
    "sha256_before",
    "sha256_after",
    "seconds",
)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``: a stable hash of each project's path picks its shard."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None, environ: Mapping[str, str] | None = None, count: int | None = None) -> Shard:
        """``"I/N"`` (1-based I, as people count), else a scheduler's array variables, else the whole archive.

        ``count`` is the number of shards where the scheduler does not say it (PBS, LSF).
        """
        environ = os.environ if environ is None else environ
        try:
            if text:
                index, _, total = text.partition("/")
                shard = cls(int(index) - 1, int(total))
            else:
                shard = _shard_from_scheduler(environ, count) or cls()
                if count is not None and shard == cls():
                    raise ValueError(
                        f"a shard count ({count}) but no array index: none of {', '.join(SCHEDULER_INDEX)}"
                    )
        except ValueError as error:
            raise ValueError(f"cannot tell this task's shard: {error}") from None
        if count is not None and shard.count != count:
            raise ValueError(f"shard {shard} is not one of {count} shards")
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"shard {shard.index + 1}/{shard.count} is out of range; use I/N with 1 <= I <= N")
        return shard

    def owns(self, relative_path: str) -> bool:
        # the name's bytes on disk: the same shard under any locale (LC_ALL=C decodes 实验 into surrogates)
        digest = hashlib.sha256(os.fsencode(relative_path)).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"


SCHEDULER_INDEX = {
    "SLURM_ARRAY_TASK_ID": "SLURM",
    "SGE_TASK_ID": "SGE",
    "PBS_ARRAY_INDEX": "PBS Pro",
    "PBS_ARRAYID": "PBS/Torque",
    "LSB_JOBINDEX": "LSF",
}
"""The variable each scheduler sets in an array task (the first one set wins)."""


def _shard_from_scheduler(environ: Mapping[str, str], count: int | None) -> Shard | None:
    """This array task's shard from its scheduler's variables; None outside an array job.

    SLURM and SGE say where the array starts, its step and its size; PBS and LSF only give the
    index, so ``count`` (``--shard-count``) is needed there, and the array must be ``count``
    consecutive indices (``index mod count`` then names each shard once, from 0 or from 1).
    """
    variable = next((v for v in SCHEDULER_INDEX if environ.get(v, "").isdigit()), None)
    if variable is None:
        return None
    task = int(environ[variable])
    if variable == "SLURM_ARRAY_TASK_ID" and "SLURM_ARRAY_TASK_COUNT" in environ:
        first, step = int(environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
        given = int(environ["SLURM_ARRAY_TASK_COUNT"])
    elif variable == "SGE_TASK_ID" and environ.get("SGE_TASK_LAST", "").isdigit():
        first, step = int(environ.get("SGE_TASK_FIRST", "1")), int(environ.get("SGE_TASK_STEPSIZE", "1"))
        given = (int(environ["SGE_TASK_LAST"]) - first) // step + 1
    elif variable == "LSB_JOBINDEX" and task == 0:
        return None  # LSF sets 0 outside an array job
    else:
        if count is None:
            raise ValueError(
                f"{SCHEDULER_INDEX[variable]} gives the array index ({variable}={task}) but not the array's size; "
                "pass --shard-count N (N consecutive indices), or --shard I/N"
            )
        return Shard(task % count, count)
    if (task - first) % step:
        raise ValueError(f"{variable}={task} is not on the array's grid (first {first}, step {step})")
    return Shard((task - first) // step, given)


def write_rows_csv(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """One CSV row per snapshot, columns :data:`ROW_FIELDS`."""
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def report_files(paths: Iterable[Path]) -> list[Path]:
    """The JSON reports named, a folder standing for every ``*.json`` in it."""
    found: list[Path] = []
    for path in map(Path, paths):
        found += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return found


def merge_reports(paths: Iterable[Path], expected: int | None = None) -> dict[str, Any]:
    """One report from per-shard JSON reports: every row, and what each task did.

    ``expected`` is the number of shards the array had: a shard without a report is listed
    under ``missing_shards``; a report that cannot be read, or of another array, under
    ``ignored_reports`` (never fatal); one a task left while still running (killed before it
    could finish) has the state ``running``. ``complete``
    is true only when every shard finished, none was stopped and no snapshot failed.
    """
    merged: dict[str, Any] = {
        "root": None,
        "expected_shards": expected,
        "shards": [],
        "missing_shards": [],
        "ignored_reports": [],
        "interrupted": False,
        "snapshots": [],
        "skipped": [],
    }
    by_shard: dict[Shard, list[tuple[float, Path, dict[str, Any]]]] = {}
    for path in report_files(paths):
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
            shard, rows = Shard.parse(str(part["shard"])), list(part["snapshots"])
            if expected is not None and shard.count != expected:
                raise ValueError(f"shard {shard} is not one of {expected} shards")
            if not all(isinstance(row, dict) and "status" in row for row in rows):
                raise ValueError("a snapshot row without a status")
            by_shard.setdefault(shard, []).append((path.stat().st_mtime, path, part))
        except (OSError, ValueError, KeyError, TypeError) as error:
            merged["ignored_reports"].append({"file": str(path), "reason": f"{type(error).__name__}: {error}"})

    skipped: dict[str, dict[str, Any]] = {}
    for shard in sorted(by_shard, key=lambda shard: shard.index):
        *older, (_, path, part) = sorted(by_shard[shard], key=lambda found: found[0])
        for _, stale, _ in older:  # two files for one shard: the task's newer run wins
            merged["ignored_reports"].append({"file": str(stale), "reason": f"a newer report of shard {shard} exists"})
        state = part.get("state", "interrupted" if part.get("interrupted") else "finished")
        failed = sum(row["status"] == "failed" for row in part["snapshots"])
        merged["shards"].append(
            {
                "shard": str(shard),
                "file": str(path),
                "state": state,
                "snapshots": len(part["snapshots"]),
                "failed": failed,
            }
        )
        merged["root"] = merged["root"] or part.get("root")
        merged["interrupted"] |= state != "finished"
        merged["snapshots"] += part["snapshots"]
        for entry in part.get("skipped", []):  # every task sees the same skipped folders: list each once
            skipped.setdefault(str(entry.get("path")), entry)
    if expected is not None:
        reported = {shard.index for shard in by_shard}
        merged["missing_shards"] = [f"{i + 1}/{expected}" for i in range(expected) if i not in reported]
    merged["skipped"] = list(skipped.values())
    merged["snapshots"].sort(key=lambda row: (str(row.get("project")), str(row.get("path"))))
    merged["complete"] = not (
        merged["missing_shards"]
        or merged["ignored_reports"]
        or merged["interrupted"]
        or any(shard["failed"] for shard in merged["shards"])
        or any(entry.get("problem") for entry in merged["skipped"])
        or not by_shard
    )
    return merged
