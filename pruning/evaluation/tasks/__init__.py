"""Local lm-eval tasks shipped with the package (YAML + data), usable offline.

``pruning.evaluation.harness`` points lm-eval's ``TaskManager(include_path=...)`` at this directory; the stock
``lm_eval`` CLI can
too (``lm_eval --include_path <this directory> --tasks stdlib_mc ...``, with this package importable).

- ``stdlib_mc``: 4-way multiple choice on the Python standard library's held-out source (the split the demo model
  never trains on): given a code prefix, pick its true next line(s) among three copies with one typo each (two
  adjacent characters of an identifier swapped). 100 items in ``stdlib_mc/stdlib_mc.jsonl``, regenerated
  deterministically by ``make_stdlib_mc.py``; metrics ``acc`` and ``acc_norm`` (equal: the choices have one length).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_stdlib_mc(**kwargs: Any):
    """lm-eval ``custom_dataset`` of ``stdlib_mc``: the shipped jsonl as an in-memory ``datasets`` split ``test``
    (read from next to this file, whatever the working directory; nothing downloaded, nothing cached on disk).
    lm-eval passes the task's metadata as keyword arguments; they are not needed."""
    import datasets

    rows = read_jsonl(TASKS_DIR / "stdlib_mc" / "stdlib_mc.jsonl")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
