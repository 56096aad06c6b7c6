"""The public surface of ``procman``: every exported name exists, lazily or not."""

from __future__ import annotations

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
