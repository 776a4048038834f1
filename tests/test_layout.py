"""The shape of the code base: what is installed, what may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pruning", "callbacks", "datamodules")
INSTALLED_AS = {"callbacks": "pruning.callbacks", "datamodules": "pruning.datamodules"}


def _package_name(init: Path) -> str:
    parts = init.parent.relative_to(ROOT).parts
    top = INSTALLED_AS.get(parts[0], parts[0])
    return ".".join((top, *parts[1:]))


def _modules(*folders: str) -> list[Path]:
    return sorted(f for d in folders for f in (ROOT / d).rglob("*.py"))


def test_installed_packages_are_the_package_folders():
    """pyproject's explicit package list (needed for the callbacks/ → pruning.callbacks mapping) stays complete."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {_package_name(f) for d in SOURCES for f in (ROOT / d).rglob("__init__.py")}
    assert set(project["packages"]) == folders
    assert project["package-dir"] == {v: k for k, v in INSTALLED_AS.items()}
    assert not [p for p in project["packages"] if not p.startswith("pruning")]  # no generic top-level name


def test_nothing_imports_the_uninstalled_top_level_names():
    """``callbacks`` and ``datamodules`` exist only as ``pruning.callbacks`` / ``pruning.datamodules`` once installed;
    importing them under their folder names would also make a second copy of every class in them."""
    bad = []
    for f in _modules(*SOURCES, "tests", "benchmarks"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in INSTALLED_AS]
    assert not bad
