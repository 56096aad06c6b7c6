"""A windowed chat app (Tk) that embeds llamactl as a library.

    python examples/desktop/chat.py                    # the demo model, owned by this app
    python examples/desktop/chat.py model.gguf --ctx 4096
    python examples/desktop/chat.py --shared           # one llama-server for every copy (daemon)

What it shows of the library, each on the GUI thread through a ``procman.Inbox``:

* first run: ``procman.prepare()`` fetches the model and, when no llama-server
  is cached, compiles one; the bar shows the compile's percentage, and closing
  the window cancels it (the build resumes on the next start);
* the model's state from the supervisor's events: starting, loading, ready,
  restarting, failed with its reason;
* a streamed answer with its tokens/s; Stop closes the connection, and
  llama-server stops generating;
* closing the window stops everything it started: its llama-server, its
  build, its answer. Killed outright, its llama-server dies with it (Linux's
  parent-death signal); with ``--shared`` the server belongs to the daemon and
  stays for the other copies until the daemon is idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import tkinter as tk
from tkinter import ttk

from stream import Answer, Done

import procman

#: the Tk application name is this plus the pid: tests read the window with Tk's ``send``
APP_NAME = "llamactl-chat"
STATE_COLOURS = {"ready": "#1b7a2f", "failed": "#b00020", "restarting": "#a05a00"}


class ChatWindow:
    """The window, and everything it started; every method runs on the GUI thread."""

    def __init__(self, root: tk.Tk, options: argparse.Namespace) -> None:
        self.root = root
        self.options = options
        self.inbox = procman.Inbox()
        root.createfilehandler(self.inbox, tk.READABLE, self.inbox.run_pending)
        self.preparation: procman.Preparation | None = None
        self.owner: procman.Supervisor | procman.DaemonClient | None = None
        self.server: procman.ServerInfo | None = None
        self.answer: Answer | None = None
        self.answer_text = ""
        self.history: list[dict[str, str]] = []
        self.closing = threading.Event()
        self._owner_lock = threading.Lock()
        self._build()

    # -- layout ----------------------------------------------------------------------------
    def _build(self) -> None:
        root = self.root
        root.title(f"llamactl chat: {self.options.model}")
        root.geometry("760x520")
        bar = ttk.Frame(root, name="bar", padding=(8, 6))
        bar.pack(fill="x")
        ttk.Label(bar, text=f"model {self.options.model}").pack(side="left")
        self.state = ttk.Label(bar, name="state", text="preparing", width=11)
        self.state.pack(side="left", padx=8)
        self.progress = ttk.Progressbar(bar, name="progress", length=180, maximum=100)
        self.progress.pack(side="left")
        self.detail = ttk.Label(bar, name="detail", text="")
        self.detail.pack(side="left", padx=8, fill="x", expand=True)

        body = ttk.Frame(root, name="body", padding=(8, 0))
        body.pack(fill="both", expand=True)
        self.transcript = tk.Text(body, name="transcript", wrap="word", state="disabled")
        scroll = ttk.Scrollbar(body, command=self.transcript.yview)
        self.transcript.configure(yscrollcommand=scroll.set)
        scroll.pack(side="right", fill="y")
        self.transcript.pack(side="left", fill="both", expand=True)
        self.transcript.tag_configure("you", foreground="#1a4f8b")
        self.transcript.tag_configure("model", foreground="#1b7a2f")

        form = ttk.Frame(root, name="form", padding=8)
        form.pack(fill="x")
        self.entry = ttk.Entry(form, name="entry")
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", self.send)
        self.send_button = ttk.Button(form, name="send", text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(8, 0))
        self.stop_button = ttk.Button(form, name="stop", text="Stop", command=self.stop)
        self.stop_button.pack(side="left", padx=(8, 0))
        self.status = ttk.Label(root, name="status", text="", padding=(8, 0, 8, 6))
        self.status.pack(fill="x")
        self._buttons(answering=False, ready=False)
        root.protocol("WM_DELETE_WINDOW", root.destroy)

    def _buttons(self, *, answering: bool, ready: bool) -> None:
        self.send_button.state(["!disabled"] if ready and not answering else ["disabled"])
        self.stop_button.state(["!disabled"] if answering else ["disabled"])

    def _write(self, text: str, tag: str | None = None) -> None:
        self.transcript.configure(state="normal")
        self.transcript.insert("end", text, (tag,) if tag else ())
        self.transcript.configure(state="disabled")
        self.transcript.see("end")

    def show_state(self, state: str, detail: str = "") -> None:
        self.state.configure(text=state, foreground=STATE_COLOURS.get(state, ""))
        self.detail.configure(text=detail)
        busy = state in {"preparing", "starting", "loading", "restarting"}
        if busy and self.progress["mode"] != "indeterminate":
            self.progress.configure(mode="indeterminate")
            self.progress.start(15)
        elif not busy:
            self.progress.stop()
            self.progress.configure(mode="determinate", value=100 if state == "ready" else 0)

    # -- getting ready ---------------------------------------------------------------------
    def start(self) -> None:
        self.show_state("preparing", f"finding {self.options.model}")
        self.preparation = procman.prepare(
            self.options.model,
            binary=self.options.server,
            on_progress=self.inbox.wrap(self.show_progress),
        )
        self.preparation.add_done_callback(self.inbox.wrap(self.prepared))

    def show_progress(self, progress: procman.Progress) -> None:
        fraction = progress.fraction
        if fraction is not None:
            self.progress.stop()
            self.progress.configure(mode="determinate", value=fraction * 100)
        match progress.stage, progress.step:
            case "build", "waiting":
                text = "waiting for another build of llama-server"
            case "build", "configure":
                text = "configuring the llama-server build"
            case "build", "compile" if fraction is not None:
                text = f"compiling llama-server {fraction:.0%} ({progress.done}/{progress.total})"
            case "build", "verify":
                text = "verifying the new llama-server"
            case "build", _:
                text = f"building llama-server: {progress.step}"
            case "model", _:
                text = f"model: {progress.message}"
            case _:
                text = "llama-server found"
        self.detail.configure(text=text)

    def prepared(self, preparation: procman.Preparation) -> None:
        try:
            ready = preparation.result()
        except procman.BuildCancelled:
            return  # the window is closing
        except procman.LlamactlError as exc:
            self.fail(exc)
            return
        where = "the shared daemon" if self.options.shared else "this app"
        self.show_state("starting", f"starting {self.options.model} in {where}")
        threading.Thread(target=self._serve, args=(ready,), name="chat-serve", daemon=True).start()

    def _serve(self, ready: procman.Prepared) -> None:
        """Worker thread: attach (or own a supervisor), then serve; blocks until ready."""
        try:
            owner: procman.Supervisor | procman.DaemonClient = (
                procman.connect() if self.options.shared else procman.Supervisor()
            )
        except procman.LlamactlError as exc:
            self.inbox.post(self.fail, exc)
            return
        with self._owner_lock:
            if self.closing.is_set():
                owner.close()
                return
            self.owner = owner
        if isinstance(owner, procman.Supervisor):
            owner.on_event(self.inbox.wrap(self.show_event))
        try:
            server = owner.serve(self.options.model, binary=str(ready.binary), ctx=self.options.ctx)
        except procman.LlamactlError as exc:
            if not self.closing.is_set():
                self.inbox.post(self.fail, exc)
            return
        self.inbox.post(self.serving, server)

    def show_event(self, event: procman.Event) -> None:
        self.show_state(str(event.state), event.reason)
        if event.state in {procman.State.RESTARTING, procman.State.FAILED}:
            self._buttons(answering=self.answer is not None, ready=False)
        elif event.state is procman.State.READY and self.server is not None:
            self._buttons(answering=self.answer is not None, ready=True)

    def serving(self, server: procman.ServerInfo) -> None:
        self.server = server
        self.show_state(
            "ready", f"{server.name}: llama-server pid {server.pid}, port {server.port}"
        )
        self._buttons(answering=False, ready=True)
        self.entry.focus_set()

    def fail(self, exc: procman.LlamactlError) -> None:
        self.show_state("failed", exc.message + (f" ({exc.hint})" if exc.hint else ""))
        self._buttons(answering=False, ready=False)

    # -- chatting --------------------------------------------------------------------------
    def send(self, _event: object = None) -> None:
        text = self.entry.get().strip()
        if not text or self.server is None or self.server.url is None or self.answer is not None:
            return
        self.entry.delete(0, "end")
        self.history.append({"role": "user", "content": text})
        self._write(f"you: {text}\n", "you")
        self._write(f"{self.server.name}: ", "model")
        answer = Answer(
            self.server.url,
            self.server.api_key,
            list(self.history),
            max_tokens=self.options.max_tokens,
            extra=self.options.extra,
        )
        self.answer, self.answer_text = answer, ""
        self.status.configure(text="answering...")
        self._buttons(answering=True, ready=True)
        threading.Thread(
            target=self._answer, args=(answer,), name="chat-answer", daemon=True
        ).start()

    def _answer(self, answer: Answer) -> None:
        """Worker thread: stream the answer into the window."""
        try:
            done = answer.run(self.inbox.wrap(self.show_piece))
        except OSError as exc:
            self.inbox.post(self.answer_failed, str(exc))
        else:
            self.inbox.post(self.answered, done)

    def show_piece(self, text: str, tokens: int, rate: float | None) -> None:
        self.answer_text += text
        self._write(text)
        speed = f", {rate:.1f} tokens/s" if rate else ""
        self.status.configure(text=f"answering: {tokens} tokens{speed}")

    def answered(self, done: Done) -> None:
        self.history.append({"role": "assistant", "content": self.answer_text})
        self._write("\n\n")
        speed = f", {done.tokens_per_second:.1f} tokens/s" if done.tokens_per_second else ""
        ending = "stopped" if done.cancelled else (done.finish_reason or "done")
        self.status.configure(text=f"{ending}: {done.tokens} tokens{speed}")
        self.answer = None
        self._buttons(answering=False, ready=True)

    def answer_failed(self, message: str) -> None:
        self.history.pop()
        self._write(f"[request failed: {message}]\n\n")
        self.status.configure(text="request failed")
        self.answer = None
        self._buttons(answering=False, ready=self.server is not None)

    def stop(self) -> None:
        if self.answer is not None:
            self.answer.cancel()

    # -- closing ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Everything this window started ends here: build, answer, servers, threads."""
        self.closing.set()
        if self.preparation is not None:
            self.preparation.cancel()
        if self.answer is not None:
            self.answer.cancel()
        with self._owner_lock:
            owner = self.owner
        if owner is not None:
            owner.close()  # an owned supervisor stops its llama-server; a client detaches
        if self.preparation is not None:
            with contextlib.suppress(Exception):  # cancelled, or failed: either way, ended
                self.preparation.result(timeout=60)
        with contextlib.suppress(tk.TclError):
            self.root.deletefilehandler(self.inbox)
        self.inbox.close()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="demo", help="a .gguf path, a name, or demo")
    parser.add_argument("--ctx", type=int, default=2048, help="context size")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer")
    parser.add_argument("--shared", action="store_true", help="use (or start) the shared daemon")
    parser.add_argument("--server", help="the llama-server to run (default: found or built)")
    parser.add_argument(
        "--extra",
        type=json.loads,
        default={},
        metavar="JSON",
        help="further request fields for llama-server, e.g. '{\"temperature\": 0.2}'",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    root = tk.Tk(className="LlamactlChat")
    root.tk.call("tk", "appname", f"{APP_NAME}-{os.getpid()}")
    window = ChatWindow(root, options)
    # SIGTERM closes the window like the close button does (tkinter's main loop runs
    # Python's signal handlers between Tk events)
    signal.signal(signal.SIGTERM, lambda *_: root.destroy())
    window.start()
    try:
        root.mainloop()
    finally:
        window.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
