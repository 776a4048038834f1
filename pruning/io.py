"""Writing results without losing what was there: a file is written next to its target and renamed over it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically: a temporary file in the same directory, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
