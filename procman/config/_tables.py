"""TOML values to validated settings: the converters every config table uses.

Each converter takes a value as :mod:`tomllib` parsed it and returns it in
its unit ("2GiB" is bytes, "10m" seconds), or raises ``TypeError`` /
``ValueError`` with what was expected; :func:`section` applies them to a
table and turns every error into a :class:`ConfigError` that names the key
path (``models.chat.ttl``), an unknown key with the nearest known one.
:mod:`procman.config` (``[server]``, ``[models]``, ``[workers]``) and
:mod:`procman.distributed.remote` (``[remote]``) both build on them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from procman._units import parse_duration, parse_size
from procman.errors import ConfigError
from procman.router.scheduler import Order
from procman.spec import DeviceSetting, GpuLayers, check_extra_args

__all__ = [
    "NAME",
    "Convert",
    "boolean",
    "budget",
    "devices",
    "duration",
    "endpoint",
    "extra_args",
    "gpu_layers",
    "integer",
    "order",
    "secret",
    "section",
    "shares",
    "string",
    "strings",
    "unknown_key",
]

Convert = Callable[[Any], Any]


def integer(minimum: int) -> Convert:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return convert


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def secret(value: Any) -> str:
    if not isinstance(value, str):  # the value itself is never echoed
        raise TypeError("expected a string")
    return value


def strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def extra_args(value: Any) -> tuple[str, ...]:
    args = strings(value)
    check_extra_args(args)
    return args


def budget(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    return parse_size(value)


def duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {value!r}")
    return seconds


def gpu_layers(value: Any) -> GpuLayers:
    match value:
        case "auto" | "all":
            return value  # type: ignore[no-any-return]  # narrowed by the pattern
        case int() if not isinstance(value, bool) and value >= 0:
            return value
    raise ValueError(f"expected a number of layers, 'auto' or 'all', got {value!r}")


def devices(value: Any) -> DeviceSetting:
    from procman.memory.devices import parse_devices  # speed

    return parse_devices(value)


def shares(value: Any) -> tuple[float, ...]:
    ok = isinstance(value, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value
    )
    if not ok or not value or sum(value) <= 0:
        raise ValueError(f"expected non-negative numbers, not all zero, got {value!r}")
    return tuple(float(v) for v in value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def endpoint(value: Any) -> str:
    from procman.distributed.rpc import format_endpoint, parse_endpoint  # speed

    return format_endpoint(*parse_endpoint(string(value)))


def order(value: Any) -> Order:
    try:
        return Order(value)
    except ValueError:
        raise ValueError(f"expected 'fifo' or 'lifo', got {value!r}") from None


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def unknown_key(path: str, key: str, known: list[str]) -> ConfigError:
    import difflib  # speed: only on an error

    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"{path}{key}: unknown key", hint=hint)


def section(table: Any, path: str, converters: dict[str, Convert]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path.rstrip('.')}: expected a table, got {table!r}")
    values = {}
    for key, value in table.items():
        if key not in converters:
            raise unknown_key(path, key, list(converters))
        try:
            values[key] = converters[key](value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}{key}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{path}{key}: {exc.message}", hint=exc.hint) from exc
    return values
