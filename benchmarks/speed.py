"""Prefill latency and generation speed of compacted models vs the dense one (CPU, or CUDA with ``--device``).

A Llama-family model (by default ~100M parameters with embeddings, ~50M in the decoder layers; ``--preset
llama-3.2-1b`` for LLaMA-3.2-1B's shapes) is built from its config with random weights (speed does not depend on the
values), pruned with ``method='magnitude'`` at several structured
granularities and compacted with :func:`pruning.compact`. All models are timed in the same process, repeats
interleaved across configurations, and the median taken, so the speed-ups are ratios within one run.

Each pruned model is timed right after a dense run and the speed-up is the median of these paired ratios (the
machine may be shared; pairing cancels slow drifts of its load).

Prefill computes logits for the last position only (``logits_to_keep=1``, what ``generate`` does), so the LM head
costs one token. The ideal ratio is the analytic matmul FLOP ratio dense/pruned for that prefill: every Linear
(``2·in·out`` per token) plus attention scores and the weighted sum (``2·2·heads·head_dim`` per causal query-key
pair, ``T(T+1)/2`` pairs per head).

    python benchmarks/speed.py            # full run (a few minutes), prints a markdown table
    python benchmarks/speed.py --quick    # smoke run
    python benchmarks/speed.py --device cuda --dtype bfloat16 --preset llama-3.2-1b --tokens 4096
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import emit  # noqa: E402

import pruning  # noqa: E402

CONFIGS: list[tuple[str, str | None, float]] = [
    ("dense", None, 0.0),
    ("MLP neurons 20%", "mlp_neuron", 0.2),
    ("MLP neurons 30%", "mlp_neuron", 0.3),
    ("MLP neurons 50%", "mlp_neuron", 0.5),
    ("KV groups 25%", "attention_head", 0.25),
    ("layers 25%", "layer", 0.25),
]


# Model shapes: the default small one for CPU runs, LLaMA-3.2-1B's (its config.json: 16 layers, hidden 2048,
# intermediate 8192, 32 heads / 8 KV heads, vocab 128256, tied embeddings) for GPU runs.
PRESETS: dict[str, dict] = {
    "small": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}


def build_dense(preset: str, layers: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The dense benchmark model, random init (SDPA attention), in ``dtype``."""
    shape = dict(PRESETS[preset])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    cfg = LlamaConfig(max_position_embeddings=8192, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


def describe(model: nn.Module) -> str:
    c = model.config
    return (
        f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, intermediate {c.intermediate_size}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, vocab {c.vocab_size}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_flops(model: nn.Module, tokens: int, head_dim: int) -> float:
    """Analytic matmul FLOPs of a prefill of ``tokens`` tokens, logits for the last one (read from the modules, so
    a compacted model's per-layer widths count)."""
    flops = 0.0
    for layer in model.model.layers:
        linears = (m for m in layer.modules() if isinstance(m, nn.Linear))
        flops += sum(2.0 * m.in_features * m.out_features for m in linears) * tokens
        heads = layer.self_attn.q_proj.out_features // head_dim
        flops += 2 * 2.0 * heads * head_dim * tokens * (tokens + 1) / 2
    head = model.get_output_embeddings()
    flops += 2.0 * head.in_features * head.out_features
    return flops


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(ids.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decoding tokens/s: (generate with ``new_tokens``) minus (generate with 1 token), so prefill is excluded."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
    sync(prompt.device)
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    sync(prompt.device)
    t1 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(prompt.device)
    t2 = time.perf_counter()
    return (new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    ap.add_argument("--tokens", type=int, default=None, help="prefill length (default 2048, quick 128)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7, quick 1)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shapes (default small)")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--batch", type=int, default=1, help="prefill batch size (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    tokens = args.tokens or (128 if args.quick else 2048)
    repeats = args.repeats or (1 if args.quick else 7)
    gen_prompt, gen_new = (16, 8) if args.quick else (128, 64)
    gen_repeats = 1 if args.quick else 3
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    dense = build_dense(args.preset, args.layers, dtype).to(device)
    models: dict[str, nn.Module] = {}
    for name, gran, sparsity in CONFIGS:
        if gran is None:
            models[name] = dense
            continue
        m = copy.deepcopy(dense)
        res = pruning.prune(m, None, method="magnitude", sparsity=sparsity, granularity=gran, progress=False)
        pruning.compact(m, res.masks)
        models[name] = m

    g = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, tokens), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, gen_prompt), generator=g).to(device)
    for m in models.values():  # warm-up: the first generate() calls of a process are several times slower
        time_prefill(m, ids[:, : min(tokens, 256)])
        for _ in range(2):
            time_generate(m, prompt, min(gen_new, 8))
    # Each configuration is timed right after a dense run (paired), rounds repeated: the speed-up is the median of
    # the paired ratios, which cancels slow drifts of a shared machine's load.
    pre: dict[str, list[float]] = {k: [] for k in models}
    ratio: dict[str, list[float]] = {k: [] for k in models}
    gen: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            if k == "dense":
                continue
            d = time_prefill(dense, ids)
            t = time_prefill(m, ids)
            pre["dense"].append(d)
            pre[k].append(t)
            ratio[k].append(d / t)
    ratio["dense"] = [1.0]
    for _ in range(gen_repeats):
        for k, m in models.items():
            gen[k].append(time_generate(m, prompt, gen_new))

    hd = dense.config.hidden_size // dense.config.num_attention_heads
    base_f = prefill_flops(dense, tokens, hd)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    lines = [
        f"Llama-family ({args.preset}), {describe(dense)}, {args.dtype}, {where}, SDPA; prefill {tokens} tokens "
        f"(batch {args.batch}, logits for the last token), {repeats} "
        "rounds, each config timed right after a dense run; ms = median, speed-up = median of the paired ratios; "
        f"generate: {gen_new} new tokens after a {gen_prompt}-token prompt, "
        f"median of {gen_repeats}.",
        "",
        f"| config | params | prefill ms @ {tokens} | speed-up | ideal FLOP ratio | speed-up / ideal | "
        "generate tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, m in models.items():
        t = statistics.median(pre[k])
        speed = statistics.median(ratio[k])
        ideal = base_f / prefill_flops(m, tokens, hd)
        lines.append(
            f"| {k} | {n_params(m) / 1e6:.2f}M | {t * 1e3:.0f} | {speed:.3f} | {ideal:.3f} | "
            f"{speed / ideal:.3f} | {statistics.median(gen[k]):.1f} |"
        )
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
