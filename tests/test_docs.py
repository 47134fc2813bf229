"""The commands on the getting-started and fixing pages, run on a broken copy of sample_project.

A ``console`` block is a session: each ``$ dlc-snapshot-fix ...`` line is run in order and its output must
be the lines shown under it (the project's path written as ``/path/to/project``). In a ``bash`` block every
``dlc-snapshot-fix`` line is run too and must neither be refused as a usage error nor print a traceback;
its other lines (activating an environment, ``pip install``) are what ``make dist-check`` does.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.deeplabcut

DOCS = Path(__file__).parents[1] / "docs"
PAGES = ("getting-started.md", "fixing.md")
SHOWN_PATH = "/path/to/project"
INSTALL_LINES = re.compile(r"^(conda activate|source |pip install )")
"""Lines run by `make dist-check` (the wheel into a fresh venv), not here."""


def blocks(page: Path) -> list[tuple[str, list[str]]]:
    """Every fenced block of a page: (its language, its lines)."""
    found = re.findall(r"^```(\w+)\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return [(language, body.splitlines()) for language, body in found]


def sessions(page: Path) -> list[tuple[str, list[str]]]:
    """Each ``$ command`` of the page's console blocks with the output lines shown under it."""
    shown: list[tuple[str, list[str]]] = []
    for language, lines in blocks(page):
        if language != "console":
            continue
        for line in lines:
            if line.startswith("$ "):
                shown.append((line[2:], []))
            else:
                shown[-1][1].append(line)
    return shown


def run(command: str, project: Path, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command.split(" #")[0])
    assert words[0] == "dlc-snapshot-fix", command
    arguments = [str(project) if word == SHOWN_PATH else word for word in words[1:]]
    return subprocess.run(
        [sys.executable, "-m", "dlc_snapshot_fix", *arguments], capture_output=True, text=True, cwd=cwd, check=False
    )


@pytest.fixture
def broken_project(tmp_path: Path) -> Path:
    """sample_project (as its page shows it: DeepLabCut 3.0.2's names) with two snapshots of a two-GPU rc5 run."""
    from conftest import SAMPLE

    from dlc_snapshot_fix.testing import break_like_two_gpu_rc5, copy_project

    ignore = shutil.ignore_patterns("*.pt", ".dlc-snapshot-fix", "evaluation-results*")
    project = copy_project(SAMPLE, tmp_path / "project", ignore=ignore)
    break_like_two_gpu_rc5(project)
    return project


def test_the_getting_started_page_shows_the_real_output(broken_project: Path):
    shown = sessions(DOCS / "getting-started.md")
    assert len(shown) >= 4, shown  # --check, the fix, the second run, restore
    for command, expected in shown:
        done = run(command, broken_project, broken_project.parent)
        printed = done.stdout.replace(str(broken_project), SHOWN_PATH).rstrip("\n").splitlines()
        assert printed == expected, f"{command}\n{done.stdout}{done.stderr}"
        assert done.returncode == (1 if "--check" in command else 0), done.stderr


@pytest.mark.parametrize("page", PAGES)
def test_every_command_on_the_page_runs(page: str, broken_project: Path):
    commands = [line for language, lines in blocks(DOCS / page) if language == "bash" for line in lines]
    commands = [line for line in commands if line.strip() and not line.startswith("#")]
    assert commands, page
    for command in commands:
        if INSTALL_LINES.match(command):
            continue
        done = run(command, broken_project, broken_project.parent)
        assert done.returncode in (0, 1, 3), f"{command}\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stdout + done.stderr, command
        if "--json" in command:
            assert (broken_project.parent / shlex.split(command)[-1]).is_file(), command


@pytest.mark.parametrize("markdown", ["README.md", "CHANGELOG.md", "BENCHMARKS.md"])
def test_relative_links_outside_the_site_lead_to_files(markdown: str):
    """The site's own links are checked by Sphinx (make docs fails on a missing page); these files are read on
    their own (on a forge, in an editor), so each relative link must name a file of the checkout."""
    root = DOCS.parent
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", (root / markdown).read_text(encoding="utf-8"))
    assert [target for target in targets if not (root / target).exists()] == []
