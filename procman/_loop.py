"""The event loop llamactl's own long-running commands (``serve``, the daemon) run on.

uvloop where it is installed (a dependency on Linux and macOS), else
asyncio's. The router relays every streamed token as it arrives, and on a
machine whose cores are all busy generating, each wake-up of the router
takes CPU from llama-server: uvloop's cheaper wake-ups measured streamed
tokens/s through the router at 1.002x direct against 0.986x with asyncio's
loop (40 interleaved rounds of 128 tokens, 2 cores; see bench/REPORT.md for
the suite's figure). ``LLAMACTL_EVENT_LOOP=asyncio`` opts out. Code that
embeds procman runs on whatever loop its host runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    if os.environ.get("LLAMACTL_EVENT_LOOP", "").strip().lower() != "asyncio":
        try:
            import uvloop  # speed
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
