"""The speed benchmark runs on compacted (heterogeneous per-layer) models: a smoke run at tiny sizes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speed  # noqa: E402


def test_speed_quick_table():
    table = speed.main(["--quick", "--layers", "4", "--tokens", "16", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "config" not in line]
    assert [r[0].strip() for r in rows] == [name for name, _, _ in speed.CONFIGS]
    ideal = {r[0].strip(): float(r[4]) for r in rows}
    assert ideal["dense"] == 1.0
    assert all(v > 1.0 for k, v in ideal.items() if k != "dense")
    assert 1.2 < ideal["layers 25%"] < 4 / 3  # one of four layers gone; the LM head's one token stays


def test_gradient_statistics_callback_smoke():
    """The callback part of ``benchmarks/grad_stats.py`` (``overhead.py``'s alternating fits): every configuration
    scores its steps and prunes nothing (its event lies beyond the run, which passes the start-up check)."""
    import grad_stats

    table = grad_stats.main(["--quick", "--only", "callback", "--pairs", "1", "--warmup", "1"])
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "config" not in line]
    assert [r[0].strip() for r in rows] == list(grad_stats.CALLBACK_CONFIGS)
