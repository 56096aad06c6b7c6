"""What llama.cpp itself says and does: the two references the memory estimate is held to.

* :func:`fit_print` runs ``llama-fit-params --fit-print on`` (built beside
  llama-server): llama.cpp's own dry run, which creates the model and the
  context without allocating them and reports model, context (KV) and
  compute bytes, in whole MiB.
* :func:`buffers` reads the buffer lines llama-server itself logs at ``-lv 4``
  (``CPU_REPACK model buffer size = 1.69 MiB``), to 0.01 MiB: each component
  (weights, KV cache, compute, output) as the server really allocated it, so
  that a miss is located, not just measured.
* :func:`fill_slots` and :func:`peak_rss` measure what a running llama-server
  really took: every slot is given a prompt that fills it (at least one
  ubatch, so the whole compute graph runs), then ``VmHWM`` is read.

Shared by ``tests/integration/test_estimate_corpus.py`` and ``bench/memory.py``.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OVER", "UNDER", "Setting", "buffers", "fill_slots", "fit_print", "peak_rss", "within"]

MiB = 1024 * 1024
#: the one-sided bound (issue #21): (fraction, floor in bytes) the estimate may be below
#: the measured peak, and above it
UNDER = (0.01, 16 * MiB)
OVER = (0.05, 128 * MiB)


def within(est: int, peak: int) -> bool:
    """Never below the peak by more than max(1 %, 16 MiB), never above by max(5 %, 128 MiB)."""
    low = peak - max(UNDER[0] * peak, UNDER[1])
    high = peak + max(OVER[0] * peak, OVER[1])
    return low <= est <= high


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One server configuration of the sweep, as llama-server flags and estimate() arguments."""

    ctx: int
    parallel: int = 1
    flash_attn: bool = True
    cache_type: str = "f16"
    mmap: bool = True
    #: --cache-ram in MiB (0: off, which llamactl passes by default)
    cache_ram: int = 0
    #: --ctx-checkpoints; None leaves llama-server's default (32)
    ctx_checkpoints: int | None = None
    ubatch: int = 512

    @property
    def label(self) -> str:
        parts = [f"ctx {self.ctx}", f"np {self.parallel}"]
        parts += [] if self.flash_attn else ["fa off"]
        parts += [] if self.cache_type == "f16" else [f"kv {self.cache_type}"]
        parts += [] if self.mmap else ["no mmap"]
        parts += [f"cram {self.cache_ram}"] if self.cache_ram else []
        parts += [] if self.ctx_checkpoints is None else [f"ckpt {self.ctx_checkpoints}"]
        return ", ".join(parts)

    def args(self) -> list[str]:
        """The flags both llama-server and llama-fit-params take."""
        argv = ["-c", str(self.ctx), "-np", str(self.parallel), "-ub", str(self.ubatch)]
        argv += ["-fa", "on" if self.flash_attn else "off"]
        argv += ["-ctk", self.cache_type, "-ctv", self.cache_type]
        argv += [] if self.mmap else ["--load-mode", "none"]
        return argv

    def server_args(self) -> list[str]:
        """llama-server's flags; ``-lv 4`` makes it log each buffer's size."""
        argv = [*self.args(), "--cache-ram", str(self.cache_ram), "-lv", "4"]
        if self.ctx_checkpoints is not None:
            argv += ["--ctx-checkpoints", str(self.ctx_checkpoints)]
        return argv

    def estimate_args(self) -> dict[str, Any]:
        """Keyword arguments of :func:`procman.memory.estimate.estimate` for this setting."""
        return {
            "ctx": self.ctx,
            "parallel": self.parallel,
            "flash_attn": self.flash_attn,
            "cache_type_k": self.cache_type,
            "cache_type_v": self.cache_type,
            "n_ubatch": self.ubatch,
            "mmap": self.mmap,
            "cache_ram": self.cache_ram * MiB,
            "ctx_checkpoints": 32 if self.ctx_checkpoints is None else self.ctx_checkpoints,
        }


# -- llama-fit-params -----------------------------------------------------------------------------
#: a row of llama.cpp's ``memory breakdown [MiB]`` table: ``|   - Host   |   24 = 1 + 6 + 17 |``
_TABLE_ROW = re.compile(
    r"memory_breakdown_print: \|\s+- (?P<name>\S+)\s+\|\s+(?P<self>\d+) = \s*(?P<model>\d+) \+"
    r"\s+(?P<context>\d+) \+\s+(?P<compute>\d+)"
)
#: a buffer line of llama.cpp's log (``-lv 4``): ``CPU_REPACK model buffer size = 1.69 MiB``
_BUFFER = re.compile(
    r"(?P<buft>[\w-]+)\s+(?P<what>model|KV|output|compute|RS)\s+buffer size\s*=\s*"
    r"(?P<mib>[\d.]+) MiB"
)
_ATTEMPTS = 10
_KIND = {"model": "weights", "KV": "kv_cache", "RS": "kv_cache", "output": "output"}


def fit_print(fit_params: Path, model: Path, setting: Setting) -> dict[str, int]:
    """llama-fit-params' dry run for *model* with *setting*: host bytes, whole MiB.

    ``--fit-print`` prints ``Host model context compute``, but its Host row
    leaves out the ``CPU_REPACK`` buffer (not a host buffer type, and not a
    model device either, common/fit.cpp), so the memory breakdown table on
    stderr is read instead, Host and CPU_REPACK rows summed. Two more ways the
    dry run differs from llama-server: it loads without mmap (``model`` is the
    plain buffers), and it reserves the compute graph for ``n_batch`` outputs
    where the server reserves one per slot, so its ``compute`` includes
    ``n_batch x n_vocab x 4`` bytes of logits the server never allocates.
    """
    argv = [str(fit_params), "-m", str(model), *setting.args(), "--fit-print", "on", "-lv", "4"]
    # the table is written by common_log's worker thread, which the process sometimes
    # outruns at exit (3 runs in 6 lost it): run again until it is there
    for _ in range(_ATTEMPTS):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-2000:]
            raise RuntimeError(f"llama-fit-params failed ({done.returncode}): {tail}")
        rows = {m["name"]: m for m in _TABLE_ROW.finditer(done.stderr)}
        if "Host" in rows:
            break
    else:
        raise RuntimeError(f"no memory breakdown in {_ATTEMPTS} runs of llama-fit-params")
    parts = {"model": 0, "context": 0, "compute": 0}
    for name in ("Host", "CPU_REPACK"):
        if name in rows:
            for key in parts:
                parts[key] += int(rows[name][key]) * MiB
    return parts


def buffers(log: str) -> dict[str, Any]:
    """The buffers a llama.cpp log (``-lv 4``) names, by component, in bytes (0.01 MiB)."""
    parts = {"weights": 0, "kv_cache": 0, "compute": 0, "output": 0}
    named: dict[str, int] = {}
    for m in _BUFFER.finditer(log):
        n = round(float(m["mib"]) * MiB)
        key = f"{m['buft']} {m['what']}"
        named[key] = named.get(key, 0) + n
        parts[_KIND.get(m["what"], "compute")] += n
    return {**parts, "buffers": named}


# -- a running llama-server -----------------------------------------------------------------------
def peak_rss(pid: int) -> int:
    """The process's peak resident set (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(  # noqa: S310 - a local server
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - a local server
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def fill_slots(
    base_url: str, setting: Setting, *, n_ctx_train: int = 0, timeout: float = 600
) -> int:
    """Fill every slot at once with a prompt as long as the slot allows; the tokens evaluated.

    Token ids are sent, not text, so the prompt length does not depend on the
    vocabulary. A slot holds ``ctx / parallel`` cells, but llama-server caps
    what a slot accepts at the training context (the KV cache is allocated in
    full all the same); a few are left for the generated tokens.
    """
    per_slot = setting.ctx // setting.parallel
    per_slot = min(per_slot, n_ctx_train) if n_ctx_train > 0 else per_slot
    body = {"prompt": [300 + i % 200 for i in range(per_slot - 8)], "n_predict": 2}
    body |= {"cache_prompt": False, "temperature": 0}
    url = f"{base_url}/completion"
    with ThreadPoolExecutor(setting.parallel) as pool:
        docs = list(pool.map(lambda _: _post(url, body, timeout), range(setting.parallel)))
    return sum(int(d.get("tokens_evaluated", 0)) for d in docs)
