"""The ``models.toml`` file: one endpoint's settings and the models it serves.

Three layers, kept apart on purpose:

* the TOML text, read with :mod:`tomllib`;
* :class:`Config` (:class:`ServerSection` + one :class:`ModelSection` per
  model): validated input, units already parsed ("2GiB" is bytes, "10m" is
  seconds), but nothing resolved: no file looked up, no binary chosen;
* :class:`ServePlan` (one :class:`ModelPlan` each, wrapping a
  :class:`~procman.spec.ServerSpec`): the resolved plan that ``serve`` runs.

The field docstrings below are the documentation: ``python -m procman.config
--reference`` prints them as Markdown, and ``llamactl config init`` writes
them as comments into a starter file. Unknown keys are errors that suggest
the nearest known key, and every error names the key path (``models.chat.ttl``).
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from procman._units import format_duration, parse_size
from procman.config import _tables
from procman.errors import ConfigError, ModelError
from procman.models.refs import DEMO_MODEL, resolve_model
from procman.router.scheduler import Order
from procman.spec import DeviceSetting, GpuLayers, LogSettings, ServerSpec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from procman.distributed.remote import RemoteSection

__all__ = [
    "Budget",
    "Config",
    "ModelPlan",
    "ModelSection",
    "Order",
    "ServePlan",
    "ServerSection",
    "WorkerSection",
    "load_config",
    "parse_config",
    "read_key_file",
    "reference",
    "starter",
]

Budget = int | Literal["auto"] | None


@dataclass(frozen=True, kw_only=True)
class ServerSection:
    """The ``[server]`` table: the public endpoint and global limits."""

    host: str = "127.0.0.1"
    """Interface of the public endpoint; anything but loopback needs ``api_key``."""
    port: int = 8080
    """Port of the public endpoint."""
    api_key: str | None = field(default=None, repr=False)
    """If set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>`` (or ``x-api-key``)."""  # noqa: E501
    api_key_file: str | None = None
    """A file whose first line is the API key: keeps the key out of this file (and of `ps`)."""
    allowed_hosts: tuple[str, ...] = ()
    """`Host` names accepted besides loopback and the bound address, e.g. ``["llm.lan"]`` (``".lan"``: a domain and its subdomains, ``"*"``: any). Others get 403: DNS-rebinding protection."""  # noqa: E501
    cors_origins: tuple[str, ...] = ()
    """Web pages that may call the API from a browser, e.g. ``["http://localhost:3000"]`` (``*`` wildcards). Requests from other origins get 403 unless they carry the API key."""  # noqa: E501
    max_loaded: int | None = None
    """Most models running at once; to load another, the least recently used idle one stops. Unset: no limit."""  # noqa: E501
    memory_budget: Budget = "auto"
    """RAM all models may use together: a size such as ``"24GiB"``, or ``"auto"`` (from free memory)."""  # noqa: E501
    vram_budget: Budget = "auto"
    """GPU memory all models may use together: a size, or ``"auto"`` (from free VRAM)."""
    model_dirs: tuple[str, ...] = ()
    """Folders of ``.gguf`` files that ``llamactl models --config`` lists besides the Hugging Face cache, LM Studio and Ollama."""  # noqa: E501


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """A ``[models.NAME]`` table: one model; NAME is what clients send as ``model``."""

    path: str = DEMO_MODEL
    """A ``.gguf`` file, ``"hf:ORG/REPO:QUANT"`` (pulled on first use), ``"ollama:NAME:TAG"``, ``"lmstudio:PUBLISHER/REPO"``, a model name in the cache, or ``"demo"``."""  # noqa: E501
    ctx: int | None = None
    """Context size in tokens (``-c``); unset lets llama-server choose."""
    parallel: int = 1
    """Requests served at once (llama-server slots, ``-np``); more wait in the queue."""
    gpu_layers: GpuLayers | None = None
    """Layers offloaded to the GPU: a number, ``"auto"`` or ``"all"``; unset lets llama-server choose."""  # noqa: E501
    devices: DeviceSetting = "auto"
    """Which NVIDIA GPUs the model runs on: ``"auto"`` (at each start, the fewest cards with room for it, the roomiest first), a list of NVML indices or UUIDs such as ``[0]`` (pinned), or ``"all"`` (split across every card). The server sees only those (``CUDA_VISIBLE_DEVICES``)."""  # noqa: E501
    threads: int | None = None
    """Compute threads (``--threads``); unset: the cores shared equally among the models that may run at once, or llama-server's default for a model served alone."""  # noqa: E501
    memory_limit: int | None = None
    """Most RAM this model's server may use, a size such as ``"2GiB"``; unset: no own limit."""
    ttl: float | None = None
    """Idle time after which the server stops, e.g. ``"10m"``; the next request starts it again. Unset: stays loaded."""  # noqa: E501
    queue: int = 64
    """Requests that may wait for a slot; one more gets HTTP 429 with ``Retry-After``."""
    order: Order = Order.FIFO
    """Which waiting request goes next: ``"fifo"`` (oldest) or ``"lifo"`` (newest)."""
    args: tuple[str, ...] = ()
    """Further llama-server arguments, e.g. ``["--temp", "0.7"]``; ``/v1/embeddings`` needs ``["--embeddings", "--pooling", "mean"]``."""  # noqa: E501
    aliases: tuple[str, ...] = ()
    """Other names clients may send for this model."""
    startup_timeout: float = 120.0
    """Seconds the model may take to load before the start counts as failed."""
    rpc: tuple[str, ...] = ()
    """Names of ``[workers.NAME]`` whose devices hold part of this model (llama.cpp RPC); the model and its workers start, fail and restart as one group."""  # noqa: E501
    tensor_split: tuple[float, ...] = ()
    """Share of the layers per worker, in the order of ``rpc`` (``-ts``); unset: llama.cpp's split by free memory."""  # noqa: E501
    stall_timeout: float = 30.0
    """With ``rpc``: seconds llama-server's main loop may not answer before the group is restarted (a silent worker hangs it)."""  # noqa: E501


@dataclass(frozen=True, kw_only=True)
class WorkerSection:
    """A ``[workers.NAME]`` table: one RPC worker (``llamactl worker`` on some machine) that a model lists in ``rpc``."""  # noqa: E501

    endpoint: str = ""
    """``HOST:PORT`` of the worker's ggml-rpc-server (an IPv4 address)."""
    trusted_network: bool = False
    """Allow an endpoint beyond loopback. The RPC protocol has no authentication: only on a network you trust (a direct cable, a private VLAN)."""  # noqa: E501


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole config file, validated but not resolved."""

    server: ServerSection = field(default_factory=ServerSection)
    models: Mapping[str, ModelSection] = field(default_factory=lambda: MappingProxyType({}))
    workers: Mapping[str, WorkerSection] = field(default_factory=lambda: MappingProxyType({}))
    remote: Mapping[str, RemoteSection] = field(default_factory=lambda: MappingProxyType({}))
    """``[remote.NAME]``: models other servers serve (see :mod:`procman.distributed.remote`)."""

    def warnings(self) -> list[str]:
        """What is allowed but risky, for the command line to print."""
        from procman.distributed.rpc import DEADLOCK_NOTE  # speed

        return [f"models.{n}: {DEADLOCK_NOTE}" for n, m in self.models.items() if len(m.rpc) > 2]

    def plan(
        self, binary: Path, *, log: LogSettings | None = None, models_dir: Path | None = None
    ) -> ServePlan:
        """Resolve every model file and build the specs (raises ``ModelError``/``ConfigError``)."""
        plans = []
        for name, model in self.models.items():
            pending = _pending_pull(model.path)
            try:
                spec = ServerSpec(
                    name=name,
                    model=Path(model.path)
                    if pending
                    else resolve_model(model.path, models_dir=models_dir),
                    binary=binary,
                    aliases=model.aliases,
                    ctx=model.ctx,
                    parallel=model.parallel,
                    gpu_layers=model.gpu_layers,
                    devices=model.devices,
                    threads=model.threads,
                    extra_args=model.args,
                    startup_timeout=model.startup_timeout,
                    rpc=tuple(self.workers[w].endpoint for w in model.rpc),
                    tensor_split=model.tensor_split,
                    stall_timeout=model.stall_timeout,
                    log=log or LogSettings(),
                )
            except (ConfigError, ModelError) as exc:
                raise type(exc)(f"models.{name}: {exc.message}", hint=exc.hint) from exc
            plans.append(
                ModelPlan(
                    spec=spec,
                    ttl=model.ttl,
                    queue=model.queue,
                    order=model.order,
                    memory_limit=model.memory_limit,
                    pull=model.path if pending else None,
                )
            )
        return ServePlan(server=self.server, models=tuple(plans))


def _pending_pull(path: str) -> bool:
    """An ``hf:`` reference the Hugging Face cache lacks: pulled at the model's first load."""
    if not path.startswith("hf:") or Path(path).exists():
        return False
    from procman.models.pull import cached  # speed

    return cached(path) is None


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """One model as it will run: its server spec plus what the router and supervisor enforce."""

    spec: ServerSpec
    ttl: float | None
    queue: int
    order: Order
    memory_limit: int | None
    pull: str | None = None
    """An ``hf:`` reference not in the cache yet: ``spec.model`` is a placeholder until the
    first load pulls it (``AsyncSupervisor.add(fetch=...)``)."""


@dataclass(frozen=True, kw_only=True)
class ServePlan:
    """What ``llamactl serve --config`` runs."""

    server: ServerSection
    models: tuple[ModelPlan, ...]


def read_key_file(path: str | Path) -> str:
    """The API key in ``path``: its first line that is not empty or a ``#`` comment."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {file}: {exc}") from exc
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ConfigError(f"the API key file {file} holds no key", hint="put the key on its first line")


_SERVER_KEYS: dict[str, _tables.Convert] = {
    "host": _tables.string,
    "port": _tables.integer(0),
    "api_key": _tables.secret,
    "api_key_file": _tables.string,
    "allowed_hosts": _tables.strings,
    "cors_origins": _tables.strings,
    "max_loaded": _tables.integer(1),
    "memory_budget": _tables.budget,
    "vram_budget": _tables.budget,
    "model_dirs": _tables.strings,
}
_MODEL_KEYS: dict[str, _tables.Convert] = {
    "path": _tables.string,
    "ctx": _tables.integer(0),
    "parallel": _tables.integer(1),
    "gpu_layers": _tables.gpu_layers,
    "devices": _tables.devices,
    "threads": _tables.integer(1),
    "memory_limit": parse_size,
    "ttl": _tables.duration,
    "queue": _tables.integer(0),
    "order": _tables.order,
    "args": _tables.extra_args,
    "aliases": _tables.strings,
    "startup_timeout": _tables.duration,
    "rpc": _tables.strings,
    "tensor_split": _tables.shares,
    "stall_timeout": _tables.duration,
}
_WORKER_KEYS: dict[str, _tables.Convert] = {
    "endpoint": _tables.endpoint,
    "trusted_network": _tables.boolean,
}


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate parsed TOML (a dict); raises :class:`ConfigError` naming the key path."""
    for key in data:
        if key not in ("server", "models", "workers", "remote"):
            raise _tables.unknown_key("", key, ["server", "models", "workers", "remote"])
    server = ServerSection(**_tables.section(data.get("server", {}), "server.", _SERVER_KEYS))
    workers = _workers(data.get("workers", {}))
    tables = data.get("models", {})
    remote = _remote(data.get("remote", {}))
    if not isinstance(tables, dict) or not (tables or remote):
        raise ConfigError("models: declare at least one [models.NAME] table")
    models: dict[str, ModelSection] = {}
    taken = {a: f"remote.{n}" for n, r in remote.items() for a in (n, *r.aliases)}
    for name, table in tables.items():
        if not _tables.NAME.match(name):
            raise ConfigError(
                f"models.{name}: invalid model name",
                hint="use letters, digits, '.', '_' or '-' (it also names the log file)",
            )
        model = ModelSection(**_tables.section(table, f"models.{name}.", _MODEL_KEYS))
        for alias in (name, *model.aliases):
            if alias in taken:
                raise ConfigError(f"models.{name}: the name {alias!r} is taken by {taken[alias]}")
            taken[alias] = f"models.{name}"
        models[name] = model
    _check_groups(models, workers)
    return Config(
        server=server,
        models=MappingProxyType(models),
        workers=MappingProxyType(workers),
        remote=MappingProxyType(remote),
    )


def _remote(tables: Any) -> dict[str, RemoteSection]:
    """The ``[remote.NAME]`` tables, their names unique among them."""
    if not tables:
        return {}
    from procman.distributed.remote import parse_remote  # cycle: it uses this module's parsers

    remote = parse_remote(tables)
    taken: dict[str, str] = {}
    for name, section in remote.items():
        for alias in (name, *section.aliases):
            if alias in taken:
                raise ConfigError(f"remote.{name}: the name {alias!r} is taken by {taken[alias]}")
            taken[alias] = f"remote.{name}"
    return remote


def _workers(tables: Any) -> dict[str, WorkerSection]:
    """The ``[workers.NAME]`` tables; a worker beyond loopback must be on a trusted network."""
    from procman.distributed.rpc import is_loopback  # speed

    if not isinstance(tables, dict):
        raise ConfigError(f"workers: expected tables, got {tables!r}")
    workers = {}
    for name, table in tables.items():
        if not _tables.NAME.match(name):
            raise ConfigError(f"workers.{name}: invalid worker name")
        worker = WorkerSection(**_tables.section(table, f"workers.{name}.", _WORKER_KEYS))
        if not worker.endpoint:
            raise ConfigError(
                f"workers.{name}.endpoint: missing", hint='e.g. endpoint = "192.168.1.20:50052"'
            )
        if not worker.trusted_network and not is_loopback(worker.endpoint):
            raise ConfigError(
                f"workers.{name}: {worker.endpoint} is beyond this machine, and the RPC protocol "
                "has no authentication: anyone on the path can read the model and its work",
                hint="only on a network you trust: set trusted_network = true in this table",
            )
        workers[name] = worker
    return workers


def _check_groups(models: Mapping[str, ModelSection], workers: Mapping[str, WorkerSection]) -> None:
    """Each model's ``rpc`` names declared workers, each worker serves one model (a worker
    takes one leader at a time), and ``tensor_split`` has a share per worker."""
    used: dict[str, str] = {}
    for name, model in models.items():
        for worker in model.rpc:
            if worker not in workers:
                known = ", ".join(workers) or "none declared"
                raise ConfigError(
                    f"models.{name}.rpc: no [workers.{worker}] table",
                    hint=f"declare it with its endpoint (workers: {known})",
                )
            if worker in used:
                raise ConfigError(
                    f"models.{name}.rpc: worker {worker!r} is already used by "
                    f"models.{used[worker]}",
                    hint="an RPC worker serves one llama-server at a time: give each model its own",
                )
            used[worker] = name
        if len(set(model.rpc)) != len(model.rpc):
            raise ConfigError(f"models.{name}.rpc: a worker is listed twice")
        if model.tensor_split and len(model.tensor_split) != len(model.rpc):
            raise ConfigError(
                f"models.{name}.tensor_split: {len(model.tensor_split)} shares for "
                f"{len(model.rpc)} workers",
                hint="one share per worker, in the order of rpc",
            )


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", hint=exc.hint) from exc


# -- documentation from the docstrings -----------------------------------------------------------
def _field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring written under it (Python keeps these only in the source)."""
    import ast  # speed: docs only; `serve` imports this module on its way to a first answer
    import inspect  # speed
    import itertools  # speed

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            # single backticks: the text goes into Markdown and TOML comments, not reST
            docs[node.target.id] = " ".join(after.value.value.split()).replace("``", "`")
    return docs


_KINDS = {
    "host": "string", "port": "integer", "api_key": "string", "api_key_file": "string",
    "allowed_hosts": "list of strings", "cors_origins": "list of strings", "max_loaded": "integer",
    "memory_budget": 'size or "auto"', "vram_budget": 'size or "auto"', "path": "string",
    "ctx": "integer", "parallel": "integer", "gpu_layers": 'integer, "auto" or "all"',
    "threads": "integer", "devices": '"auto", "all" or a list of GPU indices/UUIDs',
    "memory_limit": "size", "ttl": "duration", "queue": "integer", "order": '"fifo" or "lifo"',
    "args": "list of strings", "aliases": "list of strings", "startup_timeout": "duration",
    "rpc": "list of worker names", "tensor_split": "list of numbers", "stall_timeout": "duration",
    "endpoint": "string", "trusted_network": "boolean",
    "model_dirs": "list of strings",
}  # fmt: skip


def _show_default(name: str, value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "`[]`"
    if isinstance(value, StrEnum | str):
        return f'`"{value}"`'
    if name in ("startup_timeout", "stall_timeout"):
        return f'`"{format_duration(value)}"`'
    return f"`{value}`"


def reference() -> str:
    """The config file reference as Markdown, generated from the field docstrings."""
    lines = [
        'Sizes are bytes or strings such as `"512MiB"`, `"2GiB"`, `"1.5GB"`; durations are '
        'seconds or strings such as `"90s"`, `"10m"`, `"1h30m"`.',
    ]
    import inspect  # speed: docs only

    from procman.distributed.remote import KINDS, RemoteSection  # cycle

    kinds = {**KINDS, **_KINDS}
    tables = (
        ("[server]", ServerSection),
        ("[models.NAME]", ModelSection),
        ("[workers.NAME]", WorkerSection),
        ("[remote.NAME]", RemoteSection),
    )
    for table, cls in tables:
        lines += ["", f"### `{table}`", "", (inspect.getdoc(cls) or "").replace("``", "`"), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        docs = _field_docs(cls)
        for item in fields(cls):
            default = item.default if item.default is not MISSING else None
            shown = _show_default(item.name, default)
            lines.append(f"| `{item.name}` | {kinds[item.name]} | {shown} | {docs[item.name]} |")
    return "\n".join(lines) + "\n"


#: the starter file's data: two models that work out of the box with the demo model
_STARTER: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 8080, "max_loaded": 2,
               "memory_budget": "auto", "vram_budget": "auto"},
    "models": {
        "chat": {"path": DEMO_MODEL, "ctx": 2048, "parallel": 1, "ttl": "10m", "queue": 64,
                 "order": "fifo", "args": ["--temp", "0.7"], "aliases": ["default"]},
        "embed": {"path": DEMO_MODEL, "ctx": 512, "ttl": "5m",
                  "args": ["--embeddings", "--pooling", "mean"]},
    },
}  # fmt: skip


def starter() -> str:
    """A commented starter ``models.toml``: tomli-w writes the data, the docstrings the comments."""
    import tomli_w  # speed

    docs = {"server": _field_docs(ServerSection), "models": _field_docs(ModelSection)}
    out = [
        "# llamactl config: `llamactl serve --config THIS_FILE`.",
        '# Sizes: "2GiB", "512MiB"; durations: "90s", "10m", "1h".',
        "# Unset keys take their defaults; see `python -m procman.config --reference`.",
        "",
    ]
    section = docs["server"]
    for line in tomli_w.dumps(_STARTER).splitlines():
        if line.startswith("["):
            section = docs["server" if line == "[server]" else "models"]
        key = line.split(" = ", 1)[0]
        if " = " in line and key in section:
            out.append(f"# {section[key]}")
        out.append(line)
    at = out.index("[server]") + 1
    out[at:at] = [f"# {docs['server']['api_key']}", '# api_key = "change-me"']
    text = "\n".join(out) + "\n"
    parse_config(tomllib.loads(text))  # the starter must stay valid as the schema changes
    return text


def main(argv: list[str]) -> int:
    """``python -m procman.config --reference``: the docs generator, kept out of the library API."""
    if argv != ["--reference"]:
        sys.stderr.write("usage: python -m procman.config --reference\n")
        return 2
    sys.stdout.write(reference())
    return 0
