"""How much GBLM's gradient term changes Wanda's choice, on the quality benchmark's reference model.

GBLM's score is Wanda's ``|W|·‖X_j‖₂`` plus ``α·|W|·G`` (``G = sqrt(Σ_n g_n²)`` over per-sequence CE gradients). For
50 % unstructured pruning (per row) with the quality benchmark's 64 calibration windows, this prints the share of
the pruned weights that differ from Wanda's pruned set for α = 100 (the project's default), α = 100·√N (the authors'
weighting, see ``pruning/importance/gblm.py``) and the gradient term alone (α → ∞), and the size of the gradient
term next to the activation term (median over the weights of each Linear, then over the Linears).

    .venv/bin/python benchmarks/gblm_vs_wanda.py [--out benchmarks/results/gblm_vs_wanda.md]   # ~1 min, 2 cores
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import reference_model as refm  # noqa: E402

from pruning import prune  # noqa: E402
from pruning.stats import ActivationCollector  # noqa: E402
from pruning.structure import ModelStructure  # noqa: E402
from pruning.text.stdlib import batches, windows  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=list(refm.PRESETS))
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    ref = refm.load_or_train(refm.PRESETS[args.preset], refm.DEFAULT_CACHE, "cpu", name=args.preset)
    dense = ref.model.eval()
    seq = ref.manifest["key"]["preset"]["seq_len"]
    calib = list(batches(windows(ref.train_ids, seq, args.calibration, seed=0), 8))  # as quality.py
    shared = quality.shared_gradients(dense, calib, set())
    authors = 100.0 * math.sqrt(args.calibration)
    masks = {}
    scores = (
        ("wanda", "wanda", None),
        ("gblm α=100", "gblm", 100.0),
        (f"gblm α=100·√N={authors:g}", "gblm", authors),
        ("gradient term alone", "gblm", 1e12),
    )
    for label, method, alpha in scores:
        model = copy.deepcopy(dense)
        opts = {} if alpha is None else {"alpha": alpha}
        r = prune(
            model,
            calib,
            method,
            0.5,
            "unstructured",
            criterion_options=opts,
            gradients=shared if alpha is not None else None,
            progress=False,
        )
        masks[label] = {n: r.masks.keep_mask(n, model.get_parameter(n)) for n in sorted(r.masks.names())}
    pruned = sum(int((~m).sum()) for m in masks["wanda"].values())
    # the two terms of GBLM's score, per weight: α·G against ‖X_j‖
    mods = ModelStructure(dense).targets(False, False)
    acts = ActivationCollector(mods).attach()
    with torch.no_grad():
        for b in calib:
            dense(input_ids=b)
    acts.detach()
    acts.reduce()
    ratios = []
    for n in sorted(mods):
        g = shared.stats[n + ".weight"].sums["sum_sq"].sqrt()
        x = acts.stats[n].sums["sum_sq"].sqrt()
        ratios.append(float((g / x.clamp_min(1e-12)[None, :]).median()))
    med = sorted(ratios)[len(ratios) // 2]
    lines = [
        f"Reference model `{args.preset}` ({ref.manifest['parameters'] / 1e6:.1f}M parameters), 50 % unstructured "
        f"per row, {args.calibration} calibration windows of {seq} tokens (seed 0, as `quality.py`); "
        f"{pruned:,} weights pruned.",
        "",
        "| score | pruned weights that differ from Wanda's | share of Wanda's pruned set |",
        "|---|---:|---:|",
    ]
    for label, m in masks.items():
        if label == "wanda":
            continue
        diff = sum(int((m[n] != masks["wanda"][n]).sum()) for n in m) // 2
        lines.append(f"| {label} | {diff:,} ({100 * diff / pruned:.2f} %) | {100 * (1 - diff / pruned):.1f} % |")
    lines += [
        "",
        f"Median over the Linears of the median per weight of G / ‖X_j‖: {med:.2e}; times α = 100: "
        f"{100 * med:.3f}, times α = {authors:g}: {authors * med:.3f} (the activation term is 1 on this scale).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        title = "# GBLM's gradient term against Wanda's choice (`benchmarks/gblm_vs_wanda.py`)"
        args.out.write_text(title + "\n\n" + text + "\n")
    return text


if __name__ == "__main__":
    main()
