"""An X display for GUI tests: Xvfb, the app's widgets read through Tk's ``send``,
keys typed with xdotool, the close button as a window manager presses it, screenshots.

Nothing here is faked: the app under test is a separate process on a real X
server; Tk's ``send`` is Tk's own inter-application command (it asks the
app's interpreter, over the X server, for what a widget shows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import time
import tkinter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SCREEN = ("-screen", "0", "1024x768x24")
#: Debian's packages for these tools (.ci/run installs them)
TOOLS = {"Xvfb": "xvfb", "xdotool": "xdotool"}


def require_tools() -> None:
    if missing := [package for tool, package in TOOLS.items() if shutil.which(tool) is None]:
        pytest.fail(
            f"the GUI tests need {', '.join(missing)}: apt-get install {' '.join(missing)} "
            "(.ci/run installs them)",
            pytrace=False,
        )


def start_xvfb(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A fresh X server; returns it and its display name once it accepts clients."""
    require_tools()
    read_end, write_end = os.pipe()
    try:
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_end), *SCREEN, "-nolisten", "tcp"],
            pass_fds=(write_end,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        os.close(write_end)
        write_end = -1
        number = b""
        while not number.endswith(b"\n"):  # Xvfb writes its display number once it listens
            chunk = os.read(read_end, 16)
            if not chunk:
                pytest.fail("Xvfb exited at start")
            number += chunk
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    return xvfb, f":{number.decode().strip()}"


#: the test's Tk, in a process of its own: Xlib ends a process whose X server goes away
#: (at the latest when Tk closes its display at exit), and that must not be pytest
_READER = """
import json, sys, tkinter
root = tkinter.Tk()
root.withdraw()
for line in sys.stdin:
    app, script = json.loads(line)
    try:
        reply = {"ok": True, "result": str(root.tk.call("send", app, script))}
    except tkinter.TclError as exc:
        reply = {"ok": False, "error": str(exc)}
    print(json.dumps(reply), flush=True)
"""


class Screen:
    """The test's own view of one display."""

    def __init__(self, display: str, env: dict[str, str]) -> None:
        self.display = display
        self.env = {**env, "DISPLAY": display}
        self._reader = subprocess.Popen(
            [sys.executable, "-c", _READER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
        )

    def close(self) -> None:
        assert self._reader.stdin is not None
        self._reader.stdin.close()
        self._reader.wait(30)
        if self._reader.stdout is not None:
            self._reader.stdout.close()

    def read(self, app: str, script: str) -> str:
        """Run Tcl ``script`` in the app named ``app`` (Tk's send) and return its result."""
        assert self._reader.stdin is not None
        assert self._reader.stdout is not None
        self._reader.stdin.write(json.dumps([app, script]) + "\n")
        self._reader.stdin.flush()
        line = self._reader.stdout.readline()
        if not line:
            pytest.fail("the Tk reader exited (is the X server gone?)")
        reply = json.loads(line)
        if not reply["ok"]:
            raise tkinter.TclError(reply["error"])
        return str(reply["result"])

    def text(self, app: str, widget: str) -> str:
        """What a label shows (``-text``) or a text widget holds."""
        if widget.endswith(("transcript", "entry")):
            return self.read(app, f"{widget} get" + (" 1.0 end" if "transcript" in widget else ""))
        return self.read(app, f"{widget} cget -text")

    def wait_for(
        self, app: str, widget: str, found: Callable[[str], bool], seconds: float, what: str
    ) -> str:
        """Read ``widget`` until ``found(text)``; fail after ``seconds`` with what it shows."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                text = self.text(app, widget)
            except tkinter.TclError as exc:  # not up yet, or gone
                text = f"<{exc}>"
            if found(text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} in {seconds:g} s; {widget} shows: {text!r}")
            time.sleep(0.1)

    def window(self, app: str) -> str:
        """The X window of the app's main window: its window manager frame, which
        carries WM_PROTOCOLS (Tk's ``wm frame``, as a decimal id for xdotool)."""
        return str(int(self.read(app, "wm frame ."), 16))

    def type(self, app: str, entry: str, text: str) -> None:
        """Type ``text`` into ``entry`` as key presses (xdotool), then press Enter.

        With no window manager nothing gives a window the keyboard on a click, and
        Tk ignores the X focus xdotool sets; so the app is asked (Tk's own driver)
        to raise its window and take the focus, as a window manager and a click
        would make it do. The keys themselves are real X key events.
        """
        self.read(app, f"raise .; focus -force {entry}")
        self.xdotool("type", "--delay", "5", text)
        self.wait_for(app, entry, lambda t: t == text, 60, "the typed text in the entry")
        self.xdotool("key", "Return")

    def xdotool(self, *argv: str) -> None:
        subprocess.run(["xdotool", *argv], env=self.env, check=True, timeout=60)

    def press_close(self, window: str) -> None:
        """Send WM_DELETE_WINDOW, as a window manager does when the close button is clicked."""
        _send_delete_window(self.display, int(window))

    def screenshot(self, window: str, path: Path) -> Path:
        from PIL import ImageGrab

        geometry = subprocess.run(
            ["xdotool", "getwindowgeometry", "--shell", window],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        values = dict(line.split("=", 1) for line in geometry.split())
        x, y = int(values["X"]), int(values["Y"])
        box = (x, y, x + int(values["WIDTH"]), y + int(values["HEIGHT"]))
        ImageGrab.grab(bbox=box, xdisplay=self.display).save(path)
        return path


def screen(env: dict[str, str]) -> Iterator[Screen]:
    """An X server and the test's view of it."""
    xvfb, display = start_xvfb(env)
    view = Screen(display, env)
    try:
        yield view
    finally:
        view.close()
        xvfb.terminate()
        xvfb.wait(30)


# -- WM_DELETE_WINDOW through Xlib (ctypes): no window manager runs under Xvfb ------------------
class _ClientMessage(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("serial", ctypes.c_ulong),
        ("send_event", ctypes.c_int),
        ("display", ctypes.c_void_p),
        ("window", ctypes.c_ulong),
        ("message_type", ctypes.c_ulong),
        ("format", ctypes.c_int),
        ("data", ctypes.c_long * 5),
    ]


class _XEvent(ctypes.Union):
    _fields_ = [("xclient", _ClientMessage), ("pad", ctypes.c_long * 24)]


def _send_delete_window(display: str, window: int) -> None:
    name = ctypes.util.find_library("X11")
    assert name, "libX11 not found"
    x11 = ctypes.CDLL(name)
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XInternAtom.restype = ctypes.c_ulong
    x11.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x11.XSendEvent.argtypes = [
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_int,
        ctypes.c_long,
        ctypes.POINTER(_XEvent),
    ]
    x11.XFlush.argtypes = x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    dpy = x11.XOpenDisplay(display.encode())
    assert dpy, f"cannot open display {display}"
    try:
        event = _XEvent()
        event.xclient.type = 33  # ClientMessage
        event.xclient.window = window
        event.xclient.message_type = x11.XInternAtom(dpy, b"WM_PROTOCOLS", 0)
        event.xclient.format = 32
        event.xclient.data[0] = x11.XInternAtom(dpy, b"WM_DELETE_WINDOW", 0)
        assert x11.XSendEvent(dpy, window, 0, 0, ctypes.byref(event)), "XSendEvent failed"
        x11.XFlush(dpy)
    finally:
        x11.XCloseDisplay(dpy)
