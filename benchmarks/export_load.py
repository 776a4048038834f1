"""Loading a per-layer (non-uniform) export against a uniform export of the same size: peak RSS and wall time of
:func:`pruning.load_pretrained`, each load in a fresh process. Target: per-layer within 1.2× of uniform on both.

The per-layer export: a Llama-family model (random init, fp32) whose MLP neurons are pruned at rates that differ
per layer (``layer_rates``, magnitude), compacted and saved; the uniform one: the same model family with
``intermediate_size`` chosen so that it holds as many parameters (to a fraction of a percent), saved unpruned.
The per-layer model is built with its parameters on the ``meta`` device and its layers at their own widths, the
weights assigned from the memory-mapped safetensors (before: the full-width model was built and initialised).

    .venv/bin/python benchmarks/export_load.py            # ~78M-parameter exports (about a minute)
    .venv/bin/python benchmarks/export_load.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import emit, rss_peak, settle  # noqa: E402


def config(args, inter: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
    )


def write_exports(args, root: Path) -> dict:
    """The per-layer export and the uniform one of the same size; their parameter counts."""
    from transformers import AutoModelForCausalLM

    import pruning

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(args, args.inter))
    rates = [0.2 + 0.5 * i / max(1, args.layers - 1) for i in range(args.layers)]  # 0.2 … 0.7
    result = pruning.prune(model, method="magnitude", granularity="mlp_neuron", layer_rates=rates, progress=False)
    pruning.compact(model, result.masks)
    pruning.save_pretrained(model, root / "per_layer")
    kept = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    uniform_inter = round(mlp / (3 * args.hidden * args.layers))
    uniform = AutoModelForCausalLM.from_config(config(args, uniform_inter))
    pruning.save_pretrained(uniform, root / "uniform")
    return {"per_layer": kept, "uniform": sum(p.numel() for p in uniform.parameters())}


def child(path: str) -> None:
    torch.set_num_threads(2)
    import pruning

    base = settle()
    t0 = time.perf_counter()
    model = pruning.load_pretrained(path)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak": rss_peak(), "base": base, "params": model.num_parameters()}))


def load_in_child(path: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2, help="loads of each export (the fastest is reported)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.quick:
        args.layers, args.hidden, args.inter, args.vocab, args.heads, args.repeats = 2, 64, 256, 512, 4, 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = write_exports(args, root)
        res = {}
        for kind in ("uniform", "per_layer"):
            runs = [load_in_child(root / kind) for _ in range(args.repeats)]
            res[kind] = min(runs, key=lambda r: r["seconds"])
            res[kind]["peak"] = min(r["peak"] for r in runs)
    mb = 2**20
    u, p = res["uniform"], res["per_layer"]
    peak_ratio = (p["peak"] - p["base"]) / (u["peak"] - u["base"])
    time_ratio = p["seconds"] / u["seconds"]
    lines = [
        f"Llama-family exports, fp32: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; per-layer: MLP "
        f"neurons pruned at 0.2…0.7 by layer from intermediate {args.inter} ({params['per_layer'] / 1e6:.1f}M "
        f"params); uniform: {params['uniform'] / 1e6:.1f}M params. Each load a fresh process (best of "
        f"{args.repeats}); peak RSS above the RSS after imports. MB = 2^20 bytes.",
        "",
        "| export | parameters | load time (s) | peak RSS − imports (MB) |",
        "|---|---:|---:|---:|",
        f"| uniform | {u['params'] / 1e6:.1f}M | {u['seconds']:.2f} | {(u['peak'] - u['base']) / mb:.0f} |",
        f"| per-layer | {p['params'] / 1e6:.1f}M | {p['seconds']:.2f} | {(p['peak'] - p['base']) / mb:.0f} |",
        "",
        f"per-layer / uniform: peak {peak_ratio:.2f}×, time {time_ratio:.2f}× (target ≤ 1.2× each: "
        f"{'met' if max(peak_ratio, time_ratio) <= 1.2 else '**missed**'})",
    ]
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
