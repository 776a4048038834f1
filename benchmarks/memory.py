"""Peak memory of distillation scoring (SDMPrune's stage B: ``(1−α)·CE + α·KL`` against the unpruned model) vs
plain cross-entropy scoring, on CPU. Target: distillation ≤ 1.1× cross-entropy.

Scenario (SDMPrune's two stages, one gradient per sequence): a ~124M-parameter Llama-family model (random init,
fp32, SDPA); stage A scores MLP neurons with CE on ``--seqs`` sequences and prunes 2.5 % of them with
``keep_original=True`` (the pruned values are stashed on the host); stage B scores ``--seqs`` more sequences with
``α=0.42, τ=0.5``, the teacher being the same weights with the masks lifted (``MaskSet.lifted``: no second model).
Compared with the same stage B at ``α=0`` (CE: no teacher forward, no KL), and, for contrast, with a teacher that
is a second copy of the model (``copy.deepcopy`` in the core path, what SDMPrune's own code does;
``DistillationModule(teacher='copy')`` in the Lightning path).

Two paths, each configuration in a fresh subprocess (peaks per process do not mix):

- ``core``: :func:`pruning.prune` for stage A, :func:`pruning.pipeline.collect_gradients` for stage B (only the
  MLP weights require gradients; ``.grad`` read after each backward);
- ``lightning``: ``Trainer`` + :class:`pruning.lightning.DistillationModule` +
  :class:`pruning.callbacks.ImportanceCallback`
  (``freeze_weights=True``) + :class:`pruning.callbacks.PruningCallback` (``sdm``, ``mlp_neuron``, events at steps N
  (α=0) and 2N (α, τ)), batches of one sequence. Every parameter of the module requires gradients, so ``.grad``
  of the whole model exists during each backward (dropped before the optimiser step).

Measured in each process (Linux): RSS after imports (no model yet); RSS right before stage B (weights, stash, and
for ``copy`` the teacher, already there; freed memory trimmed with ``malloc_trim``); the peak RSS over the stage-B
scoring passes (VmHWM reset through ``/proc/self/clear_refs`` just before, read right after: the prune events
themselves are outside); and a tensor-level peak: the most tensor bytes allocated at once (net, since the pass
began) during the last stage-B sequence, from ``torch.profiler``'s allocation records (``profile_memory=True``).

    .venv/bin/python benchmarks/memory.py            # full run (about 4 minutes on 2 cores)
    .venv/bin/python benchmarks/memory.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import TensorPeak, emit, rss_peak, settle  # noqa: E402

# name -> (path, alpha in stage B, teacher)
CONFIGS: dict[str, tuple[str, bool, str]] = {
    "core CE": ("core", False, "lifted"),
    "core KL (lifted teacher)": ("core", True, "lifted"),
    "core KL (teacher copy)": ("core", True, "copy"),
    "lightning CE": ("lightning", False, "lifted"),
    "lightning KL (lifted teacher)": ("lightning", True, "lifted"),
    "lightning KL (teacher copy)": ("lightning", True, "copy"),
}


# ---------------------------------------------------------------------------------------------- the model
def model_config(args) -> dict:
    return dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq),
    )


# ---------------------------------------------------------------------------------------------- core path
def child_core(args, kl: bool, teacher_mode: str, out: dict) -> None:
    import pruning
    from pruning.lightning.module import build_model
    from pruning.pipeline import collect_gradients
    from pruning.stats import GradientCollector
    from pruning.structure import ModelStructure

    model = build_model(None, model_config(args), attn_implementation="sdpa", seed=0)
    teacher = None
    if teacher_mode == "copy" and kl:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the original, before stage A
    out["params"] = sum(p.numel() for p in model.parameters())
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, args.vocab, (1, args.seq), generator=g) for _ in range(2 * args.seqs)]
    res = pruning.prune(
        model,
        calib[: args.seqs],
        method="sdm",
        sparsity=args.stage_a,
        granularity="mlp_neuron",
        keep_original=teacher is None,
        progress=False,
    )
    out["stash_bytes"] = res.masks.stash_bytes()
    alpha, temp = (args.alpha, args.temperature) if kl else (0.0, 1.0)
    coll = GradientCollector(
        model, param_names=(), group_sets=ModelStructure(model).group_sets("mlp_neuron"), group_kinds=("coupled",)
    )
    stage_b = calib[args.seqs :]

    def score(seqs):
        collect_gradients(
            model, seqs, coll, alpha=alpha, temperature=temp, masks=res.masks, teacher=teacher, progress=False
        )

    out["rss_before"] = settle()
    score(stage_b[:-1])
    out["peak"] = rss_peak()
    probe = TensorPeak()
    probe.start()
    score(stage_b[-1:])
    out["tensor_peak"] = probe.stop()


# ---------------------------------------------------------------------------------------------- lightning path
def child_lightning(args, kl: bool, teacher_mode: str, out: dict) -> None:
    import logging
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Event, Schedule

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n = args.seqs
    module = DistillationModule(
        config=model_config(args),
        attn_implementation="sdpa",
        init_seed=0,
        teacher="copy" if (kl and teacher_mode == "copy") else "lifted",
    )
    out["params"] = sum(p.numel() for p in module.student.parameters())
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in module.student.parameters())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, args.vocab, (args.seq,), generator=g)} for _ in range(2 * n)]
    alpha, temp = (args.alpha, args.temperature) if kl else (0.0, 1.0)
    sched = Schedule(
        kind="steps",
        events=[Event(n, args.stage_a, alpha=0.0), Event(2 * n, args.stage_b, alpha=alpha, temperature=temp)],
    )
    pruner = PruningCallback("sdm", "mlp_neuron", sched)

    class Probe(pl.Callback):
        """Stage B = steps n .. 2n-1: RSS peak over all but the last, tensor peak on the last."""

        def __init__(self) -> None:
            self.tensor = TensorPeak()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == n:
                out["stash_bytes"] = pruner.masks.stash_bytes()
                out["rss_before"] = settle()
            if trainer.global_step == 2 * n - 1:
                out["peak"] = rss_peak()
                self.tensor.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 2 * n:  # before the pruning callback fires the stage-B event
                out["tensor_peak"] = self.tensor.stop()

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2 * n,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Probe(), ImportanceCallback(freeze_weights=True), pruner],
    )
    trainer.fit(module, DataLoader(data, batch_size=1))
    if [h["step"] for h in pruner.history] != [n, 2 * n]:
        raise RuntimeError(f"expected events at steps {n} and {2 * n}, got {pruner.history}")


def child(args) -> None:
    torch.set_num_threads(args.threads)
    # everything a configuration imports, before the baseline
    import lightning.pytorch  # noqa: F401

    import pruning  # noqa: F401
    import pruning.callbacks  # noqa: F401
    import pruning.lightning.module  # noqa: F401

    path, kl, teacher = CONFIGS[args.config]
    out: dict = {"rss_imports": settle()}
    (child_core if path == "core" else child_lightning)(args, kl, teacher, out)
    print(json.dumps(out))


def run_child(args, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", f"--config={config}"]
    for k in (
        "seq",
        "seqs",
        "layers",
        "hidden",
        "inter",
        "heads",
        "kv_heads",
        "vocab",
        "threads",
        "alpha",
        "temperature",
        "stage_a",
        "stage_b",
    ):
        cmd.append(f"--{k.replace('_', '-')}={getattr(args, k)}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small model: a smoke run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--seqs", type=int, default=2, help="sequences per stage (>= 2)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.42, help="stage-B distillation weight")
    ap.add_argument("--temperature", type=float, default=0.5, help="stage-B teacher temperature")
    ap.add_argument("--stage-a", type=float, default=0.025, help="fraction of MLP neurons pruned after stage A")
    ap.add_argument("--stage-b", type=float, default=0.2, help="fraction of MLP neurons pruned after stage B")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.quick:
        args.layers, args.hidden, args.inter, args.vocab, args.seq, args.seqs = 2, 128, 352, 1024, 64, 2
        args.heads, args.kv_heads = 4, 2
    if args.seqs < 2:
        raise SystemExit("--seqs must be >= 2 (RSS over all but the last stage-B sequence, tensors on the last)")
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    res = {}
    for name in names:
        t0 = time.perf_counter()
        res[name] = run_child(args, name)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    mb = 2**20
    any_r = next(iter(res.values()))
    logits = args.seq * args.vocab * 4
    lines = [
        f"Llama-family, {any_r['params'] / 1e6:.1f}M params ({any_r['weights_bytes'] / mb:.0f} MB fp32): hidden "
        f"{args.hidden}, {args.layers} layers, intermediate {args.inter}, {args.heads} heads / {args.kv_heads} KV "
        f"heads, vocab {args.vocab}; SDPA, CPU, {args.threads} threads; batch 1 × seq {args.seq} (one [seq, vocab] "
        f"fp32 logits tensor = {logits / mb:.0f} MB); stage A: CE on {args.seqs} sequences, prune {args.stage_a:g} "
        f"of MLP neurons (keep_original); stage B: {args.seqs} sequences, KL: α={args.alpha:g}, "
        f"τ={args.temperature:g}, CE: α=0. Each row a fresh process. MB = 2^20 bytes.",
        "",
        "| config | RSS after imports | RSS before stage B | stash (host) | peak RSS in stage B | peak − imports | "
        "peak − before | tensor peak (one sequence) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | {r['rss_imports'] / mb:.0f} | {r['rss_before'] / mb:.0f} | {r['stash_bytes'] / mb:.1f} | "
            f"{r['peak'] / mb:.0f} | {(r['peak'] - r['rss_imports']) / mb:.0f} | "
            f"{(r['peak'] - r['rss_before']) / mb:.0f} | {r['tensor_peak'] / mb:.0f} |"
        )
    lines += [
        "",
        "Ratios against the CE configuration of the same path (target: KL (lifted teacher) ≤ 1.10× on peak memory):",
        "",
        "| config | vs | peak RSS | peak − imports | peak − before | tensor peak | target (peak RSS) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, r in res.items():
        path, kl, teacher = CONFIGS[name]
        base = f"{path} CE"
        if not kl or base not in res:
            continue
        b = res[base]
        ratio = r["peak"] / b["peak"]
        verdict = ("met" if ratio <= 1.10 else "**missed**") if teacher == "lifted" else "- (contrast)"
        lines.append(
            f"| {name} | {base} | {ratio:.3f} | {(r['peak'] - r['rss_imports']) / (b['peak'] - b['rss_imports']):.3f} "
            f"| {(r['peak'] - r['rss_before']) / (b['peak'] - b['rss_before']):.3f} | "
            f"{r['tensor_peak'] / b['tensor_peak']:.3f} | {verdict} |"
        )
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
