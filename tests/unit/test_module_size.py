"""No module of the package grows past ~600 lines without saying why at its top.

A long module is allowed when its docstring carries a paragraph starting ``Why one module:`` that
gives the reason (for example one class whose state must have one owner). The layer order itself is
checked by ``lint-imports`` (``make lint``; contracts in pyproject.toml).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 600
MODULES = sorted(p for pkg in ("exchange", "recovery") for p in (ROOT / pkg).rglob("*.py"))


def _reason(path: Path) -> bool:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return "Why one module:" in doc


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_short_or_says_why(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= LIMIT or _reason(path), (
        f"{path.relative_to(ROOT)} has {lines} lines (> {LIMIT}): split it by role, or give the reason in its "
        "docstring in a paragraph starting 'Why one module:'")


def test_the_check_sees_a_long_module(tmp_path: Path) -> None:
    long = tmp_path / "long.py"
    long.write_text('"""A module."""\n' + "x = 1\n" * (LIMIT + 1))
    assert not _reason(long)
    assert len(long.read_text().splitlines()) > LIMIT
    long.write_text('"""A module.\n\nWhy one module: one owner of the state.\n"""\n' + "x = 1\n" * (LIMIT + 1))
    assert _reason(long)
