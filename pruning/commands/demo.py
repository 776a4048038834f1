"""The offline demo: a small Llama that has learned the standard library's source, pruned by every criterion.

The model ships with the package (``pruning/assets/demo-model``: 4 MB of safetensors, its byte-level tokenizer and
a manifest with its sha256 and how it was trained), so the demo's numbers do not depend on a training run's thread
count or speed. ``pruning demo-model`` puts it where ``configs/demo.yaml`` reads it (``.cache/demo-model``);
``pruning demo-model --train`` trains it again instead (800 steps, a few minutes; the weights depend on the thread
count, ``--threads 2`` gives the shipped ones). ``pruning demo`` prunes 30 % of its MLP neurons (uniform width, so
the result stays a stock Llama) and 50 % of its weights unstructured by every criterion, and prints held-out
perplexity and parameter counts per method.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from .. import prune
from ..evaluation.perplexity import perplexity
from ..text.stdlib import BYTE_VOCAB, batches, stdlib_bytes, windows
from ..text.tokens import byte_tokenizer
from ..training import RandomWindows, TrainConfig, train
from .parsing import command_parser


def demo_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


def train_demo_model(
    steps: int, seq_len: int = 128, batch: int = 16, seed: int = 0, log: Callable[[str], None] = print
) -> PreTrainedModel:
    """The demo model trained ``steps`` steps on random windows of the stdlib train split (AdamW, one-cycle LR)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(demo_config())
    data = RandomWindows(stdlib_bytes("train", max_bytes=4_000_000), seq_len, batch, seed=seed)
    config = TrainConfig(
        steps=steps, lr=3e-3, weight_decay=0.01, schedule="onecycle", warmup=0.05, clip_grad_norm=1.0, log_every=100
    )
    train(model, data, config, log=log)
    return model.eval()


SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
MANIFEST = "demo_manifest.json"


def save_demo_model(model: PreTrainedModel, directory: Path, manifest: dict) -> None:
    """The model with its byte-level tokenizer (``AutoTokenizer.from_pretrained`` loads it) and manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_or_train(cache: Path, train: bool = False, steps: int = 800, threads: int = 2, log=print) -> PreTrainedModel:
    """The demo model in ``cache``: the shipped one copied there (unless it is there already), or with ``train``
    trained anew."""
    if train:
        torch.set_num_threads(threads)
        log(f"training the demo model ({steps} steps on the standard-library corpus, {threads} threads)...")
        model = train_demo_model(steps, log=log)
        save_demo_model(model, cache, {"steps": steps, "seed": 0, "torch_threads": threads, "trained_here": True})
        return model
    shipped = json.loads((SHIPPED / MANIFEST).read_text())
    there = cache / MANIFEST
    if not there.is_file() or json.loads(there.read_text()).get("model_sha256") != shipped["model_sha256"]:
        cache.mkdir(parents=True, exist_ok=True)
        for f in SHIPPED.iterdir():
            shutil.copyfile(f, cache / f.name)
        log(f"the shipped demo model is in {cache} (sha256 {shipped['model_sha256'][:12]}...)")
    return AutoModelForCausalLM.from_pretrained(cache).eval()


def prepare(argv: list[str] | None = None) -> None:
    """``pruning demo-model``: put the shipped demo model in ``--cache`` (or train it anew with ``--train``)."""
    ap = command_parser("pruning demo-model", prepare.__doc__)
    ap.add_argument("--cache", type=Path, default=Path(".cache/demo-model"))
    ap.add_argument("--train", action="store_true", help="train it instead of using the shipped one")
    ap.add_argument("--steps", type=int, default=800, help="training steps (with --train)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training (with --train)")
    args = ap.parse_args(argv)
    load_or_train(args.cache, args.train, args.steps, args.threads)


def nonzero_params(model) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    ap = command_parser("pruning demo", __doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/demo-model"))
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows of 128 bytes")
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows of 128 bytes")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dense = load_or_train(args.cache)
    calib = list(batches(windows(stdlib_bytes("train", max_bytes=4_000_000), 128, args.calibration, seed=0), 8))
    heldout = list(batches(windows(stdlib_bytes("heldout"), 128, args.eval_windows), 16))

    rows = [("dense", "-", perplexity(dense, heldout), nonzero_params(dense))]
    recipes = [
        ("magnitude", "mlp_neuron", 0.3, {}),
        ("wanda", "mlp_neuron", 0.3, {}),
        ("taylor", "mlp_neuron", 0.3, {}),
        ("sdm", "mlp_neuron", 0.3, {}),
        ("saap", "mlp_neuron", 0.3, {}),
        ("mutual_info", "mlp_neuron", 0.3, {}),
        ("magnitude", "unstructured", 0.5, {}),
        ("wanda", "unstructured", 0.5, {}),
        ("gblm", "unstructured", 0.5, {}),
        ("sparsegpt", "unstructured", 0.5, {}),
        ("wanda", "2:4", 0.5, {}),
        ("sparsegpt", "2:4", 0.5, {}),
    ]
    for method, gran, sparsity, opts in recipes:
        model = copy.deepcopy(dense)
        t0 = time.time()
        if method == "saap":
            # SAAP: σ of the fused importance learned on the calibration batches, then the importance-fluctuation
            # ranking turns the target into per-layer rates (mean = target)
            from ..allocation.ranking import saap_layer_rates, saap_scores

            est = saap_scores(model, calib, gran, progress=False)
            rates, _ = saap_layer_rates(est, sparsity)
            prune(
                model,
                calib,
                "saap",
                sparsity,
                gran,
                criterion_options=est.criterion_options(),
                allocation="rates",
                layer_rates=rates,
                progress=False,
            )
            gran = f"{gran} (ranked rates)"
        elif method == "sdm":
            # SDMPrune's two stages: CE scores prune lightly, then KL+CE scores against the original model
            # (the same weights with the masks lifted) prune to the target. α, t: the paper's 30 % row.
            a = prune(model, calib, "sdm", 0.025, gran, keep_original=True, progress=False)
            prune(
                model,
                calib,
                "sdm",
                sparsity,
                gran,
                masks=a.masks,
                alpha=0.42,
                temperature=0.5,
                keep_original=True,
                progress=False,
            )
        else:
            prune(model, calib, method, sparsity, gran, criterion_options=opts, progress=False)
        rows.append((method, f"{gran} {sparsity:.0%}", perplexity(model, heldout), nonzero_params(model)))
        print(f"  {method:9s} {gran:12s} done in {time.time() - t0:.1f}s")
    print("\n| method | pruned | held-out ppl | nonzero params |\n|---|---|---:|---:|")
    for method, what, ppl, n in rows:
        print(f"| {method} | {what} | {ppl:.3f} | {n:,} |")


if __name__ == "__main__":
    main()
