"""Integration tests use the real compiled llama-server and the real demo model.

The ``llama_server`` fixture resolves the server the way ``llamactl serve``
does (``$LLAMACTL_SERVER``, else a verified cached build, building one into
the cache on first use: ~10 minutes cold on 2 cores, seconds when cached).
Tests that use it are marked ``compile`` and ``server`` automatically.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama_server() -> Path:
    import buildtools

    return buildtools.resolve_server(build_if_missing=True).binary


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from buildtools.demo import demo_model_path

    return demo_model_path()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "llama_server" in fixtures:
            item.add_marker(pytest.mark.compile)
            item.add_marker(pytest.mark.server)
