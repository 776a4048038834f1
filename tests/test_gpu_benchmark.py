"""benchmarks/gpu.py (the GPU checks) runs end to end on the CPU at tiny sizes: every one-shot method, masked vs
compacted logits, and the recovery fit with the masks held."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu  # noqa: E402


def test_gpu_checks_smoke_on_cpu():
    out = gpu.main(["--quick", "--device", "cpu", "--dtype", "float32", "--stages", "oneshot,fit"])
    rows = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(rows) == len(gpu.ONESHOT)
    diffs = [float(m) for m in re.findall(r"rel\. diff ([0-9.e+-]+)", out)]
    assert len(diffs) == sum(g not in ("unstructured", "2:4") for _, g, _ in gpu.ONESHOT) and max(diffs) < 1e-5
    zero, total = map(int, re.search(r"exactly zero after training: (\d+)/(\d+)", out).groups())
    assert zero == total > 0
