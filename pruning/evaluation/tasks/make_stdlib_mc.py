"""Regenerate ``stdlib_mc/stdlib_mc.jsonl`` (deterministic): ``python -m pruning.evaluation.tasks.make_stdlib_mc``.

Every item is a prefix of a Python file from the standard library's *held-out* split (:func:`pruning.text.
stdlib_files`, split by file, so a model trained on the ``train`` split has never seen it), cut at a line start, and
four candidate continuations: the true next line(s) and three copies of it with one typo each (two adjacent
characters swapped inside an identifier of at least four characters): minimal pairs, as in BLiMP. The choices have
the same length, so ``acc`` equals ``acc_norm``. A model that has learned Python source picks the true one well
above chance (25 %): the demo model (1M parameters, 800 steps) gets 0.80; a random model is at chance. Next
lines taken from other files as distractors were tried first: a model that small barely uses the context (0.3).
The generator reads the running interpreter's standard library; the committed jsonl is the task (``source``
records file and line of each item).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from pruning.text.stdlib import stdlib_files, stdlib_root

OUT = Path(__file__).resolve().parent / "stdlib_mc" / "stdlib_mc.jsonl"
N_ITEMS = 100
N_CHOICES = 4
CONTEXT_CHARS = (160, 320)  # whole lines, at least / at most this many characters of prefix
CONTINUATION_CHARS = (24, 100)  # whole lines, at least / at most
SEED = 1234
SKIP = ("encodings/",)  # character tables, not code
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _continuation(lines: list[str], i: int) -> str | None:
    """Lines ``i, i+1, ...`` until at least CONTINUATION_CHARS[0] characters (``None`` if longer than the max, blank
    or a comment only)."""
    out = ""
    j = i
    while j < len(lines) and len(out) < CONTINUATION_CHARS[0]:
        out += lines[j]
        j += 1
    if not CONTINUATION_CHARS[0] <= len(out) <= CONTINUATION_CHARS[1] or not out.endswith("\n"):
        return None
    body = [ln.strip() for ln in out.splitlines() if ln.strip()]
    if not body or all(ln.startswith("#") for ln in body) or sum(len(ln) for ln in body) < 12:
        return None
    return out


def _context(lines: list[str], i: int) -> str | None:
    out = ""
    j = i
    while j > 0 and len(lines[j - 1]) + len(out) <= CONTEXT_CHARS[1]:
        out = lines[j - 1] + out
        j -= 1
    return out if len(out) >= CONTEXT_CHARS[0] and out.strip() else None


def _candidates(path: Path) -> list[tuple[int, str, str]]:
    """``(line, context, continuation)`` for every usable cut point of one file (ASCII text only)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    if not text.isascii():
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for i in range(1, len(lines)):
        cont = _continuation(lines, i)
        if cont is None:
            continue
        ctx = _context(lines, i)
        if ctx is not None:
            out.append((i + 1, ctx, cont))
    return out


def _transpositions(text: str) -> list[str]:
    """Every copy of ``text`` with two adjacent, different characters swapped inside one identifier of at least
    four characters (a typo a model that knows Python's identifiers notices)."""
    out = []
    for mo in _IDENT.finditer(text):
        word = mo.group(0)
        if len(word) < 4:
            continue
        for i in range(len(word) - 1):
            if word[i] != word[i + 1]:
                typo = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
                out.append(text[: mo.start()] + typo + text[mo.end() :])
    return sorted(set(out))


def make_items(n_items: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    root = stdlib_root()
    files = [p for p in stdlib_files("heldout") if not p.relative_to(root).as_posix().startswith(SKIP)]
    per_file = {p.relative_to(root).as_posix(): _candidates(p) for p in files}
    names = sorted(k for k, v in per_file.items() if v)
    rng = random.Random(seed)
    rng.shuffle(names)
    items: list[dict] = []
    used: set[tuple[str, int]] = set()
    k = 0
    while len(items) < n_items:
        name = names[k % len(names)]
        k += 1
        line, ctx, truth = rng.choice(per_file[name])
        typos = _transpositions(truth)
        if (name, line) in used or len(typos) < N_CHOICES - 1:
            continue
        distractors = rng.sample(typos, N_CHOICES - 1)
        label = rng.randrange(N_CHOICES)
        choices = distractors[:label] + [truth] + distractors[label:]
        used.add((name, line))
        items.append({"id": len(items), "source": f"{name}:{line}", "context": ctx, "choices": choices, "label": label})
    return items


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--n", type=int, default=N_ITEMS)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    items = make_items(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    print(f"wrote {len(items)} items to {args.out} (Python {sys.version.split()[0]} standard library)")


if __name__ == "__main__":
    main()
