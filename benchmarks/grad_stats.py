"""Gradient statistics at the floor (issue 15): what the per-sequence gradient statistics of the gradient criteria
cost, from batched backwards, against a plain batched forward+backward over the same tokens; the speed-up against
one backward per sequence; peak tensor memory; and the ImportanceCallback's overhead per training step at batch 8.

    .venv/bin/python benchmarks/grad_stats.py              # about 25 minutes on 2 shared cores
    .venv/bin/python benchmarks/grad_stats.py --quick      # smoke run (a smaller model, fewer repeats)

One process, CPU time of the process (``time.process_time``: the machine is shared, and other load changes wall
time far more than this process's CPU time). The one-shot tables are made with each of ``--threads`` (default 1
and 2, the issue's setting: on busy cores two threads' spin-waits count as CPU time too, and they cost most where
the operations are many and small, as in one backward per sequence); the callback's with the first.

- **One-shot scoring** (:func:`pruning.pipeline.collect_gradients`, the pass :func:`pruning.prune` runs for a
  gradient criterion; its collector from :meth:`pruning.pipeline.Pruner.gradient_collector`): Taylor (30 % of MLP
  neurons: ``Σ_n g_n``), GBLM (unstructured: ``Σ_n g_n²`` of every decoder Linear), SDMPrune's two stages on MLP
  neurons (A: cross-entropy on the dense model; B: α = 0.42, τ = 0.5 against the same weights with stage A's masks
  lifted) and SAAP (MLP neurons: ``Σ_n |g_n⊙w|`` and ``Σ_n |Σ_neuron g_n⊙w|``). Each is timed one micro-batch at
  a time, right after a *plain* batched forward+backward of the same micro-batch (every parameter requiring
  gradients, as in training; stage B's plain step also runs the lifted teacher's forward), so that every ratio
  is taken between two neighbouring measurements; the ratio is total scoring time / total plain time over
  ``--rounds`` passes over the calibration set (their medians per micro-batch in brackets). Target ≤ 1.3×.
- **Speed-up** against the old protocol (``collect_gradients(batched=False)``: one backward per sequence), timed on
  the same micro-batches right after the new one (in the first ``--old-rounds`` rounds).
- **Peak tensor memory** (``torch.profiler`` allocation records, :class:`probes.TensorPeak`) of one micro-batch:
  the scoring pass against the plain forward+backward. Target ≤ 1.2×.
- **ImportanceCallback overhead per training step** at batch 8 (``benchmarks/overhead.py``'s protocol: one fit per
  configuration with the statistics on every other step, each statistics step against the plain step before it;
  median of the per-pair CPU-time ratios), the weights training in the scoring window (``freeze_weights=False``,
  target ≤ 1.10×) and frozen (then no optimiser step runs: a cheaper step).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402
from probes import TensorPeak, emit  # noqa: E402

from pruning import PruneOptions, prune  # noqa: E402
from pruning.lightning.module import DistillationModule  # noqa: E402
from pruning.losses import distillation_loss  # noqa: E402
from pruning.pipeline import Pruner, collect_gradients  # noqa: E402

# name -> (method, granularity, alpha, temperature, what is collected)
CRITERIA = {
    "taylor": ("taylor", "mlp_neuron", 0.0, 1.0, "Σ_n g_n (the batch's .grad)"),
    "gblm": ("gblm", "unstructured", 0.0, 1.0, "Σ_n g_n² every decoder Linear"),
    "sdm A": ("sdm", "mlp_neuron", 0.0, 1.0, "coupled Σ_n mean_j|Σ g_n⊙w| per MLP neuron, CE"),
    "sdm B": ("sdm", "mlp_neuron", 0.42, 0.5, "as sdm A, KL+CE against the lifted teacher"),
    "saap": ("saap", "mlp_neuron", 0.0, 1.0, "Σ_n|g_n⊙w| + Σ_n|Σ_neuron g_n⊙w| per MLP neuron"),
}
CALLBACK_CONFIGS = ["taylor", "gblm", "sdm", "saap", "taylor frozen", "gblm frozen", "sdm frozen", "saap frozen"]


def build(args) -> torch.nn.Module:
    cfg = overhead.model_config(args)
    cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def cpu(fn: Callable[[], object]) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


class Case:
    """One criterion's one-shot scoring pass, its plain counterpart and its model (stage B: stage A's masks)."""

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        method, gran, alpha, tau, self.what = CRITERIA[name]
        self.name, self.alpha, self.tau = name, alpha, tau
        self.options = PruneOptions(method=method, granularity=gran, sparsity=0.3)
        self.model, self.masks = model, None

    def stage_a(self, calib: list[torch.Tensor]) -> None:
        """Stage B scores a model pruned by stage A (2.5 % of MLP neurons, masks kept for the lifted teacher)."""
        self.model = copy.deepcopy(self.model)
        res = prune(self.model, calib, "sdm", 0.025, "mlp_neuron", keep_original=True, progress=False)
        self.masks = res.masks

    def score(self, batches: list[torch.Tensor], batched: bool = True) -> None:
        collector = Pruner(self.model, self.options).gradient_collector()
        kw = dict(alpha=self.alpha, temperature=self.tau, masks=self.masks) if self.alpha else {}
        collect_gradients(self.model, batches, collector, progress=False, batched=batched, **kw)

    def plain(self, ids: torch.Tensor) -> None:
        """A plain batched forward+backward of ``ids`` (every parameter requiring gradients), with the scoring
        loss (and its teacher's forward)."""
        model = self.model
        target = None
        if self.alpha:
            with torch.no_grad(), self.masks.lifted(model):
                target = model(input_ids=ids, use_cache=False).logits
        for p in model.parameters():
            p.requires_grad_(True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = distillation_loss(logits, ids, target, self.alpha, self.tau)
        del logits, target
        loss.backward()
        model.zero_grad(set_to_none=True)


def one_shot(args, model, calib: list[torch.Tensor], names: list[str]) -> list[str]:
    cases = {n: Case(n, model) for n in names}
    for c in cases.values():
        if c.alpha:
            c.stage_a(calib)
        c.score(calib[:1])  # warm-up: first allocations, kernel choice
        c.plain(calib[0])
    times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for ids in calib:
            for n, c in cases.items():  # neighbours: the plain step, the scoring pass, the old protocol's
                plain = cpu(lambda c=c, ids=ids: c.plain(ids))
                score = cpu(lambda c=c, ids=ids: c.score([ids]))
                old = cpu(lambda c=c, ids=ids: c.score([ids], batched=False)) if r < args.old_rounds else float("nan")
                times[n].append((plain, score, old))
        print(f"one-shot round {r + 1}/{args.rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    peaks = {
        n: (tensor_peak(lambda c=c: c.plain(calib[0])), tensor_peak(lambda c=c: c.score(calib[:1])))
        for n, c in cases.items()
    }
    lines = [
        "| criterion | statistics | plain fwd+bwd, CPU s | scoring, CPU s | ratio (median per micro-batch) | "
        "target ≤ 1.3× | one backward per sequence, CPU s | speed-up | peak tensor memory, plain → scoring | ratio | "
        "target ≤ 1.2× |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for n, c in cases.items():  # CPU s per pass over the calibration set (the old protocol: its rounds only)
        plain, score = (sum(t[i] for t in times[n]) / args.rounds for i in (0, 1))
        med = statistics.median(s / p for p, s, _ in times[n])
        with_old = [t for t in times[n] if t[2] == t[2]]
        old = sum(t[2] for t in with_old) / min(args.rounds, args.old_rounds)
        speedup = sum(t[2] for t in with_old) / sum(t[1] for t in with_old)
        ratio, mem = score / plain, peaks[n][1] / peaks[n][0]
        lines.append(
            f"| {n} | {c.what} | {plain:.2f} | {score:.2f} | {ratio:.3f} ({med:.3f}) | {met(ratio, 1.3)} | "
            f"{old:.2f} | {speedup:.2f}× | {peaks[n][0] / 2**20:.0f} → {peaks[n][1] / 2**20:.0f} MiB | {mem:.3f} | "
            f"{met(mem, 1.2)} |"
        )
    return lines


def tensor_peak(fn: Callable[[], object]) -> int:
    peak = TensorPeak()
    peak.start()
    fn()
    return peak.stop()


def met(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "**missed**"


def callback_overhead(args, names: list[str]) -> list[str]:
    """``benchmarks/overhead.py``'s alternating fits on this model at batch ``--batch``."""
    module = DistillationModule(config=overhead.model_config(args), attn_implementation="sdpa", lr=1e-6)
    g = torch.Generator().manual_seed(1)
    steps = 2 * (args.warmup + args.pairs) + 4
    data = [{"input_ids": torch.randint(0, args.vocab, (args.seq,), generator=g)} for _ in range(steps * args.batch)]
    loader = DataLoader(data, batch_size=args.batch)
    overhead.trainer(3, []).fit(module, loader)  # warm-up
    res: dict[str, list] = {n: [] for n in names}
    for r in range(args.callback_rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            res[n] += overhead.alternating_fit(module, loader, n, args.pairs, args.warmup)
        print(f"callback round {r + 1}/{args.callback_rounds}", file=sys.stderr)
    lines = [
        "| config | statistics | freeze_weights | plain step, CPU ms | statistics step, CPU ms | CPU-time ratio "
        "(median of pairs) | IQR | wall-time ratio | target ≤ 1.10× |",
        "|---|---|---|---:|---:|---:|---|---:|---|",
    ]
    for n in names:
        _, _, freeze, what = overhead.CONFIGS[n]
        pairs = res[n]
        ratios = sorted(s[1] / p[1] for p, s in pairs)
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        wall = statistics.median(s[0] / p[0] for p, s in pairs)
        p_ms, s_ms = (statistics.median(x[i][1] for x in pairs) * 1e3 for i in (0, 1))
        target = met(med, 1.10) if not freeze else "- (no optimiser step)"
        lines.append(
            f"| {n} | {what} | {freeze} | {p_ms:.0f} | {s_ms:.0f} | {med:.3f} | {q1:.3f}–{q3:.3f} | {wall:.3f} | "
            f"{target} |"
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer repeats: a smoke run")
    overhead.model_arguments(ap, layers=4, hidden=256, inter=704, heads=4, kv_heads=2, vocab=2048, seq=256)
    ap.add_argument("--sequences", type=int, default=64, help="calibration sequences")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (one-shot and callback)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the calibration set, one-shot")
    ap.add_argument("--old-rounds", type=int, default=1, help="of which with the old protocol too")
    ap.add_argument("--callback-rounds", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=10, help="timed step pairs per fit, callback")
    ap.add_argument("--warmup", type=int, default=2, help="discarded step pairs per fit, callback")
    ap.add_argument(
        "--threads", default="1,2", help="thread counts of the one-shot tables (the callback runs with the first)"
    )
    ap.add_argument("--only", choices=["one-shot", "callback"], default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "grad_stats.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.inter, args.vocab, args.seq = 2, 128, 352, 512, 64
        args.sequences, args.rounds, args.callback_rounds, args.pairs = 16, 1, 1, 3
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    model = build(args)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.sequences // args.batch)
    ]
    head = [
        f"Llama-family, {params / 1e6:.2f}M parameters (hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.inter}, {args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}; fp32, SDPA); "
        f"{args.sequences} calibration sequences of {args.seq} tokens in micro-batches of {args.batch}; CPU time of "
        f"the process; torch {torch.__version__}.",
        "",
    ]
    lines = list(head)
    t0 = time.perf_counter()
    for n in threads if args.only in (None, "one-shot") else ():
        torch.set_num_threads(n)
        lines += [
            f"One-shot scoring with {n} thread(s), CPU s per pass over the calibration set ({args.rounds} passes; the "
            f"old protocol in {min(args.rounds, args.old_rounds)}), against a plain batched forward+backward of the "
            "same micro-batches:",
            "",
        ]
        lines += one_shot(args, model, calib, list(CRITERIA))
        lines.append("")
    torch.set_num_threads(threads[0])
    if args.only in (None, "callback"):
        lines += [
            f"ImportanceCallback overhead per training step with {threads[0]} thread(s) (Lightning, "
            f"DistillationModule CE + AdamW, batch {args.batch} × {args.seq}; {args.callback_rounds} round(s) × "
            f"{args.pairs} pairs after {args.warmup} warm-up pairs):",
            "",
        ]
        lines += callback_overhead(args, CALLBACK_CONFIGS)
        lines.append("")
    lines.append(f"(whole run: {time.perf_counter() - t0:.0f} s wall)")
    return emit("\n".join(lines), None if args.quick else args.out)


if __name__ == "__main__":
    main()
