"""The expert-pruning quality benchmark end to end in miniature (the smoke preset: a few training steps), so that it
cannot rot; the full run is benchmarks/moe_quality.py's default preset."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import moe_quality  # noqa: E402


def test_moe_quality_smoke(tmp_path, capsys):
    out = tmp_path / "result.json"
    png = tmp_path / "moe.png"
    result = moe_quality.main(
        ["--preset", "smoke", "--cache", str(tmp_path / "cache"), "--out", str(out), "--plot", str(png)]
    )
    rows = result["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        (m, s) for s in moe_quality.SPARSITIES for m in moe_quality.CRITERIA
    ]
    dense = result["dense"]["parameters"]
    for r in rows:  # 4 experts: 1 removed at 25 %, 2 at 50 %; each of the 2 layers loses 3·32·32 + 32 per expert
        removed = round(r["sparsity"] * 4)
        assert r["experts_kept"] == 4 - removed
        assert r["parameters"] == dense - 2 * removed * (3 * 32 * 32 + 32)
        assert math.isfinite(r["pruned_ppl"]) and math.isfinite(r["recovered_ppl"])
    assert json.loads(out.read_text())["rows"] == rows
    assert math.isfinite(result["dense_recovered_ppl"]) and png.stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| reap | 50% | 2 |" in table
    # cached: a second call reuses the trained model (same manifest)
    again, _ = moe_quality.load_or_train(moe_quality.PRESETS["smoke"], tmp_path / "cache" / "smoke")
    assert sum(p.numel() for p in again.parameters()) == dense
