"""Quality benchmark: every criterion at equal sparsity on a model that has learned something, before and after a
fixed short recovery.

The model is the reference model (:mod:`benchmarks.reference_model`: a Llama with GQA trained on the standard
library's source, BPE tokenizer trained on the train split, cached). For every setting — 50 % unstructured, 2:4,
4:8, 20 / 30 / 50 % of the MLP neurons (uniform width) and 25 % of the KV groups — every criterion that supports
the granularity prunes a fresh copy of the dense model; cells a criterion does not support are "–".

- **Calibration**: the same seeded windows of the train stream for every method (``--calibration`` sequences of
  the model's ``seq_len``); their sha256 (:func:`pruning.calibration_fingerprint`) is recorded and checked against
  what every ``prune`` call saw.
- **Gradients**: criteria that score with gradients of the *dense* model's cross-entropy (taylor, gblm, SDM's
  stage A, saap) share one pass over the calibration set (one backward per sequence, every statistic they need
  collected at once), which is exactly what each ``prune`` call would compute alone. SDM's stage B (KL + CE against
  the lifted original, α=0.42, t=0.5: the paper's 30 % row, used at every sparsity) collects its own on the
  stage-A-pruned model. SAAP's σ is learned once per granularity (:func:`pruning.importance.saap.saap_scores`).
- **Held-out perplexity**: ``--eval-windows`` non-overlapping windows of ``seq_len`` tokens evenly spaced over the
  held-out split (files never seen in training), the same windows for every row.
- **Recovery**: the same token budget, batches and order for every method (``--recovery-steps`` × ``--recovery-batch``
  sequences of the train stream, seeded and hashed), AdamW at a constant ``--recovery-lr`` (no weight decay), masks
  held (``MaskSet.attach``). The default LR is a quarter of the LR the reference model's training ended with (5e-5
  for ``cpu``): at the final LR itself, with or without warm-up, a fresh AdamW made the *dense* model worse on
  held-out files in these few steps (checked once on a shorter-trained model, dense and magnitude only; not tuned
  per method). The dense model gets the same recovery as a control: the reference model is
  under-trained, so part of any gain is plain extra training.

Outputs (``--out``, default ``docs/``): ``quality.md`` (tables, head-to-head comparisons, protocol, timings),
``quality.json`` (everything), ``quality_table.md`` (the README's copy), ``quality_unstructured.png`` and
``quality_mlp.png`` (perplexity against sparsity, one line per method, before and after recovery).

    .venv/bin/python benchmarks/quality.py                 # trains/loads the cpu reference model; ~25 min on 2 cores
    .venv/bin/python benchmarks/quality.py --methods wanda,gblm --settings unstructured50,mlp30
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_model as refm  # noqa: E402

from pruning import calibration_fingerprint, get_criterion, prune  # noqa: E402
from pruning.data import batches as split_batches  # noqa: E402
from pruning.data import windows  # noqa: E402
from pruning.gradients import collect_gradients  # noqa: E402
from pruning.importance.saap import saap_scores  # noqa: E402
from pruning.stats import GradientCollector  # noqa: E402
from pruning.structure import ModelStructure  # noqa: E402

SDM_STAGE_A = 0.025  # SDMPrune: stage A prunes lightly with CE scores
SDM_ALPHA, SDM_TEMPERATURE = 0.42, 0.5  # stage B: the paper's 30 % row


@dataclass(frozen=True)
class Setting:
    key: str  # CLI name
    label: str  # table column
    granularity: str
    sparsity: float
    plot: str  # which plot: "unstructured" (x: pattern) or "mlp" (x: fraction of neurons); "" for none


SETTINGS: list[Setting] = [
    Setting("unstructured50", "50% unstr.", "unstructured", 0.5, "unstructured"),
    Setting("4:8", "4:8", "4:8", 0.5, "unstructured"),
    Setting("2:4", "2:4", "2:4", 0.5, "unstructured"),
    Setting("mlp20", "MLP 20%", "mlp_neuron", 0.2, "mlp"),
    Setting("mlp30", "MLP 30%", "mlp_neuron", 0.3, "mlp"),
    Setting("mlp50", "MLP 50%", "mlp_neuron", 0.5, "mlp"),
    Setting("kv25", "KV groups 25%", "attention_head", 0.25, ""),
]


@dataclass(frozen=True)
class Method:
    label: str
    criterion: str
    options: dict = field(default_factory=dict)
    allocation: str = "uniform"
    only: tuple[str, ...] | None = None  # granularities it runs at (default: all its criterion supports)

    def supports(self, granularity: str) -> bool:
        crit = get_criterion(self.criterion, **self.options)
        gran = "n:m" if ":" in granularity and granularity not in crit.granularities else granularity
        if gran not in crit.granularities:
            return False
        return self.only is None or granularity in self.only


METHODS: list[Method] = [
    Method("magnitude", "magnitude"),
    Method("wanda", "wanda"),
    Method("wanda + OWL", "wanda", allocation="owl", only=("unstructured",)),
    Method("sparsegpt", "sparsegpt"),
    Method("gblm", "gblm"),
    Method("taylor", "taylor", {"mode": "element"}),
    Method("taylor (vector)", "taylor", {"mode": "vector"}, only=("mlp_neuron", "attention_head")),
    Method("sdm", "sdm"),
    Method("saap", "saap"),
    Method("mutual_info", "mutual_info", only=("mlp_neuron",)),
]

GRAD_KINDS = ("sum", "sum_sq", "sum_abs", "sum_abs_gw")
GROUP_KINDS = ("coupled", "vector")


# ---------------------------------------------------------------------------------------------- pieces
def nonzero_params(model: torch.nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def tensor_sha256(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def shared_gradients(model, calib: list[torch.Tensor], granularities: set[str]) -> GradientCollector:
    """Dense-model CE gradient statistics for every gradient criterion at once (one backward per sequence)."""
    structure = ModelStructure(model)
    group_sets = [gs for g in sorted(granularities & {"mlp_neuron", "attention_head"})
                  for gs in structure.group_sets(g)]
    names = [n + ".weight" for n in structure.targets(False, False)]
    coll = GradientCollector(model, param_names=names, grad_kinds=GRAD_KINDS, group_sets=group_sets,
                             group_kinds=GROUP_KINDS)
    collect_gradients(model, calib, coll, progress=False)
    coll.reduce()
    return coll


def apply_method(model, method: Method, setting: Setting, calib, shared, saap_options: dict):
    """Prune ``model`` in place with ``method`` at ``setting``; returns the last :class:`pruning.PruneResult`."""
    gran, s = setting.granularity, setting.sparsity
    if method.criterion == "sdm":
        a = prune(model, calib, "sdm", SDM_STAGE_A, gran, keep_original=True, gradients=shared, progress=False)
        return prune(model, calib, "sdm", s, gran, masks=a.masks, alpha=SDM_ALPHA, temperature=SDM_TEMPERATURE,
                     keep_original=True, progress=False)
    opts = dict(method.options)
    if method.criterion == "saap":
        opts.update(saap_options[gran])
    grads = shared if get_criterion(method.criterion, **opts).needs_gradients else None
    return prune(model, calib, method.criterion, s, gran, allocation=method.allocation, criterion_options=opts,
                 gradients=grads, progress=False)


def recover(model, masks, batches: torch.Tensor, lr: float) -> list[float]:
    """A plain AdamW loop over ``batches`` ``[steps, batch, seq]`` with the masks held; returns the losses."""
    model.train()
    if masks is not None:
        masks.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    dev = next(model.parameters()).device
    losses = []
    try:
        for ids in batches:
            ids = ids.to(dev)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        if masks is not None:
            masks.detach()
        model.eval()
    return losses


# ---------------------------------------------------------------------------------------------- the run
def run(
    ref: refm.Reference,
    *,
    settings: list[Setting] = SETTINGS,
    methods: list[Method] = METHODS,
    calibration: int = 64,
    calib_batch: int = 8,
    eval_windows: int = 64,
    recovery_steps: int = 16,
    recovery_batch: int = 8,
    recovery_lr: float | None = None,
    seed: int = 0,
    out: Path | None = Path("docs"),
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    t_start = time.time()
    times: dict[str, float] = {}
    dense = ref.model.eval()
    preset = ref.manifest["key"]["preset"]
    seq = preset["seq_len"]
    if recovery_lr is None:  # a quarter of the LR the reference model's training ended with (see the docstring)
        recovery_lr = preset["lr"] * preset["min_lr"] / 4
    # ---- data, the same for every method
    calib_all = windows(ref.train_ids, seq, calibration, seed=seed)
    calib = list(split_batches(calib_all, calib_batch))
    calib_fp = calibration_fingerprint(calib)
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.randint(0, ref.train_ids.numel() - seq, (recovery_steps * recovery_batch,), generator=g)
    rec = ref.train_ids[starts[:, None] + torch.arange(seq)[None, :]].view(recovery_steps, recovery_batch, seq)
    eval_in, eval_lab = refm.heldout_windows(ref.heldout_ids, eval_windows, seq)
    eval_proto = refm.window_protocol(int(eval_in.shape[0]), seq, int(ref.heldout_ids.numel()),
                                      ref.manifest["tokenizer"]["sha256"])
    eval_proto["sha256"] = tensor_sha256(eval_in)

    def ppl(model) -> float:
        return refm.heldout_ppl(model, eval_in, eval_lab, batch_size=16)

    rows: list[dict] = []
    t = time.time()
    dense_ppl = ppl(dense)
    times["dense eval"] = time.time() - t
    t = time.time()
    control = copy.deepcopy(dense)
    rec_losses = recover(control, None, rec, recovery_lr)
    dense_after = ppl(control)
    del control
    times["dense recovery (control)"] = time.time() - t
    dense_nz = nonzero_params(dense)
    rows.append({"setting": "dense", "method": "dense", "ppl_before": dense_ppl, "ppl_after": dense_after,
                 "nonzero_params": dense_nz, "recovery_losses": rec_losses})
    log(f"dense: held-out ppl {dense_ppl:.3f}, after the control recovery {dense_after:.3f} "
        f"({times['dense recovery (control)']:.0f}s)")

    # ---- statistics shared by the gradient criteria (dense model)
    grans = {s.granularity for s in settings}
    crits = {m.criterion for m in methods}
    shared = None
    if crits & {"taylor", "gblm", "sdm", "saap"}:
        t = time.time()
        shared = shared_gradients(dense, calib, {"mlp_neuron", "attention_head"} & grans)
        times["shared dense gradients"] = time.time() - t
        log(f"shared dense gradients: {times['shared dense gradients']:.0f}s")
    saap_options: dict[str, dict] = {}
    saap_sigmas: dict[str, list[float]] = {}
    if "saap" in crits:
        for gran in sorted(grans & {"mlp_neuron", "attention_head", "query_head"}):
            t = time.time()
            # σ is learned from per-batch estimates: at least two batches
            est = saap_scores(dense, calib if len(calib) >= 2 else list(split_batches(calib_all, 1)), gran,
                              progress=False)
            saap_options[gran] = est.criterion_options()
            saap_sigmas[gran] = list(next(iter(est.sigmas.values())))
            times[f"saap sigma {gran}"] = time.time() - t
            log(f"saap σ for {gran}: {saap_sigmas[gran]} ({times[f'saap sigma {gran}']:.0f}s)")

    # ---- every cell
    for setting in settings:
        t_set = time.time()
        for method in methods:
            if not method.supports(setting.granularity):
                continue
            model = copy.deepcopy(dense)
            t0 = time.time()
            result = apply_method(model, method, setting, calib, shared, saap_options)
            t1 = time.time()
            before = ppl(model)
            t2 = time.time()
            losses = recover(model, result.masks, rec, recovery_lr)
            t3 = time.time()
            after = ppl(model)
            t4 = time.time()
            seen = (result.info.get("calibration") or {}).get("sha256")
            if seen is not None and seen != calib_fp["sha256"]:
                raise RuntimeError(f"{method.label}: calibration sha256 {seen} differs from {calib_fp['sha256']}")
            row = {"setting": setting.key, "method": method.label, "criterion": method.criterion,
                   "options": method.options, "allocation": method.allocation, "granularity": setting.granularity,
                   "sparsity": setting.sparsity, "ppl_before": before, "ppl_after": after,
                   "nonzero_params": nonzero_params(model),
                   "targeted_sparsity": result.report.targeted.fraction,
                   "model_sparsity": result.report.model.fraction, "prune_s": t1 - t0, "eval_s": (t2 - t1) + (t4 - t3),
                   "recovery_s": t3 - t2, "recovery_losses": losses, "calibration_sha256": seen}
            rows.append(row)
            log(f"  {setting.label:14s} {method.label:16s} ppl {before:9.3f} -> {after:8.3f}   prune {t1 - t0:5.1f}s "
                f"eval {row['eval_s']:4.1f}s recovery {t3 - t2:5.1f}s")
            del model, result
        times[f"setting {setting.key}"] = time.time() - t_set
    times["total"] = time.time() - t_start

    m = ref.manifest
    results = {
        "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "reference_model": {"path": str(ref.path), "preset": m.get("preset_name"), "parameters": m["parameters"],
                            "parameters_without_embeddings": m["parameters_without_embeddings"],
                            "config": {k: m["config"][k] for k in ("hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "num_key_value_heads",
                                                                  "intermediate_size", "vocab_size",
                                                                  "tie_word_embeddings")},
                            "tokens_seen": m["tokens_seen"], "steps": m["steps"], "heldout_ppl": m["heldout_ppl"],
                            "tokenizer_sha256": m["tokenizer"]["sha256"], "corpus_sha256": m["corpus"]["sha256"],
                            "train_minutes": m["times"]["train_s"] / 60},
        "protocol": {
            "eval": eval_proto,
            "calibration": {"sequences": calibration, "seq_len": seq, "batch": calib_batch, "seed": seed,
                            "source": "seeded random windows of the train stream", **calib_fp},
            "recovery": {"steps": recovery_steps, "batch": recovery_batch, "seq_len": seq,
                         "tokens": recovery_steps * recovery_batch * seq, "lr": recovery_lr,
                         "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0), constant LR, clip 1.0, masks held",
                         "seed": seed + 1, "sha256": tensor_sha256(rec)},
            "sdm": {"stage_a": SDM_STAGE_A, "alpha": SDM_ALPHA, "temperature": SDM_TEMPERATURE},
            "saap_sigma": saap_sigmas,
            "allocation": "uniform (same fraction and count in every layer) unless the method says OWL",
            "gradients": "dense-model CE gradients shared by taylor, gblm, sdm stage A, saap (one pass)",
        },
        "settings": [asdict(s) for s in settings],
        "methods": [asdict(mm) for mm in methods],
        "rows": rows,
        "times": times,
        "threads": torch.get_num_threads(),
    }
    if out is not None:
        write_outputs(results, Path(out), settings, methods, plots)
    log(f"quality benchmark done in {times['total'] / 60:.1f} min")
    return results


# ---------------------------------------------------------------------------------------------- reporting
def _cells(results: dict) -> dict[tuple[str, str], dict]:
    return {(r["setting"], r["method"]): r for r in results["rows"]}


def _best(results: dict, setting: str, key: str) -> tuple[str, float] | None:
    rows = [r for r in results["rows"] if r["setting"] == setting and math.isfinite(r[key])]
    if not rows:
        return None
    r = min(rows, key=lambda r: r[key])
    return r["method"], r[key]


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:,.0f}"


def wide_table(results: dict, settings: list[Setting], methods: list[Method]) -> str:
    """method × setting, each cell ``before / after`` recovery, the best of a column in bold (each separately)."""
    cells = _cells(results)
    dense = cells[("dense", "dense")]
    head = "| method | " + " | ".join(s.label for s in settings) + " |"
    lines = [head, "|---|" + "---:|" * len(settings)]
    lines.append("| dense (recovery: control) | " + " | ".join(
        f"{_fmt(dense['ppl_before'])} / {_fmt(dense['ppl_after'])}" for _ in settings) + " |")
    best = {s.key: (_best(results, s.key, "ppl_before"), _best(results, s.key, "ppl_after")) for s in settings}
    for m in methods:
        if not any((s.key, m.label) in cells for s in settings):
            continue
        out = []
        for s in settings:
            r = cells.get((s.key, m.label))
            if r is None:
                out.append("–")
                continue
            b, a = _fmt(r["ppl_before"]), _fmt(r["ppl_after"])
            bb, ba = best[s.key]
            b = f"**{b}**" if bb and bb[0] == m.label else b
            a = f"**{a}**" if ba and ba[0] == m.label else a
            out.append(f"{b} / {a}")
        lines.append(f"| {m.label} | " + " | ".join(out) + " |")
    nz = []
    for s in settings:
        vals = {r["nonzero_params"] for r in results["rows"] if r["setting"] == s.key}
        nz.append(f"{min(vals) / 1e6:.3f}M" if len(vals) == 1 else
                  (f"{min(vals) / 1e6:.3f}–{max(vals) / 1e6:.3f}M" if vals else "–"))
    lines.append(f"| *nonzero params* (dense {dense['nonzero_params'] / 1e6:.2f}M) | " + " | ".join(nz) + " |")
    return "\n".join(lines)


def winners(results: dict, settings: list[Setting]) -> list[str]:
    out = []
    for s in settings:
        bb, ba = _best(results, s.key, "ppl_before"), _best(results, s.key, "ppl_after")
        if bb is None:
            continue
        out.append(f"- **{s.label}**: before recovery **{bb[0]}** ({_fmt(bb[1])}); after recovery **{ba[0]}** "
                   f"({_fmt(ba[1])}).")
    return out


HEAD_TO_HEAD = [
    ("gblm", "wanda", "GBLM (gradients + activations) vs Wanda (activations)"),
    ("sparsegpt", "wanda", "SparseGPT (reconstruction) vs Wanda"),
    ("wanda + OWL", "wanda", "OWL allocation vs uniform, with Wanda"),
    ("sdm", "taylor", "SDM (two-stage distillation gradients) vs Taylor (CE gradients)"),
    ("sdm", "taylor (vector)", "SDM vs Taylor, vector form (|Σ g·w| per group, as SDM's)"),
    ("saap", "taylor", "SAAP (fused vector + element) vs Taylor"),
    ("wanda", "magnitude", "Wanda vs magnitude"),
    ("mutual_info", "magnitude", "mutual information (redundancy) vs magnitude"),
]


def head_to_head(results: dict, settings: list[Setting]) -> list[str]:
    """For each pair, per setting where both ran: ppl before and after, and who is lower."""
    cells = _cells(results)
    out = []
    for a, b, title in HEAD_TO_HEAD:
        parts = []
        for s in settings:
            ra, rb = cells.get((s.key, a)), cells.get((s.key, b))
            if ra is None or rb is None:
                continue
            wins = []
            for k, when in (("ppl_before", "before"), ("ppl_after", "after")):
                x, y = ra[k], rb[k]
                w = a if x < y else b if y < x else "tie"
                wins.append(f"{when} {_fmt(x)} vs {_fmt(y)} ({w})")
            parts.append(f"{s.label}: " + ", ".join(wins))
        if parts:
            tally = sum(cells[(s.key, a)][k] < cells[(s.key, b)][k] for s in settings
                        if (s.key, a) in cells and (s.key, b) in cells for k in ("ppl_before", "ppl_after"))
            n = 2 * len(parts)
            out.append(f"- {title}: **{a} lower in {tally} of {n}** comparisons. " + "; ".join(parts) + ".")
    return out


def protocol_line(results: dict) -> str:
    r, p = results["reference_model"], results["protocol"]
    c = r["config"]
    return (f"Reference model: Llama, {r['parameters'] / 1e6:.1f}M parameters "
            f"({r['parameters_without_embeddings'] / 1e6:.1f}M "
            f"without the {'tied ' if c['tie_word_embeddings'] else ''}embeddings), hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, {c['num_attention_heads']} query / {c['num_key_value_heads']} KV heads,"
            f" MLP {c['intermediate_size']}, BPE vocab {c['vocab_size']}, trained {r['steps']} steps "
            f"({r['tokens_seen'] / 1e6:.1f}M tokens) on the stdlib train split. Held-out perplexity per BPE token on "
            f"{p['eval']['windows']} windows of {p['eval']['seq_len']} tokens evenly spaced over held-out files; "
            f"{p['calibration']['sequences']} calibration windows of {p['calibration']['seq_len']} tokens, the same "
            f"for every method (sha256 {p['calibration']['sha256'][:12]}…); recovery: {p['recovery']['steps']} AdamW "
            f"steps × {p['recovery']['batch']} sequences ({p['recovery']['tokens']:,} tokens, lr "
            f"{p['recovery']['lr']:g}) with the masks held, the same batches for every method. Uniform allocation "
            "(same width in every layer) unless noted. Cells: ppl before / after recovery; best of a column in bold "
            "(each separately); – = not supported by the criterion.")


def readme_snippet(results: dict, settings: list[Setting], methods: list[Method]) -> str:
    return "\n".join([
        wide_table(results, settings, methods), "",
        protocol_line(results), "",
        "![perplexity vs sparsity, unstructured and N:M](docs/quality_unstructured.png)",
        "![perplexity vs fraction of MLP neurons pruned](docs/quality_mlp.png)", "",
        f"Produced by `benchmarks/quality.py` ({results['times']['total'] / 60:.0f} min on "
        f"{results['threads']} threads); details, head-to-head comparisons and timings in "
        "[docs/quality.md](docs/quality.md).",
    ])


def markdown(results: dict, settings: list[Setting], methods: list[Method]) -> str:
    cells = results["rows"]
    p = results["protocol"]
    lines = [
        "# Quality benchmark: criteria at equal sparsity on a trained Llama", "",
        f"Generated by `benchmarks/quality.py` on {results['generated']} in {results['times']['total'] / 60:.1f} "
        f"min ({results['threads']} threads). Raw numbers: `quality.json`.", "",
        protocol_line(results), "",
        "## Held-out perplexity, before / after recovery", "",
        wide_table(results, settings, methods), "",
        "![unstructured and N:M](quality_unstructured.png)", "",
        "![MLP neurons](quality_mlp.png)", "",
        "## What wins", "",
        *winners(results, settings), "",
        "## Head to head", "",
        *head_to_head(results, settings), "",
        "## Every cell", "",
        "| setting | method | ppl before | ppl after | × dense before | nonzero params | model sparsity | prune s | "
        "recovery s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = results["rows"][0]
    for r in cells:
        lines.append(f"| {r['setting']} | {r['method']} | {_fmt(r['ppl_before'])} | {_fmt(r['ppl_after'])} | "
                     f"{r['ppl_before'] / dense['ppl_before']:.2f} | {r['nonzero_params']:,} | "
                     f"{r.get('model_sparsity', 0.0):.1%} | {r.get('prune_s', 0.0):.1f} | "
                     f"{r.get('recovery_s', 0.0):.1f} |")
    lines += ["", "## Protocol", "", "```json", json.dumps(p, indent=2), "```", "",
              "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["times"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, settings: list[Setting], methods: list[Method], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(results)
    dense = cells[("dense", "dense")]
    written = []
    groups = {
        "unstructured": ([s for s in settings if s.plot == "unstructured"], "pattern (50 % of the decoder weights)",
                         "Unstructured / N:M"),
        "mlp": ([s for s in settings if s.plot == "mlp"], "fraction of MLP neurons pruned (uniform width)",
                "MLP neurons"),
    }
    for name, (sel, xlabel, title) in groups.items():
        if not sel:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
        for ax, key, when in zip(axes, ("ppl_before", "ppl_after"), ("before recovery", "after recovery")):
            for i, m in enumerate(methods):
                pts = [(s, cells[(s.key, m.label)][key]) for s in sel if (s.key, m.label) in cells]
                if not pts:
                    continue
                if name == "mlp":
                    xs = [0.0] + [100 * s.sparsity for s, _ in pts]
                    ys = [dense[key]] + [v for _, v in pts]
                else:
                    xs = [sel.index(s) for s, _ in pts]
                    ys = [v for _, v in pts]
                ax.plot(xs, ys, marker="o", label=m.label, color=f"C{i % 10}",
                        linestyle="-" if i < 10 else "--")
            ax.axhline(dense[key], color="black", linestyle=":", linewidth=1, label="dense")
            if name == "unstructured":
                ax.set_xticks(range(len(sel)), [s.label for s in sel])
                ax.set_xlim(-0.3, len(sel) - 0.7)
            else:
                ax.set_xticks([0] + [100 * s.sparsity for s in sel])
                ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(decimals=0))
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{title}, {when} (dense {_fmt(dense[key])})", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("held-out perplexity (log scale)")
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / f"quality_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(results: dict, out: Path, settings: list[Setting], methods: list[Method], plots: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(results, settings, methods))
    (out / "quality_table.md").write_text(readme_snippet(results, settings, methods) + "\n")
    if plots:
        plot(results, settings, methods, out)


def pick(items, names: str | None, key) -> list:
    if not names:
        return list(items)
    want = [n.strip() for n in names.split(",") if n.strip()]
    by = {key(i): i for i in items}
    bad = [n for n in want if n not in by]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {list(by)}")
    return [by[n] for n in want]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=list(refm.PRESETS), help="reference model preset")
    ap.add_argument("--ref-steps", type=int, default=None, help="the reference model trained with other steps")
    ap.add_argument("--ref-batch", type=int, default=None, help="the reference model trained with another batch")
    ap.add_argument("--cache", type=Path, default=refm.DEFAULT_CACHE)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (also where the reference model is trained)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {[m.label for m in METHODS]}")
    ap.add_argument("--settings", default=None, help=f"comma-separated subset of {[s.key for s in SETTINGS]}")
    ap.add_argument("--calibration", type=int, default=64, help="calibration sequences (model seq_len each)")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows (model seq_len each)")
    ap.add_argument("--recovery-steps", type=int, default=16)
    ap.add_argument("--recovery-batch", type=int, default=8)
    ap.add_argument("--recovery-lr", type=float, default=None,
                    help="default: a quarter of the reference model's final training LR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.time()
    preset, name = refm.preset_and_name(args.preset, args.ref_steps, args.ref_batch)
    ref = refm.load_or_train(preset, args.cache, args.device, name=name)
    ref.model.to(args.device)
    print(f"reference model ready ({time.time() - t:.0f}s)")
    return run(ref, settings=pick(SETTINGS, args.settings, lambda s: s.key),
               methods=pick(METHODS, args.methods, lambda m: m.label), calibration=args.calibration,
               eval_windows=args.eval_windows, recovery_steps=args.recovery_steps,
               recovery_batch=args.recovery_batch, recovery_lr=args.recovery_lr, seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
