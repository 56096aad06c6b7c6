"""llamactl bench without processes: cases files, statistics, checkpoints from fake streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procman.bench import (
    END,
    BenchCase,
    BenchReport,
    CaseResult,
    Target,
    load_cases,
    parse_cases,
    percentile,
    request_body,
    sample_from_times,
    summarize,
    summary_rows,
    write_csv,
    write_json,
)
from procman.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "bench_cases.toml"


def _case(**kw: Any) -> dict[str, Any]:
    return {"name": "c", "prompt": "hi", "max_tokens": 8, **kw}


# -- cases files ------------------------------------------------------------
def test_example_cases_file_parses() -> None:
    cases = load_cases(EXAMPLE)
    assert len(cases) >= 3
    assert all(END in c.checkpoints and 1 in c.checkpoints for c in cases)


def test_checkpoints_are_sorted_with_end_last() -> None:
    (case,) = parse_cases({"case": [_case(checkpoints=["end", 8, 1])]})
    assert case.checkpoints == (1, 8, END)
    assert case.ignore_eos is True
    assert case.temperature == 0.0


def test_default_checkpoints() -> None:
    (case,) = parse_cases({"case": [_case()]})
    assert case.checkpoints == (1, END)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"case": [_case(max_tokns=3)]}, "max_tokns"),
        ({"case": [{"name": "x", "prompt": "p"}]}, "max_tokens"),
        ({"case": [_case(max_tokens="8")]}, "max_tokens"),
        ({"case": [_case(max_tokens=True)]}, "max_tokens"),
        ({"case": [_case(max_tokens=0)]}, "max_tokens"),
        ({"case": [_case(checkpoints=[1, 9])]}, "checkpoints"),
        ({"case": [_case(checkpoints=[0])]}, "checkpoints"),
        ({"case": [_case(checkpoints=["start"])]}, "checkpoints"),
        ({"case": [_case(checkpoints=[])]}, "checkpoints"),
        ({"case": [_case(checkpoints=[2, 2])]}, "checkpoints"),
        ({"case": [_case(temperature=-1)]}, "temperature"),
        ({"case": [_case(ignore_eos="yes")]}, "ignore_eos"),
        ({"case": [_case(name=3)]}, "name"),
        ({"cases": []}, "cases"),
    ],
)
def test_bad_cases_name_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_cases(doc)


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError) as err:
        parse_cases({"case": [_case(checkpoint=[1])]})
    assert "checkpoints" in str(err.value.hint)


def test_duplicate_names_and_empty_files_are_errors() -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_cases({"case": [_case(), _case()]})
    with pytest.raises(ConfigError, match="no cases"):
        parse_cases({})


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[case]\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_cases(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_cases(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text('[[case]]\nname = "a"\nprompt = "p"\nmax_tokens = 4\ncheckpoints = [1, 4]\n')
    assert load_cases(good)[0].checkpoints == (1, 4)


# -- statistics ----------------------------------------------------------------
def test_percentile_matches_linear_interpolation() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(values, 50) == 30.0
    assert percentile(values, 10) == pytest.approx(14.0)
    assert percentile(values, 90) == pytest.approx(46.0)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_summarize() -> None:
    st = summarize([4.0, 1.0, 3.0, 2.0])
    assert st is not None
    assert (st.n, st.median, st.min, st.max) == (4, 2.5, 1.0, 4.0)
    assert st.q1 == pytest.approx(1.75)
    assert st.iqr == pytest.approx(1.5)
    assert summarize([]) is None


# -- checkpoints from fake timestamp streams ----------------------------------------
def _stream(start: float, first: float, step: float, n: int) -> Iterator[float]:
    return (start + first + i * step for i in range(n))


def test_checkpoints_from_a_fake_stream() -> None:
    arrivals = list(_stream(100.0, 0.200, 0.010, 32))
    sample = sample_from_times(100.0, arrivals, arrivals[-1] + 0.005)
    assert sample.ttft_ms == pytest.approx(200.0)
    assert sample.at(1) == pytest.approx(200.0)
    assert sample.at(8) == pytest.approx(270.0)
    assert sample.at(32) == pytest.approx(510.0)
    assert sample.at(END) == pytest.approx(515.0)
    assert sample.at(33) is None
    assert sample.tokens == 32
    assert sample.tokens_per_s == pytest.approx(100.0)
    assert sample.checkpoints([1, 8, END]) == pytest.approx(
        {"token 1": 200.0, "token 8": 270.0, "end": 515.0}
    )


def test_server_token_count_wins_and_short_answers() -> None:
    sample = sample_from_times(0.0, [0.1], 0.2, tokens=2)
    assert sample.tokens == 2
    assert sample.tokens_per_s is None
    empty = sample_from_times(0.0, [], 0.2)
    assert empty.ttft_ms is None
    assert empty.at(END) == pytest.approx(200.0)


def test_times_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="decrease"):
        sample_from_times(0.0, [0.2, 0.1], 0.3)
    with pytest.raises(ValueError, match="between"):
        sample_from_times(1.0, [0.5], 2.0)


def test_case_result_stats_skip_unreached_checkpoints() -> None:
    case = BenchCase(name="c", prompt="p", max_tokens=64, checkpoints=(1, 64, END))
    result = CaseResult(target=Target(label="t", binary=Path("b"), model=Path("m")), case=case)
    result.samples = [
        sample_from_times(0.0, list(_stream(0.0, 0.1 * k, 0.01, 10)), 1.0) for k in (1, 2, 3)
    ]
    st = result.stats()
    assert st["ttft_ms"] is not None
    assert st["ttft_ms"].median == pytest.approx(200.0)
    assert st["token 64"] is None
    assert st["end"] is not None
    assert st["end"].n == 3


def test_request_body_streams_and_counts_usage() -> None:
    case = BenchCase(name="c", prompt="p", max_tokens=5, system="s")
    body = request_body(case, "demo")
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["max_tokens"] == 5


def test_reports_write_csv_and_json(tmp_path: Path) -> None:
    case = BenchCase(name="c", prompt="p", max_tokens=4, checkpoints=(1, 4, END))
    target = Target(label="demo", binary=Path("b"), model=Path("m.gguf"), build_key="k")
    result = CaseResult(target=target, case=case)
    result.samples.append(sample_from_times(0.0, [0.1, 0.11, 0.12, 0.13], 0.14))
    report = BenchReport(
        results=[result], repeat=1, warmup=False, started="now", seconds=1.0, machine={}
    )
    rows = summary_rows(report)
    assert {r["metric"] for r in rows} == {
        "ttft_ms",
        "tokens_per_s",
        "tokens",
        "token 1",
        "token 4",
        "end",
    }
    write_csv(report, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("target,build,model,case,metric")
    assert len(lines) == 1 + len(rows)
    write_json(report, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"][0]["stats"]["ttft_ms"]["median"] == pytest.approx(100.0)


def test_cli_table_has_a_row_per_figure() -> None:
    from rich.console import Console

    from procman.cli._bench import _table

    case = BenchCase(name="c", prompt="p", max_tokens=4, checkpoints=(1, 4, END))
    result = CaseResult(target=Target(label="demo", binary=Path("b"), model=Path("m")), case=case)
    result.samples.append(sample_from_times(0.0, [0.1, 0.11, 0.12, 0.13], 0.14))
    report = BenchReport(
        results=[result], repeat=1, warmup=False, started="now", seconds=1.0, machine={}
    )
    console = Console(width=120, record=True)
    console.print(_table(report))
    text = console.export_text()
    for figure in ("first token (ms)", "tokens/s", "token 4 (ms)", "end (ms)"):
        assert figure in text
    assert "100.0" in text
