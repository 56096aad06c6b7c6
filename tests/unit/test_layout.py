"""procman's layout rules, checked on the source (see docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROCMAN = Path(__file__).resolve().parents[2] / "procman"
SOURCES = sorted(PROCMAN.rglob("*.py"))


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import inside a function body."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found.append((inner.lineno, lines[inner.end_lineno - 1]))  # type: ignore[operator]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PROCMAN)))
def test_every_function_level_import_says_why(path: Path) -> None:
    unexplained = [
        f"{path.name}:{line}: {text.strip()}"
        for line, text in function_level_imports(path)
        if "# speed" not in text and "# cycle" not in text
    ]
    assert not unexplained, "say '# speed' or '# cycle' beside each:\n" + "\n".join(unexplained)


def test_no_module_is_left_flat_beside_the_packages() -> None:
    top = sorted(p.name for p in PROCMAN.glob("*.py"))
    assert top == [
        "__init__.py", "_lazy.py", "_loop.py", "_units.py", "errors.py",
        "events.py", "spec.py",
    ]  # fmt: skip


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PROCMAN)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 650, "split it: one job per module"
