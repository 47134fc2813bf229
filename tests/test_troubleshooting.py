"""docs/troubleshooting.md says every reason the code can give, and the reasons real runs print are on it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict
from test_bad_input import CASES

from dlc_snapshot_fix.cli import main

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "docs" / "troubleshooting.md"


def test_the_page_is_what_the_code_says():
    """Generated, not copied: a reason added to the code without regenerating the page fails here."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "troubleshooting.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def _templates() -> list[re.Pattern]:
    """Each reason on the page as a pattern (``…`` matching whatever the file put there), longest first."""
    page = PAGE.read_text(encoding="utf-8")
    entries = re.findall(r"^- ``(.*)``$", page, flags=re.M)
    entries += [
        cell for row in re.findall(r"^\| (.*) \|$", page, flags=re.M) for cell in row.split(" | ")[1:]
    ]  # the drive table: meaning and advice
    entries = [entry.replace("\\\\", "\\") for entry in entries]  # the table's Markdown escapes (C:\\dlc)
    patterns = [".+?".join(re.escape(part) for part in entry.split("…")) for entry in entries if entry.strip()]
    return [re.compile(pattern) for pattern in sorted(patterns, key=len, reverse=True)]


def unexplained(reason: str, templates: list[re.Pattern]) -> str:
    """What is left of a printed reason once every page entry it contains is taken out."""
    reason = " ".join(reason.split())
    for template in templates:
        reason = template.sub(" ", reason)
    return " ".join(word for word in re.split(r"[\s.;:,()]+", reason) if len(word) > 3)


@pytest.fixture
def odd_project(project: Path) -> Path:
    """Every bad-input case of tests/test_bad_input.py in one project, beside a good snapshot."""
    save_snapshot(project / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"))
    for make, _ in CASES.values():
        make(project / TRAIN)
    return project


def test_every_reason_a_run_prints_is_on_the_page(odd_project: Path):
    report = json.loads(CliRunner().invoke(main, [str(odd_project), "--json", "-"]).output)
    reasons = [s["reason"] for s in report["snapshots"] if s["status"] == "failed"]
    reasons += [s["reason"] for s in report["skipped"]]
    assert len([s for s in report["snapshots"] if s["status"] == "failed"]) == len(CASES), report
    templates = _templates()
    assert {reason: unexplained(reason, templates) for reason in reasons} == {reason: "" for reason in reasons}


def test_a_reason_the_page_lacks_is_found():
    """The check above can fail: a sentence no code says is not explained by the page."""
    assert unexplained("empty file (0 bytes), probably an interrupted copy", _templates()) == ""
    assert unexplained("the snapshot was eaten by a grue; feed it", _templates()) == "snapshot eaten grue feed"
