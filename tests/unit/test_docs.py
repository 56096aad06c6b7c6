"""The README's config reference is the generated one, not a hand-kept copy."""

from __future__ import annotations

from pathlib import Path

from procman.config import reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_matches_the_dataclasses() -> None:
    text = README.read_text()
    start = text.index("<!-- config-reference:start -->") + len("<!-- config-reference:start -->")
    end = text.index("<!-- config-reference:end -->")
    documented = text[start:end].strip()
    assert documented == reference().strip().replace("### `", "#### `"), (
        "README config reference is stale: regenerate it with python -m procman.config --reference"
    )


def test_readme_endpoint_table_matches_the_routes() -> None:
    from procman.router.routes import reference as endpoints

    text = README.read_text()
    start = text.index("<!-- endpoints:start -->") + len("<!-- endpoints:start -->")
    documented = text[start : text.index("<!-- endpoints:end -->")].strip()
    assert documented == endpoints().strip(), (
        "README endpoint table is stale: regenerate it from procman.router.routes.reference()"
    )
