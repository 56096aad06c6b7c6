"""Section: the dashboard at ``/ui``: how fast it loads, and what it costs the router.

``llamactl serve --config`` with two demo models loaded (``-t 1`` each). The
page is opened in headless Chromium (Debian's ``chromium``, driven by
Playwright) in a fresh browser context per round, so nothing is cached:
both figures are the browser's own clock from the navigation's start: its
``load`` event, and the first status sample drawn in the models table.
The router's CPU (its own process, not the llama-servers) is read from
``/proc`` over equal windows before the page was ever opened, with it open,
and after it was closed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.request
from pathlib import Path

import psutil
from _common import HOST, LLAMACTL, Section, cmdline, fmt, launched, spread

from procman.process._sockets import pick_free_port

_CHROMIUM = "/usr/bin/chromium"
#: the browser's own clock, from the navigation's start: its load event, and the first
#: status sample drawn (app.js marks it)
_TIMINGS = """() => JSON.stringify({
  load: performance.getEntriesByType("navigation")[0].loadEventEnd,
  live: performance.getEntriesByName("llamactl:first-sample")[0].startTime,
})"""


def _config(model: Path, port: int, work: Path) -> Path:
    lines = ["[server]", f'host = "{HOST}"', f"port = {port}"]
    for name in ("alpha", "beta"):
        lines += ["", f"[models.{name}]", f'path = "{model}"', 'args = ["-t", "1"]']
    path = work / "ui.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _post(url: str) -> None:
    request = urllib.request.Request(url, method="POST")  # noqa: S310 - our loopback router
    with urllib.request.urlopen(request, timeout=300) as answer:  # noqa: S310
        answer.read()


def _wait_up(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310
                answer.read()
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # bench harness: the router binds within a second


def _cpu_ms(proc: psutil.Process, seconds: float) -> float:
    """The router's own CPU (user + system) over ``seconds``, in ms per minute."""
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return 60_000 * used / seconds


def ui_section(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    if shutil.which("chromium") is None and not Path(_CHROMIUM).exists():
        return {"title": "The dashboard (/ui)", "error": "no chromium: apt-get install chromium"}
    from playwright.sync_api import sync_playwright

    work.mkdir(parents=True, exist_ok=True)
    rounds, window, windows = (5, 10.0, 1) if quick else (15, 20.0, 3)
    port = pick_free_port(HOST)
    base = f"http://{HOST}:{port}"
    argv = [*LLAMACTL, "serve", "--config", _config(model, port, work), "--server", binary]
    load: list[float] = []
    live: list[float] = []
    cpu: dict[str, list[float]] = {"never opened": [], "open": [], "closed again": []}
    with launched(argv, work / "serve.log") as serve, sync_playwright() as p:
        _wait_up(f"{base}/v1/models", time.monotonic() + 120)
        for name in ("alpha", "beta"):
            _post(f"{base}/admin/load/{name}")
        router = psutil.Process(serve.pid)
        time.sleep(window)  # the loads' aftermath (first samples) settles
        for _ in range(windows):
            cpu["never opened"].append(_cpu_ms(router, window))
        browser = p.chromium.launch(executable_path=_CHROMIUM, args=["--no-sandbox"])
        with contextlib.closing(browser):
            for _ in range(rounds):
                context = browser.new_context()
                page = context.new_page()
                page.goto(f"{base}/ui", wait_until="load")
                page.wait_for_selector('#models tr[data-model="beta"]')
                timing = json.loads(page.evaluate(_TIMINGS))
                load.append(timing["load"])
                live.append(timing["live"])
                if len(load) == rounds:  # the last one stays open a while
                    for _ in range(windows):
                        cpu["open"].append(_cpu_ms(router, window))
                context.close()
        for _ in range(windows):
            cpu["closed again"].append(_cpu_ms(router, window))
    rows = [
        ["page load (navigation -> load event)", fmt(spread(load), " ms", 0)],
        ["page load -> first status sample drawn", fmt(spread(live), " ms", 0)],
    ]
    rows += [
        [f"router CPU, page {when}", fmt(spread(v), " ms CPU/min", 0)] for when, v in cpu.items()
    ]
    return {
        "title": "The dashboard (/ui): load time and the router's idle cost",
        "commands": {"router": cmdline(argv)},
        "header": ["measure", "value"],
        "rows": rows,
        "raw": {"load_ms": load, "live_ms": live, "cpu_ms_per_min": cpu},
        "notes": [
            f"{rounds} page loads, each in a fresh browser context (nothing cached), from a "
            "warm router with two demo models loaded; Chromium is Debian's, headless.",
            f"Router CPU: the `llamactl serve` process alone, {windows} window(s) of "
            f"{window:g} s each; the kernel counts CPU in 10 ms ticks, so one window resolves "
            f"{600 / window:.0f} ms CPU/min. With nobody on the page the router runs only "
            "what it always runs (the supervisor's 5 s memory sample); the open page follows "
            "the status (1 s, and on each event), the events and a log.",
        ],
    }
