"""Every model endpoint of llama-server (b11312) the router forwards, in one table.

A request names its model the way its API does: ``"model"`` in a JSON body
(OpenAI, Anthropic and llama.cpp's own endpoints), a ``model`` field of a
multipart form (audio transcriptions), or ``?model=NAME`` on the endpoints of
one server (``/props``, ``/slots``, ``/metrics``, as llama.cpp's own router
mode does). Errors go back in the shape the API's clients expect
(:class:`Dialect`). Everything llama-server registers that is not here is in
:data:`NOT_ROUTED`, with the reason; ``tests/integration/test_routes.py``
checks both against the routes the pinned server really registers, so a
llama.cpp bump that adds one is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "NOT_ROUTED", "POST_PATHS", "ROUTES", "Dialect", "ModelFrom", "Route", "dialect_of",
    "error_body", "find_route", "form_field", "reference",
]  # fmt: skip


class Dialect(StrEnum):
    """Whose error format a path answers in."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class ModelFrom(StrEnum):
    """Where a request names its model."""

    BODY = "body"
    FORM = "form"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    """The path; one ending in ``/`` takes any last segment (``/slots/0``)."""
    model_from: ModelFrom = ModelFrom.BODY
    dialect: Dialect = Dialect.OPENAI
    what: str = ""
    """Which API, or which client uses it (the README lists these)."""


def _routes(method: str, what: str, *paths: str, **kw: ModelFrom | Dialect) -> list[Route]:
    return [Route(method, path, what=what, **kw) for path in paths]  # type: ignore[arg-type]


ROUTES: tuple[Route, ...] = (
    *_routes("POST", "OpenAI chat completions", "/v1/chat/completions", "/chat/completions"),
    *_routes(
        "POST",
        "OpenAI chat completions: count the prompt's tokens",
        "/v1/chat/completions/input_tokens",
        "/chat/completions/input_tokens",
    ),
    *_routes(
        "POST", "end a reasoning block mid-answer (llama.cpp)", "/v1/chat/completions/control"
    ),
    *_routes("POST", "OpenAI completions", "/v1/completions"),
    *_routes("POST", "llama.cpp completions (native)", "/completion", "/completions"),
    *_routes("POST", "OpenAI Responses API", "/v1/responses", "/responses"),
    *_routes(
        "POST",
        "OpenAI Responses API: count the input's tokens",
        "/v1/responses/input_tokens",
        "/responses/input_tokens",
    ),
    *_routes("POST", "OpenAI embeddings", "/v1/embeddings"),
    *_routes("POST", "llama.cpp embeddings (native)", "/embedding", "/embeddings"),
    *_routes(
        "POST",
        "reranking (Jina/Cohere style)",
        "/v1/rerank",
        "/rerank",
        "/reranking",
        "/v1/reranking",
    ),
    *_routes("POST", "fill in the middle (editor plugins)", "/infill"),
    *_routes("POST", "tokenize, detokenize, render the chat template", "/tokenize"),
    *_routes("POST", "tokenize, detokenize, render the chat template", "/detokenize"),
    *_routes("POST", "tokenize, detokenize, render the chat template", "/apply-template"),
    *_routes(
        "POST",
        "OpenAI audio transcriptions (multipart form)",
        "/v1/audio/transcriptions",
        "/audio/transcriptions",
        model_from=ModelFrom.FORM,
    ),
    *_routes(
        "POST",
        "Anthropic Messages API",
        "/v1/messages",
        "/v1/messages/count_tokens",
        dialect=Dialect.ANTHROPIC,
    ),
    *_routes(
        "GET",
        "one server's properties, slots, metrics, LoRA adapters (?model=NAME)",
        "/props",
        "/slots",
        "/metrics",
        "/lora-adapters",
        model_from=ModelFrom.QUERY,
    ),
    *_routes(
        "POST",
        "change one server's properties, slots, LoRA adapters (?model=NAME)",
        "/props",
        "/lora-adapters",
        "/slots/",
        model_from=ModelFrom.QUERY,
    ),
)

#: what llama-server b11312 registers and the router does not forward, and why
NOT_ROUTED: dict[str, str] = {
    "/health": "llamactl answers it (every model's state)",
    "/v1/health": "llamactl answers /health",
    "/models": "llamactl answers /v1/models: every model it serves, loaded or not",
    "/v1/models": "llamactl answers it: every model it serves, loaded or not",
    "/models/load": "llama.cpp's router mode; llamactl's is POST /admin/load/NAME",
    "/models/unload": "llama.cpp's router mode; llamactl's is POST /admin/unload/NAME",
    "/models/sse": "llama.cpp's router mode; llamactl's events are its own",
    "/v1/stream": "resumable streams: which server holds a stream is not known to llamactl yet",
    "/v1/streams/lookup": "resumable streams (see /v1/stream)",
    "/cors-proxy": "llama-server's web UI helper, off unless started with it: never exposed",
    "/tools": "llama-server's web UI tools, off unless started with them: never exposed",
}

_EXACT = {(r.method, r.path): r for r in ROUTES if not r.path.endswith("/")}
_PREFIX = [r for r in ROUTES if r.path.endswith("/")]
#: POST paths the front answers itself (everything POSTed here names a model)
POST_PATHS = frozenset(r.path for r in ROUTES if r.method == "POST" and r in _EXACT.values())


def find_route(method: str, path: str) -> Route | None:
    """The route of ``method path`` (the path without its query), if it is a model's."""
    route = _EXACT.get((method, path))
    if route is None:
        for each in _PREFIX:
            if (
                method == each.method
                and path.startswith(each.path)
                and "/" not in path[len(each.path) :]
            ):
                return each
    return route


def dialect_of(path: str) -> Dialect:
    """The error format for a path (Anthropic's for its endpoints, OpenAI's elsewhere)."""
    return Dialect.ANTHROPIC if path.startswith("/v1/messages") else Dialect.OPENAI


#: Anthropic's error types, by HTTP status (its clients switch on them)
_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
    429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip


def error_body(
    status: int, message: str, kind: str, code: str | None, dialect: Dialect
) -> dict[str, object]:
    """An error as the path's API writes one: OpenAI's ``{"error": {...}}``, or Anthropic's
    ``{"type": "error", "error": {"type": ..., "message": ...}}``."""
    if dialect is Dialect.ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def form_field(body: bytes, content_type: str, name: str) -> str | None:
    """The text of field ``name`` in a ``multipart/form-data`` body, or None."""
    _, _, params = content_type.partition(";")
    boundary = ""
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        return None
    wanted = f'name="{name}"'.encode()
    for part in body.split(b"--" + boundary.encode())[1:]:
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition:") and wanted in line:
                return content.removesuffix(b"\r\n").decode("utf-8", "replace")
    return None


_HOW = {
    ModelFrom.BODY: '`"model"` in the JSON body',
    ModelFrom.FORM: "the form's `model` field",
    ModelFrom.QUERY: "`?model=NAME`",
}


def reference() -> str:
    """The table of endpoints as Markdown, for the README (a test keeps the two equal)."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for route in ROUTES:
        path = f"{route.path}ID" if route.path.endswith("/") else route.path
        rows.setdefault((route.method, route.what, _HOW[route.model_from]), []).append(path)
    lines = ["| endpoint | the model is named by | what it is |", "|---|---|---|"]
    for (method, what, how), paths in rows.items():
        listed = ", ".join(f"`{path}`" for path in paths)
        lines.append(f"| {method} {listed} | {how} | {what} |")
    return "\n".join(lines) + "\n"
