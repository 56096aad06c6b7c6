"""Each run imports only the module of the command it invokes; the map must stay complete."""

from __future__ import annotations

import sys

import pytest

from procman.cli._app import app
from procman.cli._commands import COMMANDS, register


def registered() -> dict[str, str]:
    """Command name -> the module that defined it, as typer holds them."""
    names = {}
    for command in app.registered_commands:
        assert command.callback is not None
        name = command.name or command.callback.__name__.replace("_", "-")
        names[name] = command.callback.__module__.rpartition(".")[2]
    for group in app.registered_groups:
        assert group.typer_instance is not None and group.name is not None
        # a sub-app belongs to the module that defines its commands
        modules = {
            c.callback.__module__.rpartition(".")[2]
            for c in group.typer_instance.registered_commands
            if c.callback is not None
        }
        assert len(modules) == 1, (group.name, modules)
        names[group.name] = modules.pop()
    return names


def test_every_command_is_mapped_to_the_module_that_defines_it() -> None:
    register([])  # --help and unknown commands import every module
    assert registered() == COMMANDS
    assert {f"procman.cli.{m}" for m in COMMANDS.values()} <= set(sys.modules)


def test_a_command_imports_only_its_own_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from procman.cli import _commands

    imported: list[str] = []
    monkeypatch.setattr(_commands.importlib, "import_module", imported.append)
    register(["serve", "m.gguf", "--port", "8080"])
    assert imported == ["procman.cli._serve"]
    imported.clear()
    register(["--help"])
    assert sorted(imported) == sorted({f"procman.cli.{m}" for m in COMMANDS.values()})
