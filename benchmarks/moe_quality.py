"""Expert pruning on a small mixture-of-experts model that has learned something: every expert criterion at 25 % and
50 % of the experts, before and after a short recovery.

1. A Mixtral-shaped MoE (byte-level vocabulary of 256, so no tokenizer to train) is trained on the offline corpus
   (the Python standard library's source, :mod:`pruning.text`, train split; AdamW, warm-up and cosine decay,
   :func:`pruning.training.train`), cached under ``.cache/moe-quality/<preset>/`` with a manifest (config, steps,
   held-out perplexity); a later call with the same settings reuses it.
2. For each criterion (``frequency``, ``reap``, ``taylor``, ``sdm`` with CE gradients, and ``magnitude`` as the
   baseline) and each sparsity: a copy of the model is pruned one-shot (``granularity="expert"``, the same number
   of experts removed in every layer) on seeded calibration windows of the train split, compacted to a stock
   config, scored (held-out perplexity per byte on evenly spaced non-overlapping windows of the held-out split),
   then trained for ``--recover-steps`` steps on the train split and scored again.
3. A markdown table is printed (and written with ``--out`` as JSON).

    .venv/bin/python benchmarks/moe_quality.py                   # preset cpu: 600 training steps, then the table
    .venv/bin/python benchmarks/moe_quality.py --preset smoke    # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pruning  # noqa: E402
from pruning.evaluation.perplexity import perplexity  # noqa: E402
from pruning.text import batches, stdlib_bytes, windows  # noqa: E402
from pruning.training import RandomWindows, TrainConfig, train  # noqa: E402

CRITERIA = ("frequency", "reap", "taylor", "sdm", "magnitude")
SPARSITIES = (0.25, 0.5)
DEFAULT_CACHE = Path(".cache/moe-quality")


@dataclass(frozen=True)
class Preset:
    """The model, its training and the evaluation protocol (the cache key is all of it)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    experts: int
    top_k: int
    expert_size: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    recover_steps: int
    recover_lr: float
    calib_windows: int
    eval_windows: int
    max_train_bytes: int | None = None
    max_heldout_bytes: int | None = None
    seed: int = 0


PRESETS = {
    "smoke": Preset(32, 2, 4, 2, 4, 2, 32, 32, 4, 3, 3e-3, 2, 1e-3, 4, 4, 60_000, 20_000),
    # 8 experts of 256 neurons, top-2, 4 layers: 7.15M parameters, 6.29M of them in experts
    "cpu": Preset(256, 4, 8, 4, 8, 2, 256, 256, 16, 600, 2e-3, 100, 3e-4, 64, 128),
}


def build(preset: Preset):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral",
        vocab_size=256,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.expert_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        num_local_experts=preset.experts,
        num_experts_per_tok=preset.top_k,
        max_position_embeddings=preset.seq_len,
        tie_word_embeddings=True,
    )
    torch.manual_seed(preset.seed)
    return AutoModelForCausalLM.from_config(cfg)


def data(preset: Preset) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The train byte stream, the calibration batches (seeded windows of it) and the held-out batches."""
    stream = stdlib_bytes("train", max_bytes=preset.max_train_bytes)
    calib = list(batches(windows(stream, preset.seq_len, preset.calib_windows, seed=preset.seed + 1), 8))
    heldout = stdlib_bytes("heldout", max_bytes=preset.max_heldout_bytes)
    n = min(preset.eval_windows, heldout.numel() // preset.seq_len)
    starts = torch.linspace(0, heldout.numel() - preset.seq_len, n).round().long()
    evals = heldout[starts[:, None] + torch.arange(preset.seq_len)[None, :]]
    return stream, calib, list(batches(evals, 8))


def load_or_train(preset: Preset, cache: Path, log=print):
    """The trained model of ``preset`` (cached in ``cache``, keyed by the preset) and its manifest."""
    key = json.dumps(asdict(preset), sort_keys=True)
    manifest_path = cache / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
        return pruning.load_pretrained(cache).eval(), json.loads(manifest_path.read_text())
    model = build(preset)
    stream, _, evals = data(preset)
    t0 = time.time()
    config = TrainConfig(steps=preset.steps, lr=preset.lr, weight_decay=0.1, schedule="cosine", warmup=0.05,
                         min_lr=0.1, log_every=max(1, preset.steps // 10))  # fmt: skip
    train(model, RandomWindows(stream, preset.seq_len, preset.batch, seed=preset.seed), config, log=log)
    model.eval()
    manifest = {
        "key": key,
        "preset": asdict(preset),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - t0, 1),
        "heldout_ppl": perplexity(model, evals),
    }
    pruning.save_pretrained(model, cache)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return model, manifest


def run(preset: Preset, cache: Path, criteria=CRITERIA, sparsities=SPARSITIES, log=print) -> dict:
    """Every criterion at every sparsity: held-out perplexity pruned (compacted) and after recovery."""
    dense, manifest = load_or_train(preset, cache, log)
    stream, calib, evals = data(preset)
    control = dense_control(dense, stream, evals, preset)
    log(f"dense: {manifest['heldout_ppl']:.3f} -> {control:.3f} after the same recovery (control)")
    rows = []
    for sparsity in sparsities:
        for method in criteria:
            model = copy.deepcopy(dense)
            t0 = time.time()
            res = pruning.prune(model, calib, method=method, granularity="expert", sparsity=sparsity, progress=False)
            prune_s = time.time() - t0
            pruning.compact(model, res.masks)
            pruned = perplexity(model, evals)
            recover(model, stream, preset)
            rows.append(
                {
                    "method": method,
                    "sparsity": sparsity,
                    "experts_kept": int(model.config.num_local_experts),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "pruned_ppl": pruned,
                    "recovered_ppl": perplexity(model, evals),
                    "prune_seconds": round(prune_s, 2),
                }
            )
            log(f"{method} {sparsity:.0%}: {pruned:.3f} -> {rows[-1]['recovered_ppl']:.3f}")
    return {"dense": manifest, "dense_recovered_ppl": control, "recover_steps": preset.recover_steps, "rows": rows}


def recover(model, stream, preset: Preset) -> None:
    """The short recovery every row gets (the same batches), masks gone with the removed experts."""
    cfg = TrainConfig(steps=preset.recover_steps, lr=preset.recover_lr, schedule="cosine", warmup=0.05)
    train(model, RandomWindows(stream, preset.seq_len, preset.batch, seed=preset.seed + 2), cfg)
    model.eval()


def dense_control(dense, stream, evals, preset: Preset) -> float:
    """Held-out perplexity of the dense model after the same recovery (what the recovery alone does)."""
    model = copy.deepcopy(dense)
    recover(model, stream, preset)
    return perplexity(model, evals)


def plot(result: dict, path: Path) -> None:
    """Held-out perplexity against the fraction of experts removed, per criterion, pruned (solid) and after the
    recovery (dashed), with the dense model and its control as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    for i, m in enumerate(methods):
        rows = [r for r in result["rows"] if r["method"] == m]
        x = [0.0] + [r["sparsity"] for r in rows]
        colour = plt.get_cmap("tab10")(i)
        ax.plot(x, [result["dense"]["heldout_ppl"]] + [r["pruned_ppl"] for r in rows], "-o", color=colour, label=m)
        if "dense_recovered_ppl" in result:
            after = [result["dense_recovered_ppl"]] + [r["recovered_ppl"] for r in rows]
            ax.plot(x, after, "--", color=colour, alpha=0.7)
    ax.axhline(result["dense"]["heldout_ppl"], color="black", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of experts removed (every MoE layer)")
    ax.set_ylabel("held-out perplexity per byte (log)")
    ax.set_title("Whole experts removed: pruned (solid), after recovery (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    dense = result["dense"]
    lines = [
        f"dense: {dense['parameters']:,} parameters, held-out perplexity per byte {dense['heldout_ppl']:.3f}"
        + (
            f" ({result['dense_recovered_ppl']:.3f} after the same recovery: the control)"
            if "dense_recovered_ppl" in result
            else ""
        ),
        "",
        f"| criterion | experts removed | experts kept | parameters | pruned ppl | after {result['recover_steps']} "
        "steps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['sparsity']:.0%} | {r['experts_kept']} | {r['parameters']:,} | "
            f"{r['pruned_ppl']:.3f} | {r['recovered_ppl']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--steps", type=int, help="training steps (overrides the preset)")
    parser.add_argument("--recover-steps", type=int, help="recovery steps (overrides the preset)")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--plot", type=Path, help="draw the result here (PNG)")
    parser.add_argument("--from-json", type=Path, help="only print the table (and --plot) of an earlier result")
    args = parser.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        print(table(result))
        if args.plot is not None:
            plot(result, args.plot)
        return result
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if args.recover_steps is not None:
        preset = replace(preset, recover_steps=args.recover_steps)
    result = run(preset, args.cache / args.preset, criteria=args.criteria)
    print(table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
