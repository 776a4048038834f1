"""Shared set-up of the test suite.

- One thread per process: the suite runs on 2 shared CPU cores, where oversubscribed threads make tiny models ~10x
  slower (the multi-process tests set ``OMP_NUM_THREADS=1`` for their workers too).
- ``tests/`` is importable (``from tiny import tiny_model``), also for the scripts the multi-process tests start;
  ``tests/tiny.py`` is the one place that builds tiny models and model configs.
- Markers (``--strict-markers``): ``multiprocess`` (starts several processes: DDP, FSDP, torchrun). The fast
  subset for the inner loop is ``pytest -m "not multiprocess"`` (under a minute on 2 cores); CI runs everything.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
for p in (str(TESTS), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on localhost, for the rendezvous of the process groups the multi-process tests start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
