"""Integration tests use the real compiled llama-server and the real demo model.

The ``llama_server`` fixture is the default verified build for this machine,
exactly what ``llamactl build`` makes: compiled into the cache on first use
(~10 minutes cold on 2 cores), a cache hit in seconds afterwards. Tests that
use it are marked ``compile`` and ``server`` automatically.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from buildtools import BuildResult


@pytest.fixture(scope="session")
def default_build() -> BuildResult:
    import buildtools

    return buildtools.build_default()


@pytest.fixture(scope="session")
def llama_server(default_build: BuildResult) -> Path:
    return default_build.build.binary


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from buildtools.demo import demo_model_path

    return demo_model_path()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "llama_server" in fixtures or "default_build" in fixtures:
            item.add_marker(pytest.mark.compile)
            item.add_marker(pytest.mark.server)
