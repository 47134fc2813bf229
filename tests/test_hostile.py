"""Hostile snapshots: refused without executing anything, naming what the pickle asked for."""

from __future__ import annotations

import builtins
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TRAIN, TinyPose, save_snapshot, wrapped_state_dict

from dlc_snapshot_fix import load_snapshot
from dlc_snapshot_fix.cli import main
from dlc_snapshot_fix.verify import deeplabcut_available


class Payload:
    """Unpickling this calls ``function(*args)``: what a malicious snapshot would do."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def payloads(canary: Path) -> dict[str, Payload]:
    touch = f"open({str(canary)!r}, 'w').write('ran')"
    return {
        "os.system": Payload(os.system, f"touch '{canary}'"),
        "builtins.eval": Payload(builtins.eval, touch),
        "builtins.exec": Payload(builtins.exec, touch),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(canary)]),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
def test_code_in_a_pickle_never_runs(project: Path, kind: str):
    canary = project.parent / "canary"
    hostile = save_snapshot(
        project / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"), extra=payloads(canary)[kind]
    )
    good = save_snapshot(project / TRAIN / "snapshot-006.pt", wrapped_state_dict(TinyPose(), "dp"))
    before = hostile.read_bytes()
    result = CliRunner().invoke(main, [str(project)], catch_exceptions=False)
    assert result.exit_code == 3
    function_name = kind.split(".")[-1]
    assert "snapshot-005.pt" in result.output and "refused" in result.output and function_name in result.output
    assert "--trust" in result.output
    assert not canary.exists()
    assert hostile.read_bytes() == before
    assert list(load_snapshot(good)["model"]) == list(TinyPose().state_dict())


def rename_member(source: Path, target: Path, rename, extra: tuple[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(rename(info.filename), old.read(info.filename))
        if extra:
            new.writestr(*extra)


@pytest.mark.parametrize("layout", ["only-upper-case", "beside-a-clean-one"])
def test_a_pickle_hidden_behind_a_member_name_case_trick(project: Path, tmp_path: Path, layout: str):
    canary = tmp_path / "canary"
    evil, clean = tmp_path / "evil.pt", tmp_path / "clean.pt"
    torch.save({"model": {"module.w": torch.ones(1)}, "metadata": payloads(canary)["os.system"]}, evil)
    torch.save({"model": {"module.w": torch.ones(1)}}, clean)
    target = project / TRAIN / "snapshot-005.pt"
    if layout == "only-upper-case":
        rename_member(evil, target, lambda name: name.replace("data.pkl", "DATA.PKL"))
    else:  # a checker reading data.pkl sees a clean pickle; torch 2.14 loads DATA.PKL
        with zipfile.ZipFile(evil) as archive:
            hidden = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        rename_member(clean, target, lambda name: name, extra=("clean/DATA.PKL", hidden))
    before = target.read_bytes()
    result = CliRunner().invoke(main, [str(project), "--trust"], catch_exceptions=False)
    assert result.exit_code == 3
    assert "DATA.PKL" in result.output and f"{os.system.__module__}.system" in result.output  # posix or nt
    assert "Do not load it, with or without --trust" in result.output
    assert not canary.exists()
    assert target.read_bytes() == before


def test_trust_is_the_only_way_past_the_allow_list_and_it_is_loud(project: Path, tmp_path: Path):
    """A harmless object outside the allow-list (a ``fractions.Fraction``) needs ``--trust``."""
    from fractions import Fraction

    path = save_snapshot(
        project / TRAIN / "snapshot-005.pt", wrapped_state_dict(TinyPose(), "dp"), extra=Fraction(1, 3)
    )
    refused = CliRunner().invoke(main, [str(project)], catch_exceptions=False)
    assert refused.exit_code == 3 and "fractions.Fraction" in refused.output
    trusted = CliRunner().invoke(main, [str(project), "--trust"], catch_exceptions=False)
    assert "WARNING: --trust" in trusted.output
    assert torch.load(path, weights_only=False)["extra"] == Fraction(1, 3)
    assert "fixed" in trusted.output
    if deeplabcut_available():  # the prefix is gone, but DeepLabCut's weights-only loader still refuses the Fraction
        assert trusted.exit_code == 3 and "snapshot loader refuses it: Unsupported global" in trusted.output
        config = project / TRAIN / "pytorch_config.yaml"
        config.write_text(config.read_text() + "runner:\n  load_weights_only: false\n")  # DeepLabCut's own switch
        again = CliRunner().invoke(main, [str(project), "--trust"], catch_exceptions=False)
        assert again.exit_code == 0 and "already clean" in again.output, again.output
    else:
        assert trusted.exit_code == 0, trusted.output
