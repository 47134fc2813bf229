"""Every command's --help ends with examples a user can copy, and each example is a valid command line."""

from __future__ import annotations

import shlex

import click
import pytest
from click.testing import CliRunner

from dlc_snapshot_fix.cli import main


def _commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
        else:
            found.append(((*path, name), command))
    return found


def _command_of(words: list[str]) -> tuple[click.Command, list[str]]:
    """The command an example line runs, and its arguments (``migrate`` when none is named, as the tool does)."""
    command: click.Command = main
    while isinstance(command, click.Group) and words:
        if words[0] not in command.commands:
            assert command is main, words
            return main.commands["migrate"], words
        command, words = command.commands[words[0]], words[1:]
    return command, words


@pytest.mark.parametrize(
    "path, command", _commands(), ids=lambda value: " ".join(value) if isinstance(value, tuple) else ""
)
def test_help_ends_with_examples_that_name_real_commands_and_options(path: tuple[str, ...], command: click.Command):
    shown = CliRunner().invoke(main, [*path, "--help"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "Examples:")
    examples = [line.split("#")[0].strip() for line in lines[start + 1 :]]
    assert 1 <= len(examples) <= 2, examples
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "dlc-snapshot-fix", example
        ran, arguments = _command_of(words[1:])
        assert ran in [c for _, c in _commands(command)] if isinstance(command, click.Group) else ran is command
        options = {name for param in ran.params for name in (*param.opts, *param.secondary_opts)}
        assert {word for word in arguments if word.startswith("-")} <= options, example
        arguments_taken = [param for param in ran.params if isinstance(param, click.Argument)]
        positional = [w for w in arguments if not w.startswith("-")]
        assert len(positional) >= len([a for a in arguments_taken if a.required]), example
