"""One-shot Wanda cost: time against a plain forward pass over the same calibration tokens, and peak memory with
8 vs 2 decoder layers of the same width (it must not grow with depth beyond the weights).

    .venv/bin/python benchmarks/oneshot.py [--quick]

Each measurement runs in a fresh subprocess (peak RSS is per process); times are medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import rss_now  # noqa: E402


def build(layers: int, hidden: int, inter: int, vocab: int):
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def child(args) -> None:
    import pruning

    torch.set_num_threads(args.threads)
    rss0 = rss_now()
    model = build(args.layers, args.hidden, args.inter, args.vocab)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    out = {"params": sum(p.numel() for p in model.parameters()), "weights_bytes": weights}
    protocols = ("dense", "sequential")
    if args.mode == "memory":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        pruning.prune(model, calib, method="wanda", sparsity=0.5, within_layer=args.within_layer, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(rss_before_model=rss0, peak_before=base, peak=peak)
    else:
        with torch.no_grad():  # warm-up: first calls pay one-off allocation and kernel selection
            model(input_ids=calib[0], use_cache=False)
        for p in protocols:
            pruning.prune(
                build(args.layers, args.hidden, args.inter, args.vocab),
                calib[:1],
                method="wanda",
                within_layer=p,
                progress=False,
            )
        fwd = {p: [] for p in protocols}
        shot = {p: [] for p in protocols}
        for _ in range(args.repeats):
            for p in protocols:  # interleaved: each one-shot run is paired with the forward timed just before it
                m = build(args.layers, args.hidden, args.inter, args.vocab)
                t0 = time.perf_counter()
                with torch.no_grad():
                    for ids in calib:
                        m(input_ids=ids, use_cache=False)
                fwd[p].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                pruning.prune(m, calib, method="wanda", sparsity=0.5, within_layer=p, progress=False)
                shot[p].append(time.perf_counter() - t0)
        out["runs"] = {
            p: {
                "forward_s": statistics.median(fwd[p]),
                "oneshot_s": statistics.median(shot[p]),
                "ratios": [s / f for s, f in zip(shot[p], fwd[p])],
            }
            for p in protocols
        }
    print(json.dumps(out))


def run_child(**kw) -> dict:
    cmd = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in kw.items()]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--mode", default="time")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--within_layer", default="dense")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.hidden, args.inter, args.vocab, args.seq, args.batches, args.repeats = 128, 352, 1024, 128, 2, 1
    common = dict(
        hidden=args.hidden,
        inter=args.inter,
        vocab=args.vocab,
        seq=args.seq,
        batch=args.batch,
        batches=args.batches,
        threads=args.threads,
    )
    t = run_child(mode="time", layers=args.layers, repeats=args.repeats, **common)
    tokens = args.seq * args.batch * args.batches
    print(
        f"## One-shot Wanda (50 % unstructured, per row) vs a plain forward, {t['params'] / 1e6:.1f}M-parameter "
        f"Llama, {tokens} calibration tokens, {args.threads} CPU threads\n"
    )
    print(
        "| protocol (`within_layer`) | plain forward (s) | one-shot Wanda (s) | ratio (median of paired) | "
        "ratios per repeat | target |"
    )
    print("|---|---:|---:|---:|---|---|")
    for p, r in t["runs"].items():
        per = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(
            f"| `{p}` | {r['forward_s']:.2f} | {r['oneshot_s']:.2f} | {statistics.median(r['ratios']):.2f}× | "
            f"{per} | ≤ 1.5× |"
        )
    print()
    print("## Peak memory (RSS) of one-shot Wanda vs depth, same width\n")
    print("| protocol | layers | params | weights (MB) | peak RSS (MB) | peak − weights − interpreter (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in ("dense", "sequential"):
        for layers in (2, args.layers):
            m = run_child(mode="memory", layers=layers, within_layer=p, **common)
            over = (m["peak"] - m["weights_bytes"] - m["rss_before_model"]) / 2**20
            print(
                f"| `{p}` | {layers} | {m['params'] / 1e6:.1f}M | {m['weights_bytes'] / 2**20:.0f} | "
                f"{m['peak'] / 2**20:.0f} | {over:.0f} |"
            )


if __name__ == "__main__":
    main()
