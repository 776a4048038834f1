"""Models larger than the host's memory: ``pruning.prune(path, calibration, method, save_to=DIR)`` on a Llama-shaped
checkpoint with random bf16 weights, against the in-memory path on the same model (which fits here).

The checkpoint is written one layer at a time (never whole in memory): at the default shapes 1.36B parameters, 24
layers, 2.7 GB. Each run is a fresh process: peak RSS (``VmHWM``) above the RSS after imports, and wall time; the
streamed run writes the pruned (compacted, for ``mlp_neuron``) model to a temporary ``save_to``.

The memory formula the streamed peak is checked against (it does not grow with depth):
``embeddings + head + 2 × one layer (bf16) + one layer's statistics (fp32) + activations``, where activations are
the calibration hidden states of every layer (kept for the walk back of gradient criteria: ``L × tokens × hidden ×
2`` bytes; one layer's for activation criteria) plus the logits (``tokens × vocab × 4`` bytes, ×3 for the loss and
its gradient) and the layer's intermediate activations (``tokens × intermediate × 4 × 4``), plus 64 MB of
allocator and interpreter slack (the modeling code and kernels are warmed up on a tiny model before the baseline).

    .venv/bin/python benchmarks/streaming.py                 # 1.36B parameters (about 40 minutes on 2 cores)
    .venv/bin/python benchmarks/streaming.py --quick         # smoke run
    .venv/bin/python benchmarks/streaming.py --llama-8b --methods wanda --no-in-memory   # 16 GB, outside CI
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import emit, rss_peak, settle  # noqa: E402

METHODS = {  # method -> granularity
    "wanda": "unstructured",
    "sparsegpt": "unstructured",
    "taylor": "mlp_neuron",
    "gblm": "unstructured",
    "sdm": "mlp_neuron",
}
MB = 2**20


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def write_checkpoint(args, root: Path) -> dict:
    """A Llama checkpoint with random bf16 weights (std 0.02, norms 1), written one layer per shard."""
    import json as _json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from pruning.surgery.meta import parameters_on_meta

    config = llama_config(args)
    with parameters_on_meta():
        skeleton = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in skeleton.named_parameters():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append((name, p.shape))
    weight_map, total = {}, 0
    for k, params in enumerate(groups.values()):
        state = {}
        for name, shape in params:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
            state[name] = t.to(torch.bfloat16)
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(state, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, file))
        total += sum(t.numel() * 2 for t in state.values())
    config.save_pretrained(str(root))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(_json.dumps(index))
    layer = sum(p.numel() for n, p in skeleton.named_parameters() if n.startswith("model.layers.0."))
    return {"params": skeleton.num_parameters(), "layer_params": layer, "bytes": total}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    import pruning

    _warm_up(args.child_method)
    base = settle()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.batches)]
    method = args.child_method
    kw = dict(method=method, sparsity=0.5, granularity=METHODS[method], progress=False)
    t0 = time.perf_counter()
    if args.child_mode == "streamed":
        with tempfile.TemporaryDirectory(dir=args.workdir) as out:
            pruning.prune(args.checkpoint, calib, **kw, save_to=Path(out) / "pruned")
            seconds = time.perf_counter() - t0
            written = sum(f.stat().st_size for f in (Path(out) / "pruned").glob("*.safetensors"))
    else:
        model = pruning.load_pretrained(args.checkpoint, dtype=torch.bfloat16)
        pruning.prune(model, calib, **kw)
        seconds, written = time.perf_counter() - t0, 0
    print(json.dumps({"seconds": seconds, "peak": rss_peak(), "base": base, "written": written}))


def _warm_up(method: str) -> None:
    """Everything the run imports and initialises once (modeling code, kernels), on a tiny model, before the
    baseline: the peak above it is then the run's own memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import pruning

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    pruning.prune(model, [torch.randint(0, 64, (2, 8))], method, 0.5, METHODS[method], progress=False)


def run_child(args, method: str, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child-method", method, "--child-mode", mode, "--checkpoint", args.checkpoint]
    for k in ("vocab", "seq", "batch", "batches", "threads", "workdir"):
        cmd += [f"--{k}", str(getattr(args, k))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{method} {mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def formula(args, info: dict, method: str) -> dict:
    """The terms of the memory formula (bytes), for the streamed run of ``method``."""
    tokens = args.seq * args.batch * args.batches
    gradient = method in ("taylor", "gblm", "sdm")
    outside = info["params"] - args.layers * info["layer_params"]
    terms = {
        "embeddings + head": outside * 2,
        "2 layers (bf16)": 2 * info["layer_params"] * 2,
        "1 layer's statistics (fp32)": info["layer_params"] * 4 if method != "wanda" else 0,
        "hidden states": (args.layers if gradient else 2) * tokens * args.hidden * 2,
        "logits (loss, gradient)": 3 * tokens * args.vocab * 4 if gradient else 0,
        "layer activations": 4 * tokens * args.inter * 4,
        "allocator and interpreter slack": 64 * MB,
    }
    return terms


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child-method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help="an existing checkpoint (default: one is written)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--llama-8b", action="store_true", help="Llama-3.1-8B shapes (16 GB on disk)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-in-memory", action="store_true", help="streamed runs only")
    ap.add_argument("--workdir", default="/work/tmp", help="where the checkpoint and the exports are written")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child_method:
        return child(args)
    if args.quick:
        args.layers, args.hidden, args.inter, args.heads, args.kv_heads, args.vocab = 4, 64, 128, 4, 2, 512
        args.seq = 16
    if args.llama_8b:
        args.layers, args.hidden, args.inter, args.heads, args.kv_heads, args.vocab = 32, 4096, 14336, 32, 8, 128256
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=args.workdir, prefix="streaming-ckpt-")
    try:
        t0 = time.perf_counter()
        if args.checkpoint is None:
            args.checkpoint = tmp
        info = write_checkpoint(args, Path(tmp))
        print(f"checkpoint: {info['params'] / 1e9:.2f}B params in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = {}
        for method in [m for m in args.methods.split(",") if m]:
            rows[method] = {"streamed": run_child(args, method, "streamed")}
            print(f"{method} streamed: {rows[method]['streamed']}", file=sys.stderr)
            if not args.no_in_memory:
                rows[method]["in memory"] = run_child(args, method, "in_memory")
                print(f"{method} in memory: {rows[method]['in memory']}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return emit(table(args, info, rows), args.out)


def table(args, info: dict, rows: dict) -> str:
    layer_mb, whole_mb = info["layer_params"] * 2 / MB, info["bytes"] / MB
    tokens = args.seq * args.batch * args.batches
    lines = [
        f"Llama-shaped checkpoint, random bf16 weights: {info['params'] / 1e9:.2f}B parameters, {args.layers} layers "
        f"(hidden {args.hidden}, intermediate {args.inter}, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}); "
        f"one layer {layer_mb:.0f} MB, the whole model {whole_mb:.0f} MB. Calibration {tokens} tokens "
        f"({args.batches}×{args.batch}×{args.seq}); CPU, {args.threads} threads; 50 % sparsity. Each run a fresh "
        "process; peak = VmHWM − RSS after imports. MB = 2^20 bytes.",
        "",
        "| method | granularity | streamed peak (MB) | formula (MB) | peak ≤ formula | peak / whole model | streamed "
        "time (s) | in-memory peak (MB) | in-memory time (s) | time ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for method, r in rows.items():
        s, m = r["streamed"], r.get("in memory")
        peak = (s["peak"] - s["base"]) / MB
        bound = sum(formula(args, info, method).values()) / MB
        mem = (
            f"{(m['peak'] - m['base']) / MB:.0f} | {m['seconds']:.0f} | {s['seconds'] / m['seconds']:.2f}×"
            if m
            else "- | - | -"
        )
        lines.append(
            f"| {method} | {METHODS[method]} | {peak:.0f} | {bound:.0f} | {'yes' if peak <= bound else '**no**'} | "
            f"{peak / whole_mb:.2f} | {s['seconds']:.0f} | {mem} |"
        )
    terms = formula(args, info, "taylor")
    lines += ["", "Formula terms (taylor; wanda has no statistics, activation criteria keep 2 layers' hidden states):"]
    lines += [f"- {k}: {v / MB:.0f} MB" for k, v in terms.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
