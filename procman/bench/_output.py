"""Reports as rows (CSV), documents (JSON) and a plot (matplotlib, optional)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from procman.bench._cases import checkpoint_label
from procman.bench._run import BenchReport
from procman.errors import ConfigError

__all__ = ["CSV_FIELDS", "summary_rows", "write_csv", "write_json", "write_plot"]

CSV_FIELDS = (
    "target", "build", "model", "case", "metric", "unit",
    "n", "median", "p10", "p90", "q1", "q3", "min", "max",
)  # fmt: skip


def _unit(metric: str) -> str:
    return {"tokens_per_s": "tokens/s", "tokens": "tokens"}.get(metric, "ms")


def summary_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One row per target, case and metric; a metric never reached has empty figures."""
    rows = []
    for result in report.results:
        for metric, st in result.stats().items():
            row: dict[str, Any] = {
                "target": result.target.label,
                "build": result.target.build_key or "",
                "model": result.target.model.name,
                "case": result.case.name,
                "metric": metric,
                "unit": _unit(metric),
            }
            row.update({k: round(float(v), 3) for k, v in st.to_json().items()} if st else {})
            if st:
                row["n"] = st.n
            rows.append(row)
    return rows


def write_csv(report: BenchReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(summary_rows(report))


def write_json(report: BenchReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def write_plot(report: BenchReport, path: Path, *, title: str = "llamactl bench") -> None:
    """One panel per case: median arrival time of each checkpoint per target, p10-p90 bars."""
    try:
        import matplotlib as mpl  # speed

        mpl.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt  # speed
    except ImportError as exc:
        raise ConfigError(
            "--plot needs matplotlib", hint="pip install 'llamactl-server[bench]'"
        ) from exc
    cases = list(dict.fromkeys(r.case.name for r in report.results))
    fig, axes = plt.subplots(
        1, len(cases), figsize=(4.2 * len(cases) + 1, 4.2), squeeze=False, constrained_layout=True
    )
    for ax, name in zip(axes[0], cases, strict=True):
        for result in (r for r in report.results if r.case.name == name):
            labels, med, lo, hi = [], [], [], []
            for label in ("ttft_ms", *(checkpoint_label(c) for c in result.case.checkpoints)):
                st = result.stats().get(label)
                if st is None or (label == "token 1" and "ttft_ms" in labels):
                    continue
                labels.append(label)
                med.append(st.median)
                lo.append(st.median - st.p10)
                hi.append(st.p90 - st.median)
            shown = ["first token" if x == "ttft_ms" else x for x in labels]
            ax.errorbar(shown, med, yerr=[lo, hi], marker="o", capsize=4, label=result.target.label)
        case = next(r.case for r in report.results if r.case.name == name)
        ax.set_title(f"{name} ({case.max_tokens} tokens)")
        ax.set_ylabel("ms after request (median, p10-p90)")
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize="small")
    fig.suptitle(f"{title}: {report.repeat} repetitions, {report.machine.get('cpu', '?')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
