"""The whole benchmark suite in one command; regenerates the tables of docs/benchmarks-guide.md and the plots.

    .venv/bin/python benchmarks/run_all.py                     # everything (see docs/benchmarks.md for how long)
    .venv/bin/python benchmarks/run_all.py --only quality      # one stage (the reference model is cached)
    .venv/bin/python benchmarks/run_all.py --quick             # smoke run of every stage, pages untouched

Stages, each in a fresh subprocess (threads and memory peaks do not mix), timed:

1. ``reference_model``: the quality benchmark's trained Llama (cached under ``.cache/reference-model/``; trained once,
   about 30 minutes on 2 cores);
2. ``quality``: every criterion at equal sparsity, before and after recovery (``docs/quality.md``, ``docs/*.png``);
3. ``speed``, ``overhead``, ``memory``: ``benchmarks/<name>.py --out docs/<name>.md`` (skipped if the script does
   not exist).

Afterwards the generated sections of the benchmarks page (``docs/benchmarks-guide.md``, which the README links) are
replaced, each between its pair of markers (``<!-- name:begin -->`` … ``<!-- name:end -->``), links to ``docs/``
made relative to the page: ``quality`` (``docs/quality_table.md``), ``speed``,
``overhead``, ``memory`` (``docs/<name>.md``) and ``benchmarks-time`` (how long each stage took). A marker pair
missing from the page is reported and skipped. The timings also go to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STAGES = ("reference_model", "quality", "speed", "overhead", "memory")
PAGE = ROOT / "docs" / "benchmarks-guide.md"  # where the generated sections are (the README links it)
# section -> file under the output folder whose content goes between its markers
SECTIONS = {
    "quality": "quality_table.md",
    "speed": "speed.md",
    "overhead": "overhead.md",
    "memory": "memory.md",
    "benchmarks-time": "benchmarks_time.md",
}


def replace_between_markers(text: str, name: str, content: str) -> str:
    """``text`` with everything between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by ``content``
    (on its own lines). Raises ``KeyError`` if the pair is missing or out of order."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise KeyError(f"markers {begin} … {end} not found")
    return text[: i + len(begin)] + "\n" + content.strip("\n") + "\n" + text[j:]


def update_readme(readme: Path, out: Path, log=print) -> list[str]:
    """Replace every generated section of ``readme`` (the benchmarks page) whose markers and source file exist; links
    into ``docs/`` are made relative to a page inside ``docs/``; returns the sections done."""
    text = readme.read_text()
    in_docs = readme.resolve().parent == (ROOT / "docs").resolve()
    done = []
    for name, fname in SECTIONS.items():
        src = out / fname
        if not src.exists():
            log(f"{readme.name}: {name}: {src} does not exist, section left as it is")
            continue
        try:
            content = src.read_text()
            text = replace_between_markers(text, name, content.replace("](docs/", "](") if in_docs else content)
            done.append(name)
        except KeyError as e:
            log(f"{readme.name}: {name}: {e.args[0]}, section skipped")
    readme.write_text(text)
    return done


def stage_command(stage: str, args, out: Path) -> list[str] | None:
    py = sys.executable
    script = BENCH / f"{stage}.py"
    if not script.exists():
        return None
    if stage == "reference_model":
        preset = "tiny" if args.quick else args.preset
        return [py, str(script), "--preset", preset, "--device", args.device]
    if stage == "quality":
        cmd = [py, str(script), "--out", str(out), "--device", args.device]
        if args.quick:
            return cmd + [
                "--preset",
                "tiny",
                "--calibration",
                "4",
                "--eval-windows",
                "4",
                "--recovery-steps",
                "2",
                "--recovery-batch",
                "2",
            ]
        return cmd + ["--preset", args.preset]
    return [py, str(script), "--out", str(out / f"{stage}.md")] + (["--quick"] if args.quick else [])


def fmt_minutes(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help=f"comma-separated stages out of {list(STAGES)}")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    ap.add_argument("--preset", default="cpu", help="reference model preset (cpu, gpu)")
    ap.add_argument("--device", default="cpu", help="where the reference model is trained (cpu, cuda)")
    ap.add_argument("--quick", action="store_true", help="smoke run of every stage; outputs under .cache/bench-quick")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default docs/, quick: .cache/bench-quick)")
    ap.add_argument(
        "--readme", type=Path, default=None, help="page to update (default docs/benchmarks-guide.md; not with --quick)"
    )
    ap.add_argument("--no-readme", action="store_true", help="leave the benchmarks page alone")
    args = ap.parse_args(argv)
    out = (args.out or (ROOT / ".cache/bench-quick" if args.quick else ROOT / "docs")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.only.split(",")] if args.only else list(STAGES)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = [s for s in stages + list(skip) if s not in STAGES]
    if bad:
        ap.error(f"unknown stages {bad}; choose from {list(STAGES)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    record: list[dict] = []
    t_all = time.time()
    for stage in stages:
        if stage in skip:
            continue
        cmd = stage_command(stage, args, out)
        if cmd is None:
            print(f"== {stage}: benchmarks/{stage}.py does not exist, skipped", flush=True)
            record.append({"stage": stage, "status": "missing", "seconds": 0.0, "command": None})
            continue
        print(f"== {stage}: {' '.join(Path(c).name if c == sys.executable else c for c in cmd)}", flush=True)
        t = time.time()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        secs = time.time() - t
        status = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"== {stage}: {status} in {fmt_minutes(secs)}", flush=True)
        shown = [os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd[1:]]  # no machine paths
        record.append({"stage": stage, "status": status, "seconds": secs, "command": " ".join(shown)})

    # timings: merged with earlier runs' (a stage not run now keeps its last time), docs/benchmarks.md in full, the
    # benchmarks page's section in short
    history_path = out / "benchmarks.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    today = dt.date.today().isoformat()
    for r in record:
        history[r["stage"]] = dict(r, date=today)
    history_path.write_text(json.dumps(history, indent=2) + "\n")
    manifest = ROOT / ".cache/reference-model" / ("tiny" if args.quick else args.preset) / "manifest.json"
    train_s = json.loads(manifest.read_text())["times"]["train_s"] if manifest.exists() else None
    lines = ["| stage | status | time | run on |", "|---|---|---:|---|"]
    suite = 0.0
    for stage in STAGES:
        r = history.get(stage)
        if r is None:
            continue
        note = ""
        if stage == "reference_model" and train_s is not None and r["seconds"] < 0.5 * train_s:
            note = f" (cached; training took {fmt_minutes(train_s)})"
            suite += train_s
        else:
            suite += r["seconds"]
        lines.append(f"| {stage} | {r['status']} | {fmt_minutes(r['seconds'])}{note} | {r['date']} |")
    lines.append(f"| **whole suite, reference model trained** | | **{fmt_minutes(suite)}** | |")
    summary = (
        f"`python benchmarks/run_all.py` on {os.cpu_count()} CPU cores (shared with other jobs while "
        f"measured); time per stage:\n\n" + "\n".join(lines) + "\n"
    )
    (out / "benchmarks_time.md").write_text(summary)
    (out / "benchmarks.md").write_text(
        "# Benchmark suite timings\n\n" + summary + "\n```json\n" + json.dumps(history, indent=2) + "\n```\n"
    )
    print("\n" + summary + f"\n(this invocation: {fmt_minutes(time.time() - t_all)})")
    if not args.no_readme and (args.readme or not args.quick):
        readme = args.readme or PAGE
        done = update_readme(readme, out)
        print(f"{readme.name} sections regenerated: {done or 'none'}")
    return 0 if all(r["status"] in ("ok", "missing") for r in record) else 1


if __name__ == "__main__":
    sys.exit(main())
