"""The documentation runs (issue #18): ``mkdocs build --strict`` builds ``docs/``; every fenced code block of the
README and of ``docs/`` is executed. Python blocks run (a page's blocks in order, in one namespace); shell blocks run
their ``pruning ...`` commands in-process; YAML and JSON blocks parse. The commands run in a temporary directory
holding ``configs/`` and the offline stand-ins the docs name: ``.cache/demo-model`` (what ``pruning demo-model`` puts
there) and ``.cache/demo-pruned`` (the main job's export; here the demo model itself). A block that cannot run here
(a hub download, GPUs, a cluster, the main job itself) is preceded by ``<!-- test: skip REASON -->``, and the reason
must be given. The benchmarks page's generated sections still regenerate in place (``benchmarks/run_all.py``).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the generated fragments run_all.py copies into the benchmarks page are not pages (mkdocs.yml: exclude_docs)
FRAGMENTS = {"quality_table.md", "speed.md", "memory.md", "overhead.md", "benchmarks_time.md"}
PAGES = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in FRAGMENTS)]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SKIP = re.compile(r"<!--\s*test:\s*skip\b(.*?)-->")
SHELL = {"bash", "sh", "shell", "console"}


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    skip: str | None  # the reason, when the block is marked


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page (indented ones in lists too), with their skip reasons."""
    lines = page.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        code = textwrap.dedent("\n".join(line[len(indent) :] for line in lines[i + 1 : j]))
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = SKIP.search(before)
        out.append(Block(page, start + 1, lang, code, marker.group(1).strip() if marker else None))
        i = j + 1
    return out


ALL = [b for p in PAGES for b in blocks(p)]


def commands(code: str) -> list[str]:
    """The shell block's command lines: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with configs/ and the stand-ins the docs name."""
    from pruning.commands.demo import load_or_train

    work = tmp_path_factory.mktemp("docs")
    (work / "configs").symlink_to(ROOT / "configs")
    load_or_train(work / ".cache/demo-model", log=lambda _line: None)
    shutil.copytree(work / ".cache/demo-model", work / ".cache/demo-pruned")
    return work


def test_every_page_has_code_and_every_skip_a_reason():
    assert {p.name for p in PAGES} >= {"README.md", "index.md", "oneshot.md", "training.md", "recovery.md"}
    assert len([b for b in ALL if b.skip is None and b.lang in ("python", *SHELL)]) >= 8
    for b in ALL:
        where = f"{b.page.name}:{b.line}"
        assert b.skip is None or len(b.skip) > 10, f"{where}: a skip needs its reason"
        if b.lang in SHELL and b.skip is None:  # what runs here is the project's command only
            bad = [c for c in commands(b.code) if not c.startswith("pruning ")]
            assert not bad, f"{where}: {bad} cannot run here; mark the block <!-- test: skip REASON -->"


def test_docs_build_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "oneshot" / "index.html").is_file()


def test_benchmark_sections_regenerate_in_place():
    """run_all.py finds every marker pair on the benchmarks page and, from the outputs in docs/, writes the page
    as it is (links into docs/ made relative to it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    page = run_all.PAGE.read_text()
    for name in run_all.SECTIONS:
        assert f"<!-- {name}:begin -->" in page and f"<!-- {name}:end -->" in page, name
    copy = ROOT / ".cache" / "benchmarks-guide.md"
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(page)
    done = run_all.update_readme(copy, ROOT / "docs", log=lambda _line: None)
    assert done == list(run_all.SECTIONS)
    text = copy.read_text().replace("](docs/", "](")  # the copy is not under docs/: its links keep the prefix
    assert text == page


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.skip is None for b in blocks(p))], ids=lambda p: p.name)
def test_code_blocks_run(page, workdir, monkeypatch, capsys):
    from pruning.commands import run

    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    for b in blocks(page):
        where = f"{page.name}:{b.line}"
        if b.skip is not None or b.lang in ("", "text"):
            continue
        if b.lang == "python":
            exec(compile(b.code, where, "exec"), namespace)  # noqa: S102 (the documentation's own code)
        elif b.lang in SHELL:
            for command in commands(b.code):
                try:
                    run(shlex.split(command)[1:])
                except SystemExit as done:  # --help / --print_config end with exit code 0
                    assert done.code in (0, None), f"{where}: {command}: exit {done.code}"
        elif b.lang in ("yaml", "yml"):
            yaml.safe_load(b.code)
        elif b.lang == "json":
            json.loads(b.code)
        else:
            pytest.fail(f"{where}: a ```{b.lang} block: run it here, or mark it <!-- test: skip REASON -->")
    out = capsys.readouterr().out
    if "pruning prune --config configs/oneshot/demo.yaml" in page.read_text():
        assert "perplexity 5.8077" in out  # the number the docs print next to the command
