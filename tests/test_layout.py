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


def test_core_and_one_shot_never_import_lightning():
    """``import pruning`` and a one-shot ``prune`` (activation and gradient criteria) run without lightning."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from tiny import calib, tiny_model\n"
        "import pruning\n"
        "pruning.prune(tiny_model('llama'), calib(), 'wanda', 0.5, progress=False)\n"
        "pruning.prune(tiny_model('llama'), calib(), 'sdm', 0.25, 'mlp_neuron', progress=False)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": f"{ROOT / 'tests'}{':' + str(ROOT)}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _private_imports(path: Path) -> list[str]:
    """``from X import _y`` where X is another module of this project."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] == "pruning"
            out += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if ours and _private(a.name)]
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_a_private_name_of_another():
    assert not [p for f in _modules(*SOURCES) for p in _private_imports(f)]


MAX_FUNCTION_LINES = 80  # code lines: the docstring (the CLI help of a signature) does not count
MAX_FILE_LINES = 500
MAX_COMPLEXITY = 15  # ruff's mccabe limit, also enforced by `ruff check` (C901)


def _long_functions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if ast.get_docstring(node, clean=False) is not None:
            doc = node.body[0]
            length -= doc.end_lineno - doc.lineno + 1
        reason = any("# long: " in lines[i] for i in (node.lineno - 2, node.lineno - 1) if i >= 0)
        if length > MAX_FUNCTION_LINES and not reason:
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_functions_and_files_stay_readable():
    """No function above ~80 lines of code (its docstring aside), no file above ~500 lines, unless a
    ``# long: <reason>`` comment says why (on the line above the ``def``, or in a file's first ten lines)."""
    long_functions, long_files = [], []
    for f in _modules(*SOURCES):
        text = f.read_text()
        long_functions += _long_functions(f)
        head = "\n".join(text.splitlines()[:10])
        if text.count("\n") > MAX_FILE_LINES and "# long: " not in head:
            long_files.append(f"{f.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long_functions and not long_files, long_functions + long_files
