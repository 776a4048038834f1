"""Per-step overhead of :class:`pruning.callbacks.ImportanceCallback` in a Lightning training step, as a ratio
against the
same step without it, measured in one run.

A Llama-family model (random init, fp32, SDPA) is trained by a Lightning ``Trainer`` (CPU, no logger, no
checkpointing, no progress bar) on micro-batches of ``--batch`` sequences (default 1; the per-sequence statistics
come from the batched backward). The statistics are what the named criterion needs, set up as in a real run: an
:class:`ImportanceCallback` plus a :class:`PruningCallback` whose only event lies beyond the run (nothing is pruned):

- ``sdm``: coupled MLP-neuron statistics (``g⊙w`` of gate/up rows and down columns, summed per neuron, per sample);
- ``gblm``: ``Σg²`` on every decoder Linear weight (tensor hooks) plus ``Σx²`` of every Linear input (pre-hooks);
- ``wanda``: ``Σx²`` of every Linear input only;
- ``taylor``: ``Σg`` on every decoder Linear weight;
- ``saap``: ``Σ|g⊙w|`` of the MLP weights and the vector sums ``Σ_n |Σ_neuron g_n⊙w|`` per MLP neuron.

The machine may be shared, and its load comes and goes on the scale of seconds, so the comparison is made step by
step: in one ``fit`` per configuration the importance callback is switched on for every odd step and off for every
even one (its hooks are attached / detached at the *end* of the step before, outside the timed span, as a real
scoring window attaches them once). A step's time is the wall time from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, loss, backward, every hook, optimiser step), taken by the first callback. Each
statistics step is paired with the plain step right before it; the first ``--warmup`` pairs are discarded; the ratio
is the median over the pairs of all rounds. A pair is *quiet* when other processes used at most ``--max-foreign``
CPU cores during it (``/proc/stat`` minus this process); the ratio uses the quiet pairs when there are at least 5.

``freeze_weights=False`` is the number to judge (the callback's cost on top of a full step, optimiser included;
target ≤ 1.10×). With ``freeze_weights=True`` (the default for scoring) gradients are dropped before the optimiser
step, so AdamW does nothing: such a step is usually *cheaper* than a plain training step.

    .venv/bin/python benchmarks/overhead.py                  # full run (about 4 minutes on 2 cores)
    .venv/bin/python benchmarks/overhead.py --quick          # smoke run
    .venv/bin/python benchmarks/overhead.py --breakdown      # the hooks' work timed apart: where the time goes
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import emit  # noqa: E402

from pruning.callbacks import ImportanceCallback, PruningCallback  # noqa: E402
from pruning.lightning.module import DistillationModule  # noqa: E402
from pruning.schedule import Schedule  # noqa: E402

# name -> (criterion, granularity, freeze_weights, what is collected)
CONFIGS: dict[str, tuple[str, str, bool, str]] = {
    "sdm": ("sdm", "mlp_neuron", False, "coupled g⊙w per MLP neuron"),
    "gblm": ("gblm", "unstructured", False, "Σg² every Linear + Σx²"),
    "wanda": ("wanda", "unstructured", False, "Σx² every Linear"),
    "taylor": ("taylor", "unstructured", False, "Σg every Linear"),
    "saap": ("saap", "mlp_neuron", False, "Σ|g⊙w| + vector per MLP neuron"),
    "sdm frozen": ("sdm", "mlp_neuron", True, "as sdm, no optimiser update"),
    "gblm frozen": ("gblm", "unstructured", True, "as gblm, no optimiser update"),
    "wanda frozen": ("wanda", "unstructured", True, "as wanda, no optimiser update"),
    "taylor frozen": ("taylor", "unstructured", True, "as taylor, no optimiser update"),
    "saap frozen": ("saap", "mlp_neuron", True, "as saap, no optimiser update"),
}


def cpu_sample() -> tuple[float, float, float]:
    """(wall s, CPU s used by the whole machine, CPU s used by this process): the difference is other load."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, time.process_time()


class StepTimer(pl.Callback):
    """Samples at every ``on_train_batch_start`` and ``on_train_batch_end`` (must be first in the callback list)."""

    def __init__(self) -> None:
        self.start: list[tuple[float, float, float]] = []
        self.end: list[tuple[float, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start.append(cpu_sample())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end.append(cpu_sample())

    def step(self, i: int) -> tuple[float, float, float]:
        """(wall s, this process's CPU s, other processes' load in cores) of step ``i``."""
        a, b = self.start[i], self.end[i]
        wall, own = b[0] - a[0], b[2] - a[2]
        return wall, own, max(0.0, (b[1] - a[1]) - own) / wall


class AlternatingImportance(ImportanceCallback):
    """The importance callback, on for odd steps only: switched at the end of the step before (not timed)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step % 2 == 1:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        nxt = trainer.global_step  # the coming step (this step's optimiser step is done)
        event = self._event_for(nxt)
        if nxt % 2 == 1 and event is not None:
            if not self._active:
                self._activate(pl_module, event)
        else:
            self.deactivate(pl_module)


def model_arguments(ap: argparse.ArgumentParser, **defaults: int) -> None:
    """The model's shape as options (``layers``, ``hidden``, ``inter``, ``heads``, ``kv_heads``, ``vocab``) and the
    sequence length ``seq``, with these defaults."""
    for name, value in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=value)


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


NEVER = 10**9  # the step of the event that scoring windows lead to; the runs stop long before it


def callbacks_for(name: str, alternate: bool) -> list[pl.Callback]:
    if name == "plain":
        return []
    crit, gran, freeze, _ = CONFIGS[name]
    # one event far beyond the run: every step is in the scoring window of that event, nothing is pruned
    sched = Schedule(kind="one_shot", step=NEVER, sparsity=0.5)
    imp = (AlternatingImportance if alternate else ImportanceCallback)(freeze_weights=freeze)
    return [imp, PruningCallback(crit, gran, sched)]


def check_clean(module: DistillationModule) -> None:
    """No hook may survive a fit (it would slow the next configuration down)."""
    left = [n for n, p in module.student.named_parameters() if p._backward_hooks]
    left += [n for n, m in module.student.named_modules() if m._forward_pre_hooks or "forward" in m.__dict__]
    if left:
        raise RuntimeError(f"hooks left after fit on {left[:3]}")


class StopAfter(pl.Callback):
    """Ends the fit after ``steps`` optimiser steps of a run planned longer (so that the pruning callback's event
    far beyond them passes its start-up check that events are reached, and never fires)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=NEVER,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, StopAfter(steps)],
    )


def alternating_fit(module: DistillationModule, loader: DataLoader, name: str, pairs: int, warmup: int) -> list:
    """One fit of ``2·(warmup + pairs)`` steps, statistics on odd steps; per kept pair (plain step, stats step)."""
    timer = StepTimer()
    cbs = callbacks_for(name, alternate=True)
    tr = trainer(2 * (warmup + pairs), [timer] + cbs)
    tr.fit(module, loader)
    check_clean(module)
    if len(timer.end) != 2 * (warmup + pairs) or cbs[0].samples != warmup + pairs:
        raise RuntimeError(
            f"{name}: {len(timer.end)} steps timed, {cbs[0].samples} with statistics; expected "
            f"{2 * (warmup + pairs)} and {warmup + pairs}"
        )
    out = [(timer.step(2 * k), timer.step(2 * k + 1)) for k in range(warmup, warmup + pairs)]
    del tr
    gc.collect()  # the fit's optimiser state and statistics go now, not during the next fit's steps
    return out


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Smallest wall time and smallest CPU time (this process) of ``repeats`` calls: other load can only slow a call
    down, and with one thread the CPU time hardly depends on it."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, cpu


def gradient_work(grads, named: dict, fake: dict) -> None:
    """What the gradient tensor hooks and the sample's close do in one backward (``per_sample: micro_batch``)."""
    for n, st in grads.stats.items():
        st.update(fake[n], named[n].detach())
    for gs in grads.group_stats.values():
        for m in gs.group_set.members:
            gs.add_member(m.name, fake[m.name], named[m.name].detach())
    for gs in grads.group_stats.values():
        gs.close_sample()


def activation_work(acts, inputs: dict) -> None:
    """What the forward pre-hooks do in one forward."""
    for n, st in acts.stats.items():
        st.update(inputs[n])


def breakdown(module: DistillationModule, loader: DataLoader, names: list[str], repeats: int) -> str:
    """What the hooks of one statistics step cost, timed apart from training (best of ``repeats``): the callback's
    own collectors (configured by a one-step fit) fed a step's worth of gradients (random, shaped like the
    parameters) and the real inputs of every hooked Linear; against the best plain training step."""
    timer = StepTimer()
    trainer(2 + repeats, [timer]).fit(module, loader)
    plain = min(timer.step(i)[0] for i in range(2, 2 + repeats))
    plain_cpu = min(timer.step(i)[1] for i in range(2, 2 + repeats))
    model = module.student
    ids = next(iter(loader))["input_ids"]
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0].detach()))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    lines = [
        f"Hook work of one statistics step, timed apart (best of {repeats}), against the best plain training "
        f"step: {plain * 1e3:.0f} ms wall, {plain_cpu * 1e3:.0f} ms CPU; {torch.get_num_threads()} thread(s)",
        "",
        "| config | gradient statistics, ms wall (CPU) | activation statistics, ms wall (CPU) | "
        "total / plain step, wall (CPU) |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        cbs = callbacks_for(name, alternate=False)
        trainer(1, cbs).fit(module, loader)  # the pruning callback configures the importance callback's collectors
        check_clean(module)
        acts, grads = cbs[0].activations, cbs[0].gradients
        t_g = t_a = (0.0, 0.0)
        if grads is not None:
            named = grads.parameters
            fake = {n: torch.randn_like(p) for n, p in named.items()}
            t_g = best_of(functools.partial(gradient_work, grads, named, fake), repeats)
        if acts is not None:
            t_a = best_of(functools.partial(activation_work, acts, inputs), repeats)
        lines.append(
            f"| {name} | {t_g[0] * 1e3:.1f} ({t_g[1] * 1e3:.1f}) | {t_a[0] * 1e3:.1f} ({t_a[1] * 1e3:.1f}) | "
            f"{(t_g[0] + t_a[0]) / plain:.3f} ({(t_g[1] + t_a[1]) / plain_cpu:.3f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few pairs: a smoke run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=None, help="fits per configuration, rotating (default 2, quick 1)")
    ap.add_argument("--pairs", type=int, default=None, help="timed pairs per fit (default 12, quick 3)")
    ap.add_argument("--warmup", type=int, default=3, help="discarded pairs at the start of every fit")
    ap.add_argument("--max-foreign", type=float, default=0.2, help="other load (cores) above which a pair is noisy")
    model_arguments(ap, layers=6, hidden=512, inter=1408, heads=8, kv_heads=4, vocab=8192, seq=256)
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--breakdown", action="store_true", help="instead: time the hooks' work apart from training")
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.inter, args.vocab, args.seq = 2, 128, 352, 1024, 64
    rounds = args.rounds or (1 if args.quick else 2)
    n_pairs = args.pairs or (3 if args.quick else 12)
    names = [n for n in args.configs.split(",") if n]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    module = DistillationModule(config=model_config(args), attn_implementation="sdpa", lr=1e-6)
    n_params = sum(p.numel() for p in module.student.parameters())
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, args.vocab, (args.seq,), generator=g)}
        for _ in range((2 * (args.warmup + n_pairs) + 4) * args.batch)
    ]
    loader = DataLoader(data, batch_size=args.batch)

    if args.breakdown:
        table = breakdown(module, loader, [n for n in names if not CONFIGS[n][2]], 7)
        print(table)
        return table

    trainer(3, []).fit(module, loader)  # process warm-up: kernel selection, first allocations
    res: dict[str, list] = {n: [] for n in names}
    t0 = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            res[name] += alternating_fit(module, loader, name, n_pairs, args.warmup)
        print(f"round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    lines = [
        f"Llama-family, {n_params / 1e6:.1f}M params: hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.inter}, {args.heads} heads / {args.kv_heads} KV heads, vocab {args.vocab}; fp32, SDPA, CPU, "
        f"{args.threads} threads; Lightning Trainer, DistillationModule (CE, AdamW), batch {args.batch} × seq "
        f"{args.seq}. "
        f"Statistics on odd steps, plain even steps, in one fit per configuration and round; {rounds} round(s) × "
        f"{n_pairs} pairs (after {args.warmup} warm-up pairs); ratio = median over pairs of (statistics step / the "
        f"plain step before it), over quiet pairs (other load ≤ {args.max_foreign:g} cores) when there are ≥ 5, "
        "else over all. CPU-time ratio: the same with this process's CPU time. Target: ≤ 1.10× with the optimiser "
        "step (freeze_weights=False).",
        "",
        "| config | statistics | freeze_weights | ms/step | plain ms/step | ratio vs plain | IQR of ratios | "
        "quiet / all pairs | CPU-time ratio | other load (cores, median) | target |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for name in names:
        _, _, freeze, what = CONFIGS[name]
        pairs = res[name]
        quiet = [(p, s) for p, s in pairs if max(p[2], s[2]) <= args.max_foreign]
        use = quiet if len(quiet) >= 5 else pairs
        ratios = sorted(s[0] / p[0] for p, s in use)
        ratio = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio, ratio, ratio)
        cpu = statistics.median(s[1] / p[1] for p, s in use)
        ms = statistics.median(s[0] for _, s in use) * 1e3
        ms_p = statistics.median(p[0] for p, _ in use) * 1e3
        load = statistics.median(max(p[2], s[2]) for p, s in pairs)
        target = ("met" if ratio <= 1.10 else "**missed**") if not freeze else "- (no optimiser update)"
        lines.append(
            f"| {name} | {what} | {freeze} | {ms:.0f} | {ms_p:.0f} | {ratio:.3f} | {q1:.3f}–{q3:.3f} | "
            f"{len(quiet)} / {len(pairs)} | {cpu:.3f} | {load:.2f} | {target} |"
        )
    return emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
