"""Ports: a busy public port is a clear error; private ports are picked free."""

from __future__ import annotations

import socket

import pytest

from procman.errors import ConfigError, PortInUseError
from procman.process._sockets import pick_free_port
from procman.process.endpoint import is_bind_failure
from procman.router.listen import bind_listener, is_loopback


def test_picked_port_can_be_bound() -> None:
    port = pick_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_bind_listener_listens() -> None:
    with bind_listener("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_busy_port_is_port_in_use_error() -> None:
    with bind_listener("127.0.0.1", 0) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError) as info:
            bind_listener("127.0.0.1", port)
    assert info.value.port == port
    assert "already in use" in str(info.value)
    assert info.value.hint and "--port" in info.value.hint


def test_unresolvable_host_is_config_error() -> None:
    with pytest.raises(ConfigError):
        bind_listener("no-such-host.invalid", 0)


def test_llama_server_bind_failure_is_recognised() -> None:
    line = (
        "0.00.004.784 E srv  start: couldn't bind HTTP server socket, hostname: 127.0.0.1, port: 1"
    )
    assert is_bind_failure(f"some\n{line}\nmore")
    assert not is_bind_failure("llama_server: model loaded")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_unresolvable_name_is_not_loopback() -> None:
    assert not is_loopback("no-such-host.invalid")
