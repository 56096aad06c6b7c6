"""The router's table of model endpoints (procman.router.routes), with plain values."""

from __future__ import annotations

import json

import pytest

from procman.router.routes import (
    NOT_ROUTED,
    POST_PATHS,
    ROUTES,
    Dialect,
    ModelFrom,
    dialect_of,
    error_body,
    find_route,
    form_field,
)


@pytest.mark.parametrize(
    ("method", "path", "model_from", "dialect"),
    [
        ("POST", "/v1/chat/completions", ModelFrom.BODY, Dialect.OPENAI),
        ("POST", "/v1/responses", ModelFrom.BODY, Dialect.OPENAI),
        ("POST", "/v1/messages", ModelFrom.BODY, Dialect.ANTHROPIC),
        ("POST", "/v1/messages/count_tokens", ModelFrom.BODY, Dialect.ANTHROPIC),
        ("POST", "/infill", ModelFrom.BODY, Dialect.OPENAI),
        ("POST", "/v1/audio/transcriptions", ModelFrom.FORM, Dialect.OPENAI),
        ("GET", "/props", ModelFrom.QUERY, Dialect.OPENAI),
        ("POST", "/slots/0", ModelFrom.QUERY, Dialect.OPENAI),
    ],
)
def test_routes_are_found_by_method_and_path(
    method: str, path: str, model_from: ModelFrom, dialect: Dialect
) -> None:
    route = find_route(method, path)
    assert route is not None and route.model_from is model_from and route.dialect is dialect


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/completions"), ("POST", "/health"), ("POST", "/slots/0/x"),
     ("POST", "/v1/models"), ("DELETE", "/props"), ("GET", "/slots/0")],
)  # fmt: skip
def test_anything_else_is_no_model_endpoint(method: str, path: str) -> None:
    assert find_route(method, path) is None


def test_the_table_has_no_duplicates_and_nothing_both_routed_and_not() -> None:
    keys = [(r.method, r.path) for r in ROUTES]
    assert len(keys) == len(set(keys))
    assert not {r.path for r in ROUTES} & set(NOT_ROUTED) - {"/models"}
    assert "/v1/messages" in POST_PATHS and "/props" in POST_PATHS
    assert all(r.what for r in ROUTES)


def test_errors_take_the_shape_of_the_api() -> None:
    anthropic = error_body(404, "no such model", "invalid_request_error", "x", Dialect.ANTHROPIC)
    assert anthropic == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "no such model"},
    }
    openai = error_body(404, "no such model", "invalid_request_error", "x", Dialect.OPENAI)
    assert openai["error"] == {
        "message": "no such model",
        "type": "invalid_request_error",
        "param": None,
        "code": "x",
    }
    assert dialect_of("/v1/messages/count_tokens") is Dialect.ANTHROPIC
    assert dialect_of("/v1/responses") is Dialect.OPENAI
    json.dumps(anthropic)


def test_a_form_field_is_read_from_a_multipart_body() -> None:
    boundary = "----llamactl7"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f'Content-Type: audio/wav\r\n\r\nRIFF\x00\x01name="model"\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        f"--{boundary}--\r\n"
    ).encode("latin-1")
    content_type = f'multipart/form-data; boundary="{boundary}"'
    assert form_field(body, content_type, "model") == "whisper"
    assert form_field(body, content_type, "stream") is None
    assert form_field(body, "multipart/form-data", "model") is None  # no boundary
