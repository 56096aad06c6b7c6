"""Time what users feel: first token, the N-th token, the end, tokens/s.

::

    load_cases(path) -> [BenchCase]          (TOML; errors are ConfigError naming the key)
    run_bench([Target], cases, repeat=5) -> BenchReport
    write_json / write_csv / write_plot(report, path)

The library prints nothing; ``llamactl bench`` renders the report.
"""

from __future__ import annotations

from procman.bench._cases import (
    END,
    BenchCase,
    Checkpoint,
    checkpoint_label,
    load_cases,
    parse_cases,
)
from procman.bench._client import request_body, stream_case
from procman.bench._output import CSV_FIELDS, summary_rows, write_csv, write_json, write_plot
from procman.bench._run import (
    BenchReport,
    CaseResult,
    Target,
    machine_info,
    run_bench,
    run_bench_sync,
)
from procman.bench._stats import Sample, Stats, percentile, sample_from_times, summarize

__all__ = [
    "CSV_FIELDS",
    "END",
    "BenchCase",
    "BenchReport",
    "CaseResult",
    "Checkpoint",
    "Sample",
    "Stats",
    "Target",
    "checkpoint_label",
    "load_cases",
    "machine_info",
    "parse_cases",
    "percentile",
    "request_body",
    "run_bench",
    "run_bench_sync",
    "sample_from_times",
    "stream_case",
    "summarize",
    "summary_rows",
    "write_csv",
    "write_json",
    "write_plot",
]
