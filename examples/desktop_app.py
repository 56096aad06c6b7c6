"""A small desktop-style chat app that embeds llamactl's library (a terminal UI).

It shows the models it runs, their state and memory (RSS of the llama-server
process), and a chat box: each line you type is sent to the model's
OpenAI-compatible ``base_url`` (``/v1/chat/completions``) and the answer is
shown below it. State changes arrive as events while you type.

    python examples/desktop_app.py                  # the demo model, owned by this app
    python examples/desktop_app.py model.gguf --ctx 4096
    python examples/desktop_app.py --shared         # use (or start) the shared daemon

Commands in the chat box: ``/models`` redraws the model table, ``/quit`` exits
(Ctrl-D too). Owned servers end with the app, even if it is killed; the
daemon's servers stay up for other apps until it is idle.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import urllib.request
from typing import Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import procman
from procman import ServerInfo


def memory(pid: int | None) -> str:
    """The server's resident memory (``ServerInfo.rss`` has the same, as of the snapshot)."""
    if pid is None:
        return "-"
    try:
        return f"{psutil.Process(pid).memory_info().rss / 2**20:.0f} MiB"
    except psutil.Error:
        return "?"


def model_table(servers: list[ServerInfo]) -> Table:
    table = Table(title="models", title_justify="left")
    for column in ("name", "state", "pid", "memory", "base url"):
        table.add_column(column)
    for server in servers:
        table.add_row(
            server.name, str(server.state), str(server.pid), memory(server.pid), server.base_url
        )
    return table


def ask(server: ServerInfo, history: list[dict[str, str]], max_tokens: int) -> str:
    body = json.dumps({"messages": history, "max_tokens": max_tokens}).encode()
    # the server's own key: other local users cannot call it (see ServerInfo.api_key)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.api_key}"}
    request = urllib.request.Request(  # noqa: S310 - the model's own loopback URL
        f"{server.base_url}/chat/completions", body, headers
    )
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310
        answer: dict[str, Any] = json.load(resp)
    return str(answer["choices"][0]["message"]["content"]).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="demo")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--shared", action="store_true", help="use the shared daemon")
    options = parser.parse_args(argv)
    console = Console(highlight=False)
    events: queue.Queue[str] = queue.Queue()

    owner: procman.Supervisor | procman.DaemonClient
    if options.shared:
        owner = procman.connect()
    else:
        owner = procman.Supervisor()
        # called from the supervisor's loop thread: only hand the text over
        owner.on_event(lambda e: events.put(f"{e.server}: {e.state} ({e.reason})"))
    with owner:
        console.print(f"[dim]loading {options.model}...[/]")
        try:
            server = owner.serve(options.model, ctx=options.ctx)
        except procman.LlamactlError as exc:
            console.print(f"[red]cannot serve {options.model}:[/] {exc.message}")
            return 1

        def servers() -> list[ServerInfo]:
            if isinstance(owner, procman.DaemonClient):
                return list(owner.status().servers)
            return owner.status()

        console.print(model_table(servers()))
        history: list[dict[str, str]] = []
        while True:
            while not events.empty():
                console.print(f"[dim]event {escape(events.get())}[/]")
            try:
                text = console.input("[bold]you>[/] ").strip()
            except EOFError:
                break
            if text in {"/quit", "/exit"}:
                break
            if text == "/models":
                console.print(model_table(servers()))
                continue
            if not text or server.base_url is None:
                continue
            history.append({"role": "user", "content": text})
            try:
                answer = ask(server, history, options.max_tokens)
            except OSError as exc:
                console.print(f"[red]request failed:[/] {exc}")
                history.pop()
                continue
            history.append({"role": "assistant", "content": answer})
            console.print(f"[bold green]{escape(server.name)}>[/] {escape(answer)}")
    console.print("bye")
    return 0


if __name__ == "__main__":
    sys.exit(main())
