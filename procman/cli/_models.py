"""``llamactl pull`` and ``llamactl models``: get a model, see the ones already here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from procman._units import format_bytes
from procman.cli._app import app, console, out
from procman.cli._progress import LazyBar
from procman.errors import ModelError

if TYPE_CHECKING:
    from procman.models.discover import Found
    from procman.models.pull import PullProgress

__all__ = ["PullView", "models", "pull"]

#: the context ``llamactl models`` estimates memory for (the training context when smaller)
LIST_CTX = 4096


class PullView(LazyBar):
    """A rich progress bar for a pull; pass the instance as ``on_progress``. Draws nothing
    until the first report (a model already in the cache prints nothing)."""

    def __call__(self, p: PullProgress) -> None:
        progress = self._progress
        if progress is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )  # speed

            progress = self._start(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                description="",
                total=p.total,
            )
        part = f" [{p.part}/{p.parts}]" if p.parts > 1 else ""
        what = {"waiting": "waiting for another download of", "verifying": "verifying"}
        label = f"{what.get(p.stage, '')} {p.file}{part}".strip()
        progress.update(self._task, description=escape(label), completed=p.done, total=p.total)


@app.command()
def pull(
    ref: Annotated[
        str, typer.Argument(help="hf:ORG/REPO[:QUANT|/FILE.gguf][@REVISION]", show_default=False)
    ],
) -> None:
    """Download a GGUF model from Hugging Face into its cache (resumable, checksum verified).

    HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE work as with every
    Hugging Face tool. Prints the model's path on stdout.
    """
    from procman.models.hub import is_hf_ref  # speed
    from procman.models.pull import pull as run_pull  # speed

    if not is_hf_ref(ref):
        raise ModelError(
            f"cannot pull {ref!r}: only Hugging Face models are pulled",
            hint="write hf:ORG/REPO:QUANT, e.g. hf:bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M; "
            "local files, Ollama's and LM Studio's models are used in place (`llamactl models`)",
        )
    with PullView() as view:
        result = run_pull(ref, on_progress=view)
    if result.downloaded_bytes:
        console.print(
            f"[green]pulled[/] {escape(result.ref)}: {format_bytes(result.downloaded_bytes)} "
            f"downloaded, checksum verified (commit {result.commit[:12]})"
        )
    else:
        console.print(f"{escape(result.ref)}: already in the cache (commit {result.commit[:12]})")
    out.print(escape(str(result.path)))


models_app = typer.Typer(
    help="List the GGUF models on this machine; `models rm NAME` removes a pulled one.",
    no_args_is_help=False,
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(
    context: typer.Context,
    *,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON list on stdout.")] = False,
    folder: Annotated[
        list[Path] | None, typer.Option("--dir", help="Also list the .gguf files under DIR.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Also list the folders the file's model_dirs names."),
    ] = None,
) -> None:
    """List the GGUF models here: pulled ones, the Hugging Face cache, LM Studio, Ollama,
    and folders you name; each with what `estimate` predicts at a 4096-token context."""
    if context.invoked_subcommand is not None:
        return
    from procman.models.discover import default_stores, find_models  # speed

    folders = list(folder or ())
    if config is not None:
        from procman.config import load_config  # speed

        folders += [Path(d).expanduser() for d in load_config(config).server.model_dirs]
    rows = [_describe(found) for found in find_models(default_stores(folders=tuple(folders)))]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(
            "no GGUF models found (looked in the Hugging Face cache, LM Studio, Ollama and "
            "<llamactl home>/models); `llamactl pull hf:ORG/REPO:QUANT` fetches one"
        )
        return
    out.print(_table(rows))


def _describe(found: Found) -> dict[str, Any]:
    from procman.memory.estimate import estimate  # speed
    from procman.models.gguf import validate_model  # speed

    row: dict[str, Any] = {
        "ref": found.ref,
        "source": str(found.source),
        "path": str(found.path),
        "parts": found.parts,
        "size_bytes": _total_size(found),
    }
    try:
        info = validate_model(found.path)
    except ModelError as exc:
        return {**row, "error": exc.message}
    ctx = min(LIST_CTX, info.n_ctx_train)
    est = estimate(info, ctx=ctx)
    return {
        **row,
        "name": info.name,
        "architecture": info.architecture,
        "parameters": info.n_params,
        "quantization": info.file_type,
        "estimate": {"ctx": ctx, "host_bytes": est.host_bytes, "device_bytes": est.device_bytes},
    }


def _total_size(found: Found) -> int:
    paths = [found.path]
    if found.parts > 1:
        stem = found.path.name[: -len("00001-of-00000.gguf")]
        paths = sorted(found.path.parent.glob(f"{stem}*-of-*.gguf"))
    return sum(p.stat().st_size for p in paths if p.exists())


def _params(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Column, Table  # speed

    table = Table("arch", "params", "quant", "size", f"RAM @{LIST_CTX}", "source")
    table.columns.insert(0, Column("model", overflow="fold"))  # a reference is copied whole
    for row in rows:
        est = row.get("estimate") or {}
        table.add_row(
            escape(row["ref"]),
            escape(row.get("architecture") or "[red]unreadable[/]"),
            _params(row.get("parameters")),
            escape(row.get("quantization") or "-"),
            format_bytes(row["size_bytes"]),
            format_bytes(est.get("host_bytes")),
            escape(row["source"])
            + (f" [dim]({row['parts']} parts)[/]" if row["parts"] > 1 else ""),
        )
    return table


@models_app.command("rm")
def remove(
    name: Annotated[
        str, typer.Argument(help="The model, as `llamactl models` or `pull` names it.")
    ],
) -> None:
    """Remove a model llamactl pulled (never another tool's files)."""
    from procman.models import _pulled  # speed

    records = _pulled.load()
    entry = next((r for r in records if name in (r.get("ref"), r.get("path"))), None)
    if entry is None:
        entry = next(
            (r for r in records if name in (_listed_ref(r), f"{_listed_ref(r)}@{r.get('commit')}")),
            None,
        )
    if entry is None:
        pulled = ", ".join(sorted({str(r.get("ref")) for r in records})) or "none"
        raise ModelError(
            f"{name} was not pulled by llamactl, so llamactl does not remove it",
            hint=f"pulled by llamactl: {pulled}. Other tools' models (the Hugging Face cache, "
            "LM Studio, Ollama) are removed with those tools",
        )
    freed = _pulled.remove_files(entry)
    _pulled.forget(entry)
    console.print(f"removed {escape(str(entry.get('ref')))} ({format_bytes(freed)} freed)")


def _listed_ref(record: dict[str, Any]) -> str | None:
    """The name ``llamactl models`` shows for a pulled model: ``hf:ORG/REPO/FILE``."""
    files = record.get("files") or []
    return f"hf:{record.get('repo_id')}/{files[0]}" if files else None
