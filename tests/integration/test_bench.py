"""A short real benchmark: one case, one repetition, the real server and demo model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from procman.bench import END, BenchCase, Target, run_bench, write_csv, write_json


def test_bench_real_server(llama_server: Path, demo_model: Path, tmp_path: Path) -> None:
    case = BenchCase(name="hello", prompt="Say hello.", max_tokens=8, checkpoints=(1, 4, END))
    target = Target(label="demo", binary=llama_server, model=demo_model)
    messages: list[str] = []
    report = asyncio.run(
        run_bench(
            [target],
            [case],
            repeat=1,
            warmup=False,
            log_dir=tmp_path / "logs",
            on_progress=messages.append,
        )
    )
    (result,) = report.results
    (sample,) = result.samples
    assert sample.ttft_ms is not None
    assert sample.ttft_ms > 0
    assert sample.tokens == 8  # ignore_eos: exactly max_tokens
    assert len(sample.token_ms) >= 4
    at4, end = sample.at(4), sample.at(END)
    assert at4 is not None
    assert sample.ttft_ms <= at4 <= end
    assert messages

    write_csv(report, tmp_path / "out.csv")
    write_json(report, tmp_path / "out.json")
    assert "ttft_ms" in (tmp_path / "out.csv").read_text()
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["results"][0]["stats"]["tokens"]["median"] == 8
