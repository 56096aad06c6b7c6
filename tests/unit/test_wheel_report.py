"""What a wheel build prints when it fails under pip, what --version says, and
the one-copy check on repaired wheels."""

from __future__ import annotations

import zipfile
from pathlib import Path

from buildtools.errors import BuildError, PlanError, VerificationError
from buildtools.wheel import duplicate_libraries, failure_report
from procman.cli._version import version_lines


def test_a_failed_compile_prints_the_command_and_the_log_tail() -> None:
    log = "\n".join(f"line {i}" for i in range(100)) + "\nggml.c:12: error: boom"
    exc = BuildError(
        "the compile step failed",
        command=["cmake", "--build", "/w", "--target", "llama-server"],
        returncode=1,
        log_tail=log,
        log_path="/home/u/.cache/llamactl/work/abc/llamactl-build.log",
        hint="fix the cause shown above",
    )
    lines = failure_report(exc, tail_lines=5)
    assert lines[0] == "error: the compile step failed"
    assert "failed command: cmake --build /w --target llama-server" in lines
    assert "exit code: 1" in lines
    assert "full log: /home/u/.cache/llamactl/work/abc/llamactl-build.log" in lines
    assert lines[-2] == "  | ggml.c:12: error: boom"
    assert "  | line 96" in lines and "  | line 95" not in lines
    assert lines[-1] == "hint: fix the cause shown above"


def test_other_failures_say_what_they_know() -> None:
    assert failure_report(PlanError("no such backend", hint="use auto")) == [
        "error: no such backend",
        "hint: use auto",
    ]
    lines = failure_report(VerificationError("died", returncode=-4, log_tail="SIGILL here"))
    assert lines[-1] == "  | SIGILL here"


MANIFEST = {
    "key": "955a30723ad6e68d8bdb",
    "version": "b11312 (0c1e570)",
    "compiler": "cc=/usr/bin/gcc@12;cxx=/usr/bin/g++@12;x86_64",
    "cpu_variant": "libggml-cpu-haswell.so",
    "plan": {"backend": "cpu", "cmake_defines": {"GGML_BACKEND_DL": "ON"}, "cpu_features": []},
}


def test_version_names_the_release_and_the_bundled_variant() -> None:
    lines = version_lines(MANIFEST, "0.1.0+cpu.portable")
    assert lines[0] == "llamactl-server 0.1.0+cpu.portable"
    assert "variant cpu.portable" in lines[1] and "b11312" in lines[1]
    assert "955a30723ad6e68d8bdb" in lines[1]
    assert "libggml-cpu-haswell.so" in lines[2]


def test_version_of_a_development_install() -> None:
    lines = version_lines(None, None)
    assert lines[0] == "llamactl-server unknown (not installed)"
    assert "none bundled" in lines[1]


def test_duplicate_libraries_counts_grafted_copies(tmp_path: Path) -> None:
    good = tmp_path / "good.whl"
    with zipfile.ZipFile(good, "w") as zf:
        for name in (
            "buildtools/bin/libggml-base.so.0",
            "buildtools/bin/libggml-cpu-haswell.so",
            "buildtools/bin/libggml-cpu-x64.so",
            "llamactl_server.libs/libgomp-a34b3233.so.1.0.0",
        ):
            zf.writestr(name, b"")
    assert duplicate_libraries(good) == {}
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("buildtools/bin/libggml-base.so.0", b"")
        zf.writestr("llamactl_server.libs/libggml-base-0123abcd.so.0", b"")
    assert duplicate_libraries(bad) == {
        "libggml-base": [
            "buildtools/bin/libggml-base.so.0",
            "llamactl_server.libs/libggml-base-0123abcd.so.0",
        ]
    }
