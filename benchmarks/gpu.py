"""The GPU checks, in one process: one-shot pruning at LLaMA-3.2-1B's shapes in bf16 (time against the plain passes
over the same calibration tokens, peak memory above the weights, masked vs compacted logits), a recovery fit with
the Lightning callbacks in ``bf16-mixed`` (masks held), and the compacted models' speed (``benchmarks/speed.py``).

    python benchmarks/gpu.py --out benchmarks/results/gpu.md          # on a CUDA machine (a few minutes on an H200)
    python benchmarks/gpu.py --quick --device cpu                      # smoke run of every stage, tiny sizes

The model has random weights (time and memory do not depend on the values; the masked-vs-compacted check does not
either). The fit stage uses the shipped demo model (``pruning/assets/demo-model``) and the stdlib corpus.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
from probes import emit  # noqa: E402

import pruning  # noqa: E402

# (method, granularity, sparsity): every family of criterion, each at a sparsity its paper reports
ONESHOT: list[tuple[str, str, float]] = [
    ("magnitude", "unstructured", 0.5),
    ("wanda", "unstructured", 0.5),
    ("wanda", "2:4", 0.5),
    ("sparsegpt", "unstructured", 0.5),
    ("gblm", "unstructured", 0.5),
    ("taylor", "mlp_neuron", 0.3),
    ("sdm", "mlp_neuron", 0.3),
    ("wanda", "attention_head", 0.25),
]
GRADIENT_METHODS = {"gblm", "taylor", "sdm"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def weights_gb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def plain_forward(model: nn.Module, calib: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for ids in calib:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)


def plain_backward(model: nn.Module, calib: list[torch.Tensor]) -> None:
    for ids in calib:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
    model.zero_grad(set_to_none=True)


def oneshot_stage(args, device: torch.device, dtype: torch.dtype) -> str:
    model = speed.build_dense(args.preset, args.layers, dtype).to(device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(args.batches)]
    probe = torch.randint(0, vocab, (1, min(args.seq, 512)), generator=g).to(device)
    tokens = args.batch * args.seq * args.batches
    plain_forward(model, calib[:1])  # warm-up (kernels, allocator)
    fwd = timed(lambda: plain_forward(model, calib), device)
    peak_reset(device)
    bwd = timed(lambda: plain_backward(model, calib), device)
    bwd_peak = peak_gb(device)
    w = weights_gb(model)
    rows = []
    for method, gran, sparsity in ONESHOT:
        model.load_state_dict(saved)
        peak_reset(device)
        box = {}

        def run(method=method, gran=gran, sparsity=sparsity, box=box):
            box["res"] = pruning.prune(model, calib, method=method, sparsity=sparsity, granularity=gran, progress=False)

        t = timed(run, device)
        peak = peak_gb(device)
        res = box["res"]
        ref = bwd if method in GRADIENT_METHODS else fwd
        check = "–"
        if gran in ("mlp_neuron", "attention_head"):
            with torch.no_grad():
                masked = model(input_ids=probe, use_cache=False).logits.float()
                small = copy.deepcopy(model)
                pruning.compact(small, res.masks)
                compacted = small(input_ids=probe, use_cache=False).logits.float()
            rel = ((masked - compacted).norm() / masked.norm()).item()
            params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
            check = f"rel. diff {rel:.1e}, params ×{params:.3f}"
            del small
        rows.append(
            f"| {method} | {gran} {sparsity:.0%} | {t:.2f} | {t / ref:.2f}× {'fwd+bwd' if ref is bwd else 'fwd'} | "
            f"{peak - w:.2f} | {check} |"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    head = [
        f"### One-shot pruning, {speed.describe(model)} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
        f"parameters, {w:.2f} GiB of weights), {args.dtype}, {name}",
        "",
        f"Calibration: {args.batches} batches × {args.batch} sequences × {args.seq} tokens ({tokens} tokens). "
        f"The plain passes over them: forward {fwd:.2f} s, forward+backward {bwd:.2f} s (peak {bwd_peak - w:.2f} GiB "
        "above the weights). Time ratio against the plain pass the criterion needs; peak = CUDA memory allocated "
        "above the weights; masked vs compacted: relative L2 difference of the logits (bf16 rounding).",
        "",
        "| method | granularity | time (s) | vs plain pass | peak above weights (GiB) | masked vs compacted |",
        "|---|---|---:|---:|---:|---|",
    ]
    return "\n".join(head + rows)


def fit_stage(args, device: torch.device) -> str:
    """Recovery with the callbacks in bf16-mixed: SDM's two scoring stages, then training; the pruned weights must
    stay exactly zero."""
    import lightning as L

    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.commands.demo import SHIPPED
    from pruning.datamodules import TextDataModule
    from pruning.lightning.module import DistillationModule

    L.seed_everything(0, verbose=False)
    module = DistillationModule(pretrained=str(SHIPPED), teacher="lifted", lr=1e-4)
    data = TextDataModule(source="stdlib", tokenizer="bytes", seq_len=128, batch_size=4, val_samples=16, seed=0)
    steps = 12 if args.quick else 200
    prune = PruningCallback(
        criterion="sdm",
        granularity="mlp_neuron",
        schedule={"kind": "steps", "events": [{"step": 2, "sparsity": 0.3, "alpha": 0.42, "temperature": 0.5}]},
    )
    cuda = device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ImportanceCallback(freeze_weights=True), prune],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    took = time.perf_counter() - t0
    masks, student = prune.masks, module.student
    total = zero = 0
    for name in sorted(masks.names()):
        param = student.get_parameter(name).detach()
        pruned = ~masks.keep_mask(name, param)
        total += int(pruned.sum())
        zero += int((param[pruned] == 0).sum())
    loss = float(trainer.callback_metrics.get("train/loss", torch.tensor(math.nan)))
    return "\n".join(
        [
            "### Recovery fit with the callbacks, bf16-mixed" if cuda else "### Recovery fit with the callbacks",
            "",
            f"Demo model, SDM (stage B only, 30 % of the MLP neurons) at step 2, {steps} steps of 4×128 tokens: "
            f"{took:.1f} s ({steps / took:.1f} steps/s), last training loss {loss:.3f}; pruned weights exactly zero "
            f"after training: {zero}/{total}.",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--preset", choices=sorted(speed.PRESETS), default="llama-3.2-1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--stages", default="oneshot,fit,speed")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the small preset, 2 layers, short sequences)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.layers, args.seq, args.batch, args.batches = "small", 2, 64, 2, 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    parts = []
    stages = args.stages.split(",")
    if "oneshot" in stages:
        parts.append(oneshot_stage(args, device, dtype))
        print(parts[-1], flush=True)
    if "fit" in stages:
        parts.append(fit_stage(args, device))
        print(parts[-1], flush=True)
    if "speed" in stages:
        sargs = ["--device", args.device, "--dtype", args.dtype, "--preset", args.preset]
        sargs += ["--quick", "--layers", "2"] if args.quick else ["--tokens", "4096", "--batch", "1"]
        parts.append("### Compacted models' speed\n\n" + speed.main(sargs))
    return emit("\n\n".join(parts), args.out)


if __name__ == "__main__":
    main()
