"""``llamactl config init``: write a commented starter ``models.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from buildtools.errors import LlamactlError
from procman.cli._app import app, console

__all__ = ["config_app", "init"]

config_app = typer.Typer(help="Write and check config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write it.")] = Path("models.toml"),
    *,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starter config: two models on the demo model, every setting explained."""
    from procman.config import starter  # speed

    if path.exists() and not force:
        raise LlamactlError(f"{path} exists already", hint="pass --force to overwrite it")
    path.write_text(starter(), encoding="utf-8")
    console.print(f"wrote {escape(str(path))}; serve it with `llamactl serve --config {path}`")


@config_app.command()
def check(path: Annotated[Path, typer.Argument(help="The config file.")]) -> None:
    """Validate a config file (keys, values, model names) without serving it."""
    from procman.config import load_config  # speed

    loaded = load_config(path)
    console.print(f"{escape(str(path))}: ok, models {escape(', '.join(loaded.models))}")
