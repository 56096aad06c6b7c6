"""The public surface of ``procman``: every exported name exists, lazily or not."""

from __future__ import annotations

import importlib
import inspect

import pytest

import procman


def test_every_exported_name_resolves() -> None:
    for name in procman.__all__:
        assert getattr(procman, name) is not None, name


def test_exports_are_sorted_and_unique() -> None:
    assert list(procman.__all__) == sorted(set(procman.__all__))


def test_lazy_names_are_the_real_objects() -> None:
    from procman.daemon._sync import Supervisor as SyncSupervisor
    from procman.daemon.client import DaemonClient, connect
    from procman.process.server import ManagedServer
    from procman.router import Router
    from procman.supervisor import AsyncSupervisor

    assert procman.Router is Router
    assert procman.ManagedServer is ManagedServer
    assert procman.AsyncSupervisor is AsyncSupervisor
    assert procman.Supervisor is SyncSupervisor
    assert procman.connect is connect
    assert procman.DaemonClient is DaemonClient


PACKAGES = (
    "procman.process",
    "procman.router",
    "procman.memory",
    "procman.models",
    "procman.daemon",
)


@pytest.mark.parametrize("name", PACKAGES)
def test_each_package_exports_what_its_modules_define(name: str) -> None:
    package = importlib.import_module(name)
    assert list(package.__all__) == sorted(set(package.__all__), key=package.__all__.index)
    assert sorted(dir(package)) == sorted(package.__all__), "the lazy map and __all__ agree"
    for export in package.__all__:
        value = getattr(package, export)
        if inspect.isclass(value) or inspect.isfunction(value):  # not aliases or constants
            assert value.__module__.startswith(name), f"{name}.{export}: {value.__module__}"
