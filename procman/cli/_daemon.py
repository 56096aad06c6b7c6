"""``llamactl daemon``: run the shared daemon in the foreground (clients start it on demand).

The daemon itself, its files and its protocol are in :mod:`procman.daemon.service`;
this module only parses options and reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from procman.cli._app import app, console

__all__ = ["daemon"]


@app.command()
def daemon(
    *,
    idle_timeout: Annotated[
        str,
        typer.Option(help="Exit after this long with no client and no request (30s, 5m, 1h)."),
    ] = "5m",
    socket: Annotated[
        Path | None,
        typer.Option(
            help="Unix socket to listen on (default: <llamactl home>/daemon/daemon.sock)."
        ),
    ] = None,
    status: Annotated[
        bool, typer.Option("--status", help="Print the running daemon's servers and exit.")
    ] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Ask the running daemon to exit.")] = False,
    http: Annotated[
        int | None,
        typer.Option(
            "--http",
            metavar="PORT",
            help="Also serve the router (OpenAI API, admin API, dashboard at /ui) on "
            "127.0.0.1:PORT (0: any free port), with a random key kept in the daemon's "
            "http.json.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Share one supervisor between many programs through a Unix socket.

    `procman.connect()` starts it (detached) when none runs; run it by hand to
    watch its log or to choose its socket and idle timeout.
    """
    from procman._units import duration_option  # speed
    from procman.daemon.service import DaemonPaths, run_daemon  # speed

    if status or stop:
        from procman.daemon.client import connect  # speed

        with connect(socket_path=socket, start=False) as client:
            if stop:
                client.stop_daemon()
                console.print("daemon stopping")
                return
            info = client.status()
        console.print(f"daemon pid {info.pid}, {info.clients - 1} other client(s)")
        if info.http is not None:
            where = DaemonPaths.default(socket).http_info
            console.print(f"  router {info.http}/v1, dashboard {info.http}/ui (key in {where})")
        for server in info.servers:
            console.print(f"  {server.name}: {server.state} pid {server.pid} {server.base_url}")
        return
    seconds = duration_option(idle_timeout, "--idle-timeout")
    paths = DaemonPaths.default(socket)
    console.print(f"daemon on {paths.socket} (exits after {seconds:.0f} s idle; Ctrl-C stops)")
    if http is not None:
        console.print(f"router on 127.0.0.1, its URL and key in {paths.http_info}")
    if not run_daemon(socket_path=socket, idle_timeout=seconds, http_port=http):
        console.print("[yellow]a daemon is already running[/]: use it, or `llamactl daemon --stop`")
        raise typer.Exit(1)
    console.print("daemon stopped")
