"""``llamactl deploy k8s``: manifests from ``models.toml``; ``deploy entrypoint``: pods' commands.

Rendering reads each model's GGUF header for its memory estimate (as
``llamactl estimate`` does), so the model files must be on this machine (a
``hf:`` reference: pulled first, ``llamactl pull``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from buildtools.errors import LlamactlError
from procman.cli._app import app, console

if TYPE_CHECKING:
    from procman.config import ModelSection
    from procman.memory.estimate import Estimate

__all__ = ["deploy_app"]

deploy_app = typer.Typer(help="Deploy to Kubernetes: render manifests, check them, run pods.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command()
def k8s(
    *,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="The models.toml to deploy.")
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="Container image with llamactl and its llama-server.")
    ] = None,
    namespace: Annotated[str, typer.Option(help="Namespace of every object.")] = "default",
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write into.")] = None,
    memory_margin: Annotated[
        float, typer.Option(help="Percent of memory added to each model's estimate.", min=0)
    ] = 10.0,
    cpu: Annotated[str, typer.Option(help="CPU request and limit of each model pod.")] = "2",
    check: Annotated[
        Path | None,
        typer.Option("--check", help="Validate the manifests in this folder instead (offline)."),
    ] = None,
    kube_version: Annotated[
        list[str] | None,
        typer.Option("--kube-version", help="Kubernetes versions to check against [1.30, 1.37]."),
    ] = None,
    lws_crd: Annotated[
        Path | None,
        typer.Option(help="The LeaderWorkerSet CRD file, to check LeaderWorkerSets too."),
    ] = None,
) -> None:
    """Render Kubernetes manifests for a models.toml (router, models, RPC groups), or --check."""
    if check is not None:
        _check(check, kube_version or [], lws_crd)
        return
    if config is None or image is None or out is None:
        raise LlamactlError(
            "deploy k8s needs --config, --image and --out (or --check DIR)",
            hint="llamactl deploy k8s --config models.toml --image REGISTRY/IMAGE:TAG --out k8s/",
        )
    from procman.config import load_config  # speed
    from procman.deploy.k8s import Margins, render, write  # speed

    loaded = load_config(config)
    estimates = {name: _estimate(name, m) for name, m in loaded.models.items()}
    margins = Margins(memory_percent=memory_margin, cpu=cpu)
    rendered = render(
        loaded, image=image, namespace=namespace, estimates=estimates, margins=margins
    )
    for file in write(rendered, out):
        console.print(f"wrote {escape(str(file))}")
    console.print(
        "[dim]before `kubectl apply -f`: create the keys, e.g. kubectl create secret generic "
        "llamactl --from-literal=api-key=... --from-literal=replica-key=...[/]"
    )


def _estimate(name: str, model: ModelSection) -> Estimate:
    from procman.memory.estimate import estimate  # speed
    from procman.models.gguf import validate_model  # speed
    from procman.models.refs import resolve_model  # speed

    try:
        info = validate_model(resolve_model(model.path))
    except LlamactlError as exc:
        raise LlamactlError(
            f"models.{name}: {exc.message}",
            hint=exc.hint or "the estimate reads the model file: pull it first (llamactl pull)",
        ) from exc
    layers = model.gpu_layers if isinstance(model.gpu_layers, int) else 0
    if model.gpu_layers == "all" or model.rpc:
        layers = -1
    return estimate(info, ctx=model.ctx or 0, parallel=model.parallel, gpu_layers=layers)


def _check(directory: Path, versions: list[str], lws_crd: Path | None) -> None:
    from procman.deploy.check import VERSIONS, check_dir  # speed

    count, problems, notes = check_dir(directory, versions or VERSIONS, lws_crd)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    for problem in problems:
        console.print(f"[red]invalid:[/] {escape(str(problem))}")
    if problems:
        raise LlamactlError(f"{len(problems)} problems in {count} objects in {directory}")
    shown = ", ".join(versions or VERSIONS)
    console.print(f"[green]valid[/]: {count} objects in {escape(str(directory))} ({shown})")


@deploy_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def entrypoint(
    context: typer.Context,
    role: Annotated[str, typer.Argument(help="leader or worker")],
    *,
    rpc_port: Annotated[int, typer.Option(help="The workers' RPC port.")] = 50052,
    wait: Annotated[float, typer.Option(help="Seconds the leader waits for its workers.")] = 600,
) -> None:
    """A pod's command: read the LeaderWorkerSet environment, then run llamactl serve/worker.

    leader: ``llamactl deploy entrypoint leader -- serve MODEL ...``; worker: no arguments.
    """
    from procman.deploy import entry  # speed

    env = dict(os.environ)
    match role:
        case "worker":
            argv = entry.worker_argv(env, rpc_port)
        case "leader":
            serve = list(context.args)
            if not serve or serve[0] != "serve":
                raise LlamactlError(
                    "the leader runs `serve`: deploy entrypoint leader -- serve ..."
                )
            names = entry.worker_names(env, rpc_port)
            console.print(f"waiting for {len(names)} RPC workers: {escape(', '.join(names))}")
            argv = entry.leader_argv(serve, entry.wait_for_workers(names, wait))
        case _:
            raise LlamactlError(f"unknown role {role!r}", hint="leader or worker")
    console.print(f"[dim]llamactl {escape(' '.join(argv))}[/]")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "procman.cli", *argv])  # noqa: S606 - ourselves
