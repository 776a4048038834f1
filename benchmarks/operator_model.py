"""Self-Pruner's operator model, built offline: the demo model (``pruning demo-model``, a 1M-parameter byte-level
Llama that has read the standard library) fine-tuned on operator prompt/answer pairs.

The prompts are exactly what :class:`pruning.allocation.operators.LLMOperator` asks at search time (initialisation,
parent selection, crossover, mutation), on synthetic populations of 6-layer rate lists (target mean 0.15–0.55, the
quality benchmark's depth); the answers come from the classical operators (random lists around the target,
tournament choices, uniform crossover, Gaussian mutation), written in the answer format the prompt asks for and
ended by the end-of-sequence byte. The loss is taken on the answer only. So the model learns the task's format and
an imitation of the classical operators — a stand-in for the GPT-4 of the paper that can run anywhere without a
download; any real instruction-following model (local, or an OpenAI-compatible endpoint) goes through the same
``LLMOperator``.

    .venv/bin/python benchmarks/operator_model.py          # builds .cache/operator-model (about 10 min on 2 cores)

The cache holds the model, its byte tokenizer and a manifest with the held-out usable-answer rate per operator.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruning.allocation.operators import (  # noqa: E402
    LLM_OPERATORS,
    LLMOperator,
    LocalCausalLM,
    parse_indices,
    parse_rate_lists,
    parse_rates,
)
from pruning.allocation.rates import project_rates  # noqa: E402
from pruning.commands.demo import load_or_train as load_demo_model  # noqa: E402
from pruning.options import IGNORE_INDEX  # noqa: E402
from pruning.text.tokens import byte_tokenizer  # noqa: E402
from pruning.training import TrainConfig, make_optimizer, make_scheduler  # noqa: E402

LAYERS = 6
COUNTS = [1024] * LAYERS  # rates in whole neurons of the reference model's MLP
MAX_RATE = 0.9
CONTEXT = 2048  # positions the fine-tuned model is given (rotary: no new weights); the longest prompt is ~1.3k bytes


class _NoModel:
    """Prompts only: the examples are written by the classical operators, not generated."""

    name = "none"

    def generate(self, prompt: str) -> str:
        raise RuntimeError("not used")


def _fmt(rates) -> str:
    return "[" + ", ".join(f"{r:.3f}" for r in rates) + "]"


def _population(rng: random.Random, target: float, size: int) -> list[tuple[list[float], float]]:
    pop = []
    for _ in range(size):
        rates = project_rates([target + rng.gauss(0.0, 0.1) for _ in range(LAYERS)], target, COUNTS, 1, MAX_RATE)
        pop.append((rates, 0.0))
    fits = sorted(30.0 + 25.0 * rng.random() for _ in range(size))
    return [(r, f) for (r, _), f in zip(pop, fits)]


def _tournament(rng: random.Random, size: int, picked: list[int], k: int = 3) -> int:
    """The best of ``k`` drawn among those not ``picked`` (the population is sorted: the lowest index is the best)."""
    rest = [i for i in range(size) if i not in picked]
    return min(rng.sample(rest, min(k, len(rest))))


def example(rng: random.Random, op: str, shown: int = 10) -> tuple[str, str]:
    """One prompt (as the search asks it) and the answer the classical operator gives."""
    writer = LLMOperator(_NoModel(), shown=shown)
    target = round(rng.uniform(0.15, 0.55), 4)
    pop = _population(rng, target, rng.randint(6, 12))
    if op == "initialisation":
        count = rng.randint(1, 9)
        lists = [
            project_rates([target + rng.gauss(0.0, 0.1) for _ in range(LAYERS)], target, COUNTS, 1, MAX_RATE)
            for _ in range(count)
        ]
        return writer.initialisation_prompt(count, LAYERS, target, MAX_RATE), "\n".join(map(_fmt, lists))
    if op == "selection":
        count = rng.choice([1, 2])
        picks: list[int] = []
        for _ in range(count):
            picks.append(_tournament(rng, len(pop), picks))
        purpose = "crossover" if count == 2 else "mutation"
        answer = "[" + ", ".join(map(str, picks)) + "]"
        return writer.selection_prompt(pop, count, purpose, target, MAX_RATE), answer
    a, b = (pop[i][0] for i in rng.sample(range(len(pop)), 2))
    if op == "crossover":
        child = [a[i] if rng.random() < 0.5 else b[i] for i in range(LAYERS)]
        return writer.prompt("crossover", [a, b], pop, target, MAX_RATE), _fmt(child)
    child = list(a)
    for i in rng.sample(range(LAYERS), LAYERS // 2):
        child[i] = min(max(child[i] + 0.05 * rng.gauss(0.0, 1.0), 0.0), MAX_RATE - 0.001)
    return writer.prompt("mutation", [a], pop, target, MAX_RATE), _fmt(child)


def encode(tok, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompt + newline + answer + EOS`` and labels (the answer and EOS only; as LocalCausalLM asks
    a model without a chat template: the prompt, then a newline)."""
    p = tok(prompt + "\n", add_special_tokens=False).input_ids
    a = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor(p + a)
    labels = torch.tensor([IGNORE_INDEX] * len(p) + a)
    return ids, labels


def finetune(model, data: list[tuple[torch.Tensor, torch.Tensor]], steps: int, batch: int, lr: float, seed: int):
    """AdamW over ``steps`` batches drawn from ``data`` (padded, the padding taking no loss); returns the losses."""
    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, schedule="cosine", warmup=0.05, min_lr=0.1)
    opt, rng = make_optimizer(model, config), random.Random(seed)
    sched = make_scheduler(opt, config)
    model.train()
    losses = []
    for step in range(steps):
        items = [data[rng.randrange(len(data))] for _ in range(batch)]
        n = max(len(ids) for ids, _ in items)
        ids = torch.zeros(batch, n, dtype=torch.long)
        labels = torch.full((batch, n), IGNORE_INDEX)
        mask = torch.zeros(batch, n, dtype=torch.long)
        for i, (x, y) in enumerate(items):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", flush=True)
    return losses


def usable(op: str, prompt: str, answer: str) -> bool:
    """Whether the search would use the answer (what the parsers accept)."""
    if op == "initialisation":
        return bool(parse_rate_lists(answer, LAYERS)[0])
    if op == "selection":
        count = 2 if "Select two parents" in prompt else 1
        size = int(prompt.split("best first (")[1].split(" ")[0])
        return parse_indices(answer, count, size)[0] is not None
    return parse_rates(answer, LAYERS)[0] is not None


def build(
    out: Path,
    demo_cache: Path,
    per_op: int = 150,
    steps: int = 300,
    batch: int = 8,
    lr: float = 1e-3,
    heldout: int = 10,
    seed: int = 0,
) -> dict:
    """Fine-tune the demo model into ``out`` and measure its usable answers on ``heldout`` new prompts per
    operator; returns the manifest."""
    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = byte_tokenizer()
    model = load_demo_model(demo_cache, 800)
    model.config.max_position_embeddings = CONTEXT
    for cfg in (model.config, model.generation_config):  # generation stops at the byte tokenizer's EOS (NUL)
        cfg.eos_token_id = cfg.pad_token_id = tok.eos_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = None
    pairs = [(op, *example(rng, op)) for op in LLM_OPERATORS for _ in range(per_op)]
    data = [encode(tok, p, a) for _, p, a in pairs]
    print(f"{len(data)} examples, {sum(len(x) for x, _ in data):,} tokens; longest {max(len(x) for x, _ in data)}")
    losses = finetune(model, data, steps, batch, lr, seed)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    lm = LocalCausalLM(str(out), max_new_tokens=448, seed=seed)
    check = random.Random(seed + 1)
    rates = {}
    for op in LLM_OPERATORS:
        ok = 0
        for _ in range(heldout):
            prompt, _ = example(check, op)
            ok += usable(op, prompt, lm.generate(prompt))
        rates[op] = ok / heldout
        print(f"  {op}: {ok}/{heldout} usable answers on new prompts")
    manifest = {
        "base": "demo model (pruning demo-model, 800 steps)",
        "examples": len(data),
        "examples_per_operator": per_op,
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_usable": rates,
        "context": CONTEXT,
        "seconds": time.time() - t0,
    }
    (out / "operator_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_or_build(out: Path = Path(".cache/operator-model"), demo_cache: Path = Path(".cache/demo-model")) -> Path:
    """The cached operator model's path (built first when missing)."""
    if not (out / "operator_manifest.json").exists():
        build(out, demo_cache)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/operator-model"))
    ap.add_argument("--demo-cache", type=Path, default=Path(".cache/demo-model"))
    ap.add_argument("--per-op", type=int, default=150, help="examples per operator")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heldout", type=int, default=10, help="new prompts per operator to measure usable answers")
    args = ap.parse_args(argv)
    manifest = build(args.out, args.demo_cache, args.per_op, args.steps, args.batch, args.lr, args.heldout)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
