"""The memory estimate against llama.cpp, over a corpus of architectures and settings.

For each (model, setting) of the sweep: ``llamactl``'s estimate, llama.cpp's
own dry run (``llama-fit-params --fit-print on``, per component) and the peak
RSS of a real llama-server whose every slot was filled with a prompt as long
as the slot. The estimate must never be below the peak by more than
max(1 %, 16 MiB) nor above it by more than max(5 %, 128 MiB).

``python bench/suite.py --only memory`` (``--quick``: the CI corpus only;
``--full``: the larger settings too) or ``python bench/memory.py [--bench]``
to print the table without touching the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import HOST, RESULTS, Section, cmdline, launched, server_argv  # first: sys.path

from procman.memory.estimate import estimate
from procman.models.gguf import validate_model
from procman.process._sockets import pick_free_port
from tests.corpus import BENCH, CI, Spec, model_path
from tests.oracle import Setting, buffers, fill_slots, fit_print, peak_rss, within

MiB = 1024 * 1024

#: settings every model of the corpus runs with
BASE: tuple[Setting, ...] = (
    Setting(ctx=512),
    Setting(ctx=2048, parallel=4),
    Setting(ctx=4096, parallel=8, flash_attn=False),
    Setting(ctx=4096, cache_type="q8_0"),
    Setting(ctx=2048, mmap=False),
)
#: settings only the demo-sized models run with (every slot is filled: prompt time grows)
WIDE: tuple[Setting, ...] = (
    Setting(ctx=8192, parallel=4, cache_type="q4_0"),
    Setting(ctx=16384, parallel=1, flash_attn=False),
    Setting(ctx=32768, parallel=8),
)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310 - local
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def _server(binary: Path, model: Path, setting: Setting, log: Path) -> Iterator[tuple[int, str]]:
    port = pick_free_port(HOST)
    argv = server_argv(binary, model, port, *setting.server_args())
    with launched(argv, log) as proc:
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + 300
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama-server not ready; see {log}")
            time.sleep(0.05)
        yield proc.pid, url


DEMO = Spec(name="demo", quant="Q4_1")


def _path(spec: Spec) -> Path:
    """The corpus file, or the real demo model (SmolLM2-135M-Instruct Q4_1)."""
    if spec == DEMO:
        from buildtools.demo import demo_model_path

        return demo_model_path()
    return model_path(spec)


def observe(
    binary: Path, fit_params: Path, spec: Spec, setting: Setting, work: Path, *, fill: bool = True
) -> dict[str, Any]:
    """What llama.cpp did: its dry run, the server's own buffers and (``fill``) its peak.

    ``fill`` False stops the server as soon as it is ready (buffers only).
    """
    model = _path(spec)
    n_ctx_train = validate_model(model).n_ctx_train
    fit = fit_print(fit_params, model, setting)
    log = work / f"{model.stem}-{setting.label.replace(', ', '_').replace(' ', '')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    with _server(binary, model, setting, log) as (pid, url):
        evaluated = fill_slots(url, setting, n_ctx_train=n_ctx_train) if fill else 0
        peak = peak_rss(pid)
    server = buffers(log.read_text(errors="replace"))
    return {"file": model.name, "fit": fit, "server": server, "peak": peak, "tokens": evaluated}


def row(spec: Spec, setting: Setting, seen: dict[str, Any]) -> dict[str, Any]:
    """One row of the table: the estimate now, beside what llama.cpp did."""
    import dataclasses

    info = validate_model(_path(spec))
    est = estimate(info, **setting.estimate_args())
    # llama-fit-params loads without mmap: compare its model bytes with that estimate
    plain = estimate(info, **(setting.estimate_args() | {"mmap": False}))
    peak = seen["peak"]
    return {
        **seen,
        "model": spec.name,
        "quant": spec.quant,
        "setting": dataclasses.asdict(setting),
        "label": setting.label,
        "estimate": est.host_bytes,
        "breakdown": {k: v["host"] for k, v in est.breakdown.items()},
        "weights_no_mmap": plain.breakdown["weights"]["host"],
        "growth": est.host_growth_bytes,
        "error": 100 * (est.host_bytes - peak) / peak,
        "within": within(est.host_bytes, peak),
    }


def sweep(quick: bool, full: bool) -> list[tuple[Spec, Setting]]:
    """The corpus x settings to run, cheapest first.

    Always the demo model and the CI corpus under every BASE setting; unless
    ``quick`` the real shapes at ctx 512 (1 slot) and 2048 (4 slots) and the
    wide settings on the demo and llama-tiny; with ``full`` the real shapes
    under every BASE setting.
    """
    cases = [(spec, s) for spec in (DEMO, *CI) for s in BASE]
    if not quick:
        # the demo at 32768 x 8 slots takes over 10 minutes to fill on 2 shared cores
        cases += [(CI[0], s) for s in WIDE] + [(DEMO, s) for s in WIDE[:2]]
        cases += [(spec, s) for s in BASE[:2] for spec in BENCH]
    if full:
        cases += [(spec, s) for spec in BENCH for s in BASE[2:]]
    return cases


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def rows_of(raw: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in raw:
        b, srv, fit = r["breakdown"], r["server"], r["fit"]
        rows.append(
            [
                r["model"],
                r["quant"],
                r["label"],
                _mib(r["estimate"]),
                _mib(r["peak"]),
                f"{r['error']:+.1f}%",
                "yes" if r["within"] else "**NO**",
                f"{_mib(b['weights'])} / {_mib(srv['weights'])} / {fit['model'] // MiB}"
                f" ({_mib(r['weights_no_mmap'])})",
                f"{_mib(b['kv_cache'])} / {_mib(srv['kv_cache'])} / {fit['context'] // MiB}",
                f"{_mib(b['compute'])} / {_mib(srv['compute'])} / {fit['compute'] // MiB}",
                _mib(b["checkpoints"] + b["overhead"] + b["output"]),
            ]
        )
    return rows


HEADER = [
    "model",
    "quant",
    "setting",
    "estimate (MiB)",
    "peak RSS (MiB)",
    "error",
    "within bound",
    "weights: est / server / fit (est without mmap)",
    "KV: est / server / fit",
    "compute: est / server / fit",
    "output + checkpoints + overhead (est)",
]


#: observations kept between runs (what llama.cpp did does not change with the estimator,
#: so a rerun after changing it only recomputes the estimates): one JSON object a line
OBSERVED = RESULTS / "memory-observed.jsonl"


def _observed(binary: Path) -> dict[str, dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    if OBSERVED.is_file():
        for line in OBSERVED.read_text().splitlines():
            doc = json.loads(line)
            if doc.get("binary") == str(binary):
                seen[doc["key"]] = doc
    return seen


def memory_corpus(binary: Path, fit_params: Path, work: Path, quick: bool, full: bool) -> Section:
    """The section: every case of the sweep, measured once (see OBSERVED) and estimated now."""
    raw = []
    seen = _observed(binary)
    for spec, setting in sweep(quick, full):
        key = f"{_path(spec).name} | {setting.label}"
        try:
            if key not in seen:
                print(f"[memory] {spec.label}: {setting.label}", file=sys.stderr, flush=True)
                seen[key] = {"key": key, "binary": str(binary)}
                seen[key] |= observe(binary, fit_params, spec, setting, work)
                OBSERVED.parent.mkdir(parents=True, exist_ok=True)
                with OBSERVED.open("a") as fh:
                    fh.write(json.dumps(seen[key]) + "\n")
            raw.append(row(spec, setting, seen[key]))
        except (RuntimeError, TimeoutError, OSError) as exc:
            raw.append({"model": spec.name, "quant": spec.quant, "label": setting.label,
                        "failed": str(exc)})  # fmt: skip
    ok = [r for r in raw if "failed" not in r]
    under = min(ok, key=lambda r: r["error"])
    over = max(ok, key=lambda r: r["error"])
    low = min(ok, key=lambda r: r["estimate"] - r["peak"])
    high = max(ok, key=lambda r: r["estimate"] - r["peak"])
    example = Setting(ctx=2048, parallel=4)
    return {
        "title": "Memory estimate accuracy",
        "commands": {
            "server": cmdline(
                server_argv(binary, Path("MODEL.gguf"), 0, *example.server_args())
            ).replace("--port 0", "--port PORT"),
            "oracle": cmdline(
                [fit_params, "-m", "MODEL.gguf", *example.args(), "--fit-print", "on", "-lv", "4"]
            ),
            "estimate": "llamactl estimate MODEL.gguf --ctx 2048 --parallel 4 --json",
            "corpus": "python -m tests.corpus --bench",
        },
        "header": HEADER,
        "rows": rows_of(ok),
        "raw": raw,
        "notes": [
            f"{sum(r['within'] for r in ok)}/{len(ok)} rows within the one-sided bound "
            "(estimate >= peak - max(1 %, 16 MiB) and <= peak + max(5 %, 128 MiB)); "
            f"{len(raw) - len(ok)} failed to run.",
            f"Lowest relative error: {under['model']} {under['quant']} ({under['label']}) "
            f"{under['error']:+.1f}%; highest: {over['model']} {over['quant']} "
            f"({over['label']}) {over['error']:+.1f}%. In MiB: lowest {low['model']} "
            f"{low['quant']} ({low['label']}) {_mib(low['estimate'] - low['peak'])}, highest "
            f"{high['model']} {high['quant']} ({high['label']}) "
            f"{_mib(high['estimate'] - high['peak'])}.",
            "Peak = VmHWM after every slot was filled at once with a prompt of "
            "min(ctx/np, n_ctx_train) - 8 token ids (2 generated; llama-server caps a slot at "
            "the training context), so each slot's KV cells and "
            "the full compute graph were used. `server` = the buffers llama-server logged "
            "(-lv 4, 0.01 MiB); `fit` = llama-fit-params' dry run (whole MiB, Host + "
            "CPU_REPACK rows of its breakdown). The dry run loads without mmap (compare its "
            "weights with the estimate without mmap, in brackets) and reserves compute for "
            "n_batch outputs, where the server reserves one per slot: its compute column "
            "includes n_batch x n_vocab x 4 bytes of logits the server never allocates.",
            "Provenance of the coefficients: the compute model and the overhead's base and "
            "per-vocabulary-token terms were fitted to the demo model (SmolLM2-135M, earlier "
            "work); the 8 % compute slack to the gemma3 rows (gemma3-270m, gemma3-tiny without "
            "flash attention); the per-slot sampler term to qwen2-0.5b Q4_0 (ctx 512 np 1 "
            "against ctx 2048 np 4). Repack and checkpoint sizes follow llama.cpp's source. "
            "Every other row is held out.",
            "Rows are observed once and kept in bench/results/memory-observed.jsonl (what "
            "llama.cpp did does not depend on the estimator): a rerun measures only new rows "
            "and recomputes every estimate.",
        ],
    }


#: the table tests/unit/test_estimate_corpus.py holds the estimate to
ORACLE_TABLE = Path(__file__).resolve().parents[1] / "tests" / "unit" / "estimate_oracle.json"


def oracle_table(binary: Path, fit_params: Path, work: Path) -> dict[str, Any]:
    """The per-component reference for the CI corpus x BASE settings (servers load, no fill)."""
    import dataclasses

    rows = []
    for spec in CI:
        for setting in BASE:
            seen = observe(binary, fit_params, spec, setting, work, fill=False)
            rows.append(
                {"model": spec.name, "quant": spec.quant, "setting": dataclasses.asdict(setting)}
                | {"fit": seen["fit"], "server": seen["server"]}
            )
    return {
        "command": "python bench/memory.py --oracle-table",
        "fit": cmdline([fit_params, "-m", "MODEL", "FLAGS...", "--fit-print", "on", "-lv", "4"]),
        "server": cmdline([binary, "-m", "MODEL", "FLAGS...", "-lv", "4"]),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    from buildtools import build_default

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="the real shapes too")
    parser.add_argument("--full", action="store_true", help="every setting on the real shapes")
    parser.add_argument("--server", type=Path, help="llama-server (default: the default build)")
    parser.add_argument("--fit-params", type=Path, help="llama-fit-params (default: beside it)")
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    parser.add_argument(
        "--oracle-table", action="store_true", help=f"only rewrite {ORACLE_TABLE.name}"
    )
    args = parser.parse_args(argv)
    build = None if args.server and args.fit_params else build_default().build
    binary = args.server or build.binary  # type: ignore[union-attr]
    fit = args.fit_params or build.fit_params  # type: ignore[union-attr]
    if args.oracle_table:
        doc = oracle_table(binary, fit, Path(tempfile.mkdtemp(prefix="llamactl-oracle-")))
        ORACLE_TABLE.write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    work = Path(tempfile.mkdtemp(prefix="llamactl-memory-"))
    sec = memory_corpus(binary, fit, work, quick=not args.bench, full=args.full)
    print("| " + " | ".join(sec["header"]) + " |")
    for row in sec["rows"]:
        print("| " + " | ".join(row) + " |")
    for note in sec["notes"]:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps(sec["raw"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
