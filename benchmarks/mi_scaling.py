"""Mutual-information redundancy: time and peak memory against layer width, exact all-pairs vs clustered.

    .venv/bin/python benchmarks/mi_scaling.py [--widths 256 1024 4096 8192] [--samples 256] [--threads 1]

Activations are synthetic FFN activations ``silu(X A) ⊙ (X B)`` of ``samples`` tokens (hidden size 256), with
planted redundancy: 5 % of the neurons exact copies of others, 5 % noisy near-copies (linear or through tanh).
Each (width, mode) runs in a fresh subprocess: peak RSS is per process, and the reported memory is the peak over
the baseline once the activations exist. "copies first": share of the exact-copy pairs that lose a member among
the first removals (as many as there are pairs). "near-copies in one cluster": share of the planted near-copy pairs
with ρ ≥ 0.5 that the clustering keeps together (pairs across clusters are never compared). "overlap": share of the
neurons the exact run removes at 25 % sparsity that the clustered run removes too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def activations(width: int, samples: int, seed: int = 0):
    """FFN-like activations with planted redundancy: ``width // 20`` exact copies and ``width // 20`` noisy
    near-copies (every other one through ``tanh``, noise std uniform in [0, 1] of the neuron's)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, 256, generator=g)
    A = torch.randn(256, width, generator=g) / 16
    B = torch.randn(256, width, generator=g) / 16
    Z = torch.nn.functional.silu(X @ A) * (X @ B)
    perm = torch.randperm(width, generator=g).tolist()
    k = max(1, width // 20)
    copies = [(perm[2 * i], perm[2 * i + 1]) for i in range(k)]
    near = [(perm[2 * i], perm[2 * i + 1]) for i in range(k, 2 * k)]
    for a, b in copies:
        Z[:, b] = Z[:, a]
    for i, (a, b) in enumerate(near):
        base = Z[:, a] if i % 2 == 0 else torch.tanh(Z[:, a] / Z[:, a].std())
        Z[:, b] = base / base.std() + float(torch.rand(1, generator=g)) * torch.randn(samples, generator=g)
    return Z, copies, near


def child(args) -> None:
    from pruning.importance.mutual_info import cluster_neurons, mi2_matrix, redundancy_order, standardize

    torch.set_num_threads(args.threads)
    Z, copies, near = activations(args.width, args.samples)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    order = redundancy_order(Z, cluster_size=None if args.mode == "exact" else args.cluster_size)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ranked = order.scores.argsort().tolist()
    first = set(ranked[: len(copies)])
    hit = sum(len(first & {a, b}) == 1 for a, b in copies) / len(copies)
    # the strongly redundant planted near-copies (ρ ≥ 0.5): how many did the reduction keep in one cluster
    Zs, Zk = standardize(Z)[0], standardize(Z, robust=True)[0]  # for clustering, for kernels (as the criterion)
    strong = []
    for a, b in near:
        M, _ = mi2_matrix(Zk[:, [a, b]])
        if float(M[0, 1] / ((M[0, 0] + M[1, 1]) / 2)) >= 0.5:
            strong.append((a, b))
    together = len(strong)
    if args.mode == "clustered" and args.width > args.cluster_size:
        label = torch.empty(args.width, dtype=torch.long)
        for i, c in enumerate(cluster_neurons(Zs, args.cluster_size)):
            label[c] = i
        together = sum(int(label[a] == label[b]) for a, b in strong)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mb": (peak - base) / 2**20,
                "copies_first": hit,
                "near_recall": together / max(1, len(strong)),
                "strong": len(strong),
                "removed": ranked[: args.width // 4],
                "info": order.info,
            }
        )
    )


def run(width: int, mode: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--width",
        str(width),
        "--mode",
        mode,
        "--samples",
        str(args.samples),
        "--threads",
        str(args.threads),
        "--cluster-size",
        str(args.cluster_size),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cluster-size", type=int, default=128)
    p.add_argument("--max-exact", type=int, default=8192, help="widest layer run with all pairs")
    p.add_argument("--child", action="store_true")
    p.add_argument("--width", type=int)
    p.add_argument("--mode", choices=["exact", "clustered"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mi_scaling.md"))
    args = p.parse_args()
    if args.child:
        child(args)
        return
    lines = [
        f"## Mutual-information redundancy: time and memory vs width ({args.samples} samples, α = 2, "
        f"{args.threads} CPU thread{'s' if args.threads > 1 else ''})",
        "",
        f"`{Path(__file__).name}`; clustered = sign-invariant spherical k-means into clusters of about "
        f"{args.cluster_size} neurons (each neuron then joined to its most correlated neighbour), MI within clusters "
        "only; exact = all pairs.",
        "",
        "| neurons | mode | clusters | pairs evaluated | time (s) | cluster / MI / greedy (s) | peak memory (MB) "
        "| copies first | near-copies in one cluster | overlap with exact at 25 % |",
        "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for width in args.widths:
        exact = run(width, "exact", args) if width <= args.max_exact else None
        clustered = run(width, "clustered", args)
        for mode, r in (("exact", exact), ("clustered", clustered)):
            if r is None:
                continue
            s = r["info"]["seconds"]
            overlap = (
                ""
                if exact is None or mode == "exact"
                else f"{len(set(r['removed']) & set(exact['removed'])) / max(1, len(exact['removed'])):.2f}"
            )
            lines.append(
                f"| {width} | {mode} | {r['info']['clusters']} | {r['info']['pairs']:,} | {r['seconds']:.2f} | "
                f"{s['cluster']:.2f} / {s['mi']:.2f} / {s['greedy']:.2f} | {r['peak_mb']:.0f} | "
                f"{r['copies_first']:.2f} | {r['near_recall']:.2f} ({r['strong']}) | {overlap} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "Exact all-pairs costs n²·m²/2 multiply-adds and n² floats: time and memory grow with the square of the width."
        " Clustered, MI is computed for about n·s/2 pairs (s ≈ cluster size): linear in width. Every exact copy goes"
        " first, and every strongly redundant near-copy (ρ ≥ 0.5) stays inside one cluster, so its MI is computed."
        " The order among"
        " weakly redundant neurons (ρ ≈ 0.1–0.2, the bulk of a 25 % cut here) differs from the exact run's, which"
        " compares them across clusters too: hence the overlap of about half.",
        "",
        "Machine: 2 shared CPU cores (other jobs running), so times are indicative.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
