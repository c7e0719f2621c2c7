"""README.md against the tree: its Layout lists every module, and every path it names exists.

The Layout section names each module by its path from the repository root (``exchange/pipeline/writer.py``)
and each package by its folder (``exchange/pipeline/``). A package whose code is all in its
``__init__.py`` (``exchange/adapters/postgres/``) is listed by its folder. So a module added, moved or
removed under ``exchange/`` or ``recovery/`` fails here until the README says where it belongs.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("exchange", "recovery")  # the trees whose every module the Layout must list
# a backticked path from the repository root: `exchange/core/book.py`, `tests/unit/`, `config/demo.toml`
_PATH = re.compile(r"`((?:exchange|recovery|tests|bench|config|scripts|examples)/[A-Za-z0-9_./-]*)`")
USER_FILES = {"config/exchange.toml"}  # what a user writes, not the repository (README: "Configuration")


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section: up to the next heading of level 2."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"README.md has no '## {title}' section"
    return match.group(1)


def named_paths(text: str) -> set[str]:
    return set(_PATH.findall(text))


def modules() -> set[str]:
    """Every module file (but ``__init__.py``) and every folder holding Python code, under PACKAGES."""
    found: set[str] = set()
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "__pycache__" in rel.parts:
                continue
            found.add(rel.parent.as_posix() + "/")
            if path.name != "__init__.py":
                found.add(rel.as_posix())
    return found


def missing(paths: set[str]) -> list[str]:
    return sorted(p for p in paths - USER_FILES
                  if not (ROOT / p).exists() or (p.endswith("/") and not (ROOT / p).is_dir()))


def test_the_layout_lists_every_module_and_package() -> None:
    listed = named_paths(section(readme(), "Layout"))
    unlisted = sorted(modules() - listed)
    assert not unlisted, ("README.md '## Layout' does not list these; add one line each, under its pipeline stage, "
                          "on what it does: " + ", ".join(unlisted))


def test_every_path_the_layout_lists_exists() -> None:
    gone = missing(named_paths(section(readme(), "Layout")))
    assert not gone, "README.md '## Layout' lists paths that do not exist: " + ", ".join(gone)


def test_every_path_the_readme_names_exists() -> None:
    gone = missing(named_paths(readme()))
    assert not gone, "README.md names paths that do not exist: " + ", ".join(gone)


def test_the_metrics_table_lists_every_metric() -> None:
    source = (ROOT / "exchange" / "telemetry" / "metrics.py").read_text(encoding="utf-8")
    defined = set(re.findall(r'"exchange_([a-z0-9_]+)"', source))
    assert defined, "no metric names found in exchange/telemetry/metrics.py"
    table = section(readme(), "Operations")
    absent = sorted(name for name in defined if f"`{name}`" not in table)
    assert not absent, "README.md '### Metrics' does not list: " + ", ".join(absent)
